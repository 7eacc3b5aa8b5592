"""Which GPUs this machine has, and pinning a process to one, without importing torch (a CUDA context in the
runner would hold memory on every GPU). The sweep's device queue (helpers.sweep --devices) and a sharded run's
check that it has num_gpus GPUs (runs.sharding_problems) both count them here."""
import contextlib
import os


def cuda_visible_entries(value: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: indices or GPU-/MIG- UUIDs, up to the first entry that is neither
    (CUDA ignores the rest; "-1" or "" means no device)."""
    out = []
    for entry in (e.strip() for e in value.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        out.append(entry)
    return out


def visible_gpus() -> list[str]:
    """The GPUs this process may give runs, as CUDA_VISIBLE_DEVICES entries, without importing torch (a CUDA
    context in the runner would hold memory on every GPU): CUDA_VISIBLE_DEVICES where it is set, else every GPU
    NVML lists, by index (NVML numbers GPUs in PCI bus order, as CUDA does under CUDA_DEVICE_ORDER=PCI_BUS_ID).
    [] where there is none (no driver, no GPU)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return cuda_visible_entries(os.environ["CUDA_VISIBLE_DEVICES"])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml raises NVMLError_LibraryNotFound / _DriverNotLoaded where there is no GPU
        pass
    try:  # the driver without nvidia-ml-py: nvidia-smi numbers GPUs as NVML does
        import subprocess

        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30)
        return [line.strip() for line in listed.stdout.splitlines() if line.strip().isdigit()] if listed.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        return []


@contextlib.contextmanager
def pinned(device: str | None):
    """The kernels started inside see only `device` (a CUDA_VISIBLE_DEVICES entry; None: no change). CUDA's
    default order is fastest first; PCI_BUS_ID makes index i the same GPU for CUDA, NVML and nvidia-smi."""
    if device is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    os.environ.update(CUDA_VISIBLE_DEVICES=device, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

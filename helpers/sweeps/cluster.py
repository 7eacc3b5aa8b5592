"""Run a sweep's configurations on a Ray cluster: each run on a node with a free GPU (or CPU), its files sent back.

    pip install -e ".[cluster]"                       # Ray, on the driver and on every node
    python -m helpers.sweep parameters/gpu-7b.yaml --cluster local        # a Ray cluster of this machine
    ray start --head --port 6379                      # on the head node; on each other node:
    ray start --address HEAD_IP:6379                  #   (same Python, same packages, the model cache filled)
    python -m helpers.sweep parameters/gpu-7b.yaml --cluster HEAD_IP:6379 # from the head (or ray://HEAD_IP:10001)

Why Ray: it is the ecosystem's scheduler for GPU tasks across machines (a task asks for num_gpus=1 and Ray sets its
CUDA_VISIBLE_DEVICES), it retries a task whose worker or node is lost, it ships the project's code to every node
(runtime_env working_dir) and it has a local mode that needs nothing but a CPU, which is how CI tests this.

What happens, in order:
1. The driver (this machine) checks the sweep and skips finished runs exactly as a local sweep does
   (helpers.sweeps.sweep.run_state): only unfinished configurations are submitted.
2. The project folder (helpers/, notebooks/, tools/, parameters/; not reports/ nor .venv, nor what .gitignore
   names) goes to every node as the tasks' working directory: no shared filesystem is assumed. Models are not
   shipped: each node builds or fetches them into its own cache (python -m helpers.models NAME) as any machine does.
3. Each task runs one configuration with helpers.sweeps.sweep.execute, in a fresh kernel, into a temporary folder of its
   node, and returns the executed notebook and the sidecar as bytes. A GPU sweep (device auto or cuda, and the
   cluster has GPUs) asks for num_gpus=1 (an FSDP run: its num_gpus, on one node), so a run has its GPUs to
   itself (side_by_side 1); a CPU sweep asks for
   num_cpus=1, and its sidecar records side_by_side as the CPUs of its node (how many such runs may share that
   node): its costs are shared figures, as with --jobs.
4. The driver writes the notebook, then the sidecar last, each atomically (helpers.records.files.atomic_write, through
   helpers.records.sidecars.write_sidecar), into the sweep's runs/ folder, with the sidecar's output_dir set to that folder
   (the executed notebook keeps the node's temporary folder in its parameters cell: where it ran).
5. A task whose worker process or node dies is run again by Ray (MAX_RETRIES); a run that fails (error, OOM) is a
   result, kept as a local sweep keeps it, and never retried. Ctrl-C cancels the tasks; the runs in flight are
   recorded as unfinished, and a re-run of the sweep resumes.

Ray is imported here only, when --cluster is used: a large optional dependency (the [cluster] extra).
"""
import json
import tempfile
from pathlib import Path

from helpers.records.files import atomic_write
from helpers.records.paths import PROJECT_ROOT
from helpers.records.sidecars import write_sidecar

MAX_RETRIES = 2  # a run whose worker or node is lost is redone on another, at most this many times
# not shipped to the nodes (besides what .gitignore names): results, environments, version control
EXCLUDES = ["/reports/", ".venv", "venv", ".git", "**/__pycache__", "**/.ipynb_checkpoints", ".device-wheels"]
CANCEL_WAIT_S = 30  # after Ctrl-C: how long the runs in flight get to stop their kernels


def execute_remote(execute, sweep: dict, cfg: dict) -> dict:
    """On a Ray worker: run one configuration with `execute` (helpers.sweeps.sweep.execute) into a temporary folder of this
    node; return its status, its files ({name: bytes}: the executed notebook and the sidecar) and where it ran."""
    import os
    import platform

    notebook = Path(sweep["notebook"])
    notebook = notebook if notebook.is_absolute() else PROJECT_ROOT / notebook
    os.environ.update(sweep["env"])  # the kernel inherits it
    with tempfile.TemporaryDirectory(prefix="qlora-run-") as tmp:
        status = execute({**sweep, "notebook": notebook}, {**cfg, "output_dir": tmp})
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()
                 if p.name in (f"{cfg['run_id']}.json", f"{cfg['run_id']}.ipynb")}
    return {"status": status, "files": files, "host": platform.node(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


def receive(cfg: dict, result: dict, record) -> str:
    """Write a task's files into the sweep's runs/ folder (notebook first, sidecar last, each atomically) and
    return the run's status as the sidecar says it. A result without a readable sidecar is recorded as an error
    with `record` (helpers.sweep's _record)."""
    folder = Path(cfg["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    sidecar = folder / f"{cfg['run_id']}.json"
    sidecar.unlink(missing_ok=True)  # an old result must not outlive a redo
    files = result.get("files") or {}
    if f"{cfg['run_id']}.ipynb" in files:
        atomic_write(folder / f"{cfg['run_id']}.ipynb", files[f"{cfg['run_id']}.ipynb"])
    try:
        run = json.loads(files[sidecar.name])
        assert isinstance(run, dict) and "status" in run and isinstance(run.get("config"), dict)
    except (KeyError, ValueError, AssertionError):
        return record(cfg, "error", f"the run on {result.get('host')} sent back no readable sidecar "
                                    f"(status {result.get('status')})")
    run["config"]["output_dir"] = cfg["output_dir"]
    run.pop("sidecar_version", None)  # write_sidecar puts the current one first
    write_sidecar(sidecar, run)
    return run["status"]


def _gpu_sweep(configs: list[dict], resources: dict) -> bool:
    """The runs go to GPUs: they may use one (device auto or cuda) and the cluster has some."""
    return resources.get("GPU", 0) >= 1 and all(c["device"] in ("auto", "cuda", "cuda:0") for c in configs)


def _cpus_per_node(ray) -> int:
    """The CPUs of the smallest node: how many one-CPU runs may share a node (the side_by_side of CPU runs)."""
    counts = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(1, min([c for c in counts if c] or [1]))


def connect(address: str):
    """ray.init for the sweep: an existing connection is kept (a test or a notebook made it), "local" starts a
    cluster of this machine, anything else is the head's address. The project folder is the tasks' working dir."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--cluster needs Ray: pip install -e '.[cluster]' (on the driver and on every node)") from None
    if ray.is_initialized():
        return ray
    env = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}
    ray.init(address=None if address == "local" else address, runtime_env=env, log_to_driver=False,
             include_dashboard=False if address == "local" else None, logging_level="WARNING")  # the sweep's lines
    return ray


def run_on_ray(sweep: dict, todo: list[dict], address: str, execute, record, outcome, out, side_by_side_env: str) -> None:
    """Submit each configuration of `todo` as a Ray task running `execute` (helpers.sweeps.sweep.execute) and take the
    results as they come: outcome(cfg, status, where) for each. `record(cfg, status, text)` writes a sidecar for a
    run that did not come back (helpers.sweeps.sweep._record). A run whose task fails more than MAX_RETRIES times, or
    raises, is an error; Ctrl-C cancels the rest, records the runs not back as unfinished, and is raised."""
    ray = connect(address)
    resources = ray.cluster_resources()
    gpu = _gpu_sweep(todo, resources)
    side_by_side = 1 if gpu else _cpus_per_node(ray)
    # what the task needs: the sweep without its local paths (the notebook relative to the project when inside it)
    notebook = Path(sweep["notebook"])
    shipped = {k: v for k, v in sweep.items() if k != "folder"}
    shipped["notebook"] = str(notebook.relative_to(PROJECT_ROOT)) if notebook.is_relative_to(PROJECT_ROOT) else str(notebook)
    shipped["env"] = {side_by_side_env: str(side_by_side)}
    if gpu:  # Ray pins a task with CUDA_VISIBLE_DEVICES by index: NVML's (the sidecar's gpu_uuid), as sweep --devices does
        shipped["env"]["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    task = ray.remote(execute_remote)
    print(f"Ray cluster: {int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs; "
          + ("one run per GPU (num_gpus of one node for an FSDP run)" if gpu else
             f"one run per CPU (up to {side_by_side} share a node: costs are shared figures)"), file=out, flush=True)
    # an FSDP run (num_gpus N) asks for N GPUs of one node; Ray sets its CUDA_VISIBLE_DEVICES to them
    pending = {task.options(num_cpus=1, num_gpus=c.get("num_gpus", 1) if gpu else 0, max_retries=MAX_RETRIES,
                            retry_exceptions=False).remote(execute, shipped, c): c for c in todo}
    try:
        while pending:
            ready = []
            while not ready:  # a wait without a timeout blocks in Ray's C++ core, where Ctrl-C does not reach it
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            c = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # the task raised, or was lost more than MAX_RETRIES times
                lines = str(e).strip().splitlines() or [""]
                outcome(c, record(c, "error", f"the run failed on the cluster: {type(e).__name__}: {lines[-1][:2000]}"), "")
                continue
            where = f" on {result['host']}" + (f" GPU {result['gpus']}" if gpu and result.get("gpus") else "")
            outcome(c, receive(c, result, record), where)  # an OSError here (disk full) stops the sweep
    except BaseException:  # Ctrl-C or a full disk: cancel what is left; the runs in flight stop their kernels
        for ref in pending:
            ray.cancel(ref)
        ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
        for c in pending.values():
            try:
                record(c, "unfinished", "interrupted (Ctrl-C) while on the cluster: re-run the sweep to redo this run")
            except OSError:
                pass
        raise

"""A run's lifecycle in the training notebook: its parameters validated against this machine, its environment, the
VRAM budget, memory figures, and its sidecar (written atomically, last, also on a failure: guard). The run id and
type checks are helpers.params', the record format and the out-of-memory test helpers.sidecars' (re-exported here,
where the notebook and the sweep know them)."""
import functools
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

from helpers.training.data import RANDOM_CORPUS, check_corpus
from helpers.records.gpus import visible_gpus
from helpers.records.paths import PROJECT_ROOT
from helpers.records.params import check_types, run_id
from helpers.records.sidecars import (  # noqa: F401 - re-exported: the notebook and the sweep know them from here
    ENV_COLUMNS, SIDECAR_VERSION, is_oom, notebook_problem, progress_path, read_all, read_sidecar,
    summary_rows, write_sidecar, write_summary,
)
from helpers.training.models import (
    DTYPE_CHOICES, QUANTS, bitsandbytes_problem, check_model_name, context_length, is_synthetic, stored_problem,
)
from helpers.training.levers import LEVERS
from helpers.training.levers import config_of as levers_of
from helpers.training.levers import problems as lever_problems
from helpers.training.peer import problems as stack_problems
from helpers.training.train import BNB_OPTIMIZERS, OPTIMIZERS


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _need(cond: bool, name: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


DEVICE_FORMS = "auto, cpu, cuda or cuda:N (N a GPU index)"


def check_device(device, here: bool = True) -> None:
    """A device name this project knows; with here=True, one this machine has (cuda needs a GPU torch sees)."""
    import re

    _need(device in ("auto", "cpu") or bool(re.fullmatch(r"cuda(:\d+)?", str(device))), "device", device, DEVICE_FORMS)
    if not here or not str(device).startswith("cuda"):
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ValueError(f"device={device!r} is not allowed: this machine has no CUDA device that torch "
                         f"{torch.__version__} can use; use auto or cpu")
    index = int(str(device).partition(":")[2] or 0)
    _need(index < n, "device", device, f"this machine has {n} CUDA device(s): cuda:0 .. cuda:{n - 1}")


def check_paths(config: dict) -> None:
    """run_id is a file name (no folder, no '..'); a relative output_dir stays inside the project.

    An absolute output_dir is the user's explicit choice (the sweep passes one) and is kept."""
    import re

    rid = config["run_id"]
    _need(rid == "" or bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(rid))), "run_id", rid,
          "empty (derived from the parameters) or a file name of letters, digits, '.', '_' and '-' "
          "(no folders: the sidecar goes in output_dir)")
    out = Path(str(config["output_dir"])).expanduser()
    if not out.is_absolute():
        _need(bool(config["output_dir"]) and (PROJECT_ROOT / out).resolve().is_relative_to(PROJECT_ROOT),
              "output_dir", config["output_dir"],
              "a folder inside the project (relative to its root) or an absolute path; '..' may not leave the project")


SHARDED_QUANTS = ("none", "nf4", "fp4")  # int8 weights have no floating storage for FSDP to flatten
SHARDED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd")  # bitsandbytes' 8-bit/paged states are not sharded


def sharding_problems(config: dict, here: bool = True) -> list[tuple[str, object, str]]:
    """(name, value, what is allowed) for num_gpus and fsdp_cpu_offload (helpers/training/sharded.py); [] when the run can go.

    num_gpus > 1 runs that many processes: on GPUs (device auto or cuda: that many must be visible) or, with device
    cpu, on the CPU (gloo; for tests: no cost figure). here=False skips the count of this machine's GPUs (dry run)."""
    n, offload = config.get("num_gpus", 1), config.get("fsdp_cpu_offload", False)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return [("num_gpus", n, "a whole number >= 1 (1: one process, no FSDP)")]
    out = []
    if not isinstance(offload, bool):
        out.append(("fsdp_cpu_offload", offload, "True or False"))
    elif offload and n == 1:
        out.append(("fsdp_cpu_offload", offload, "False with num_gpus 1 (it offloads FSDP's shards; one process has none)"))
    if n == 1:
        return out
    device = str(config["device"])
    if here and device != "cpu":
        have = len(visible_gpus())
        if n > have:
            out.append(("num_gpus", n, f"at most the {have} GPU(s) visible here (CUDA_VISIBLE_DEVICES counted), or "
                                       "device='cpu' for processes on the CPU"))
    if device.startswith("cuda:"):
        out.append(("device", device, "auto or cuda with num_gpus > 1 (process r uses the r-th visible GPU)"))
    if config["quant"] not in SHARDED_QUANTS:
        out.append(("quant", config["quant"], f"one of {list(SHARDED_QUANTS)} with num_gpus > 1 (FSDP cannot shard "
                                              "int8 weights)"))
    if config["optimizer"] not in SHARDED_OPTIMIZERS:
        out.append(("optimizer", config["optimizer"], f"one of {list(SHARDED_OPTIMIZERS)} with num_gpus > 1"))
    for name in (*LEVERS, "eval_every", "fp32_upcast"):
        if config.get(name):
            out.append((name, config[name], "off with num_gpus > 1 (not built for sharded runs yet)"))
    if config.get("stack", "hf") != "hf":
        out.append(("stack", config["stack"], "'hf' with num_gpus > 1 (the peer runs on one GPU here)"))
    return out


@functools.cache
def bitsandbytes_problem_elsewhere() -> str | None:
    """models.bitsandbytes_problem() asked in a child process, so this one never imports bitsandbytes (once per
    process: a sweep's dry run validates many configurations)."""
    code = "from helpers.training.models import bitsandbytes_problem as p; import sys; m = p(); sys.exit(m) if m else None"
    r = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["bitsandbytes is not usable"])[-1]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(config: dict, here: bool = True, types: dict | None = None) -> None:
    """Refuse a bad configuration before anything runs, naming the bad value and what is allowed.

    types ({name: type}, the notebook's parameters cell): also refuse unknown names and values of the
    wrong type first (papermill's `-p` turns anything it cannot read as a number into a str). Every
    number must be finite (YAML's .inf and .nan are floats). here=False skips the checks that depend on
    this machine (a GPU for device cuda or a VRAM budget), so a GPU sweep can be listed with --dry-run
    on a laptop. A local corpus file is read: it must be text with at least two documents.
    """
    c = config
    if types is not None:
        check_types(c, types)
    sharded = c.get("num_gpus", 1) not in (1, None)
    if sharded:  # the kernel forks its processes later: ask NVML, not CUDA, whether GPUs exist (sharded.py)
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    for name, value in c.items():
        if isinstance(value, float):
            _need(math.isfinite(value), name, value, "a finite number")
    check_paths(c)
    _need(c["quant"] in QUANTS, "quant", c["quant"], f"use one of {list(QUANTS)}")
    _need(c["dtype"] in DTYPE_CHOICES, "dtype", c["dtype"], f"use one of {list(DTYPE_CHOICES)}")
    _need(c["optimizer"] in OPTIMIZERS, "optimizer", c["optimizer"], f"use one of {list(OPTIMIZERS)}")
    check_model_name(c["model"])
    check_corpus(c["corpus"])
    if is_synthetic(c["model"]) != (c["corpus"] == RANDOM_CORPUS):
        raise ValueError(
            f"corpus={c['corpus']!r} does not go with model={c['model']!r}: synthetic models (random weights, "
            f"no tokenizer) train on corpus={RANDOM_CORPUS!r}, and only they do (its perplexity is no quality figure)"
        )
    stored = stored_problem(c["model"], c["quant"], c.get("double_quant", True))
    if stored:
        raise ValueError(stored)
    for name in ("lora_r", "max_steps", "batch_size", "grad_accum"):
        v = c[name]
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "a whole number >= 1")
    num = _finite  # each range check below also refuses a value that is no number, so it holds without types
    _need(num(c["lora_alpha"]) and c["lora_alpha"] > 0, "lora_alpha", c["lora_alpha"], "a number > 0")
    _need(num(c["lora_dropout"]) and 0 <= c["lora_dropout"] < 1, "lora_dropout", c["lora_dropout"],
          "a number in [0, 1)")
    _need(num(c["learning_rate"]) and c["learning_rate"] > 0, "learning_rate", c["learning_rate"],
          "a finite number > 0")
    _need(num(c["warmup_steps"]) and 0 <= c["warmup_steps"] <= c["max_steps"], "warmup_steps", c["warmup_steps"],
          f"0 .. max_steps ({c['max_steps']})")
    _need(num(c["timing_warmup_steps"]) and 0 <= c["timing_warmup_steps"] < c["max_steps"], "timing_warmup_steps",
          c["timing_warmup_steps"],
          f"0 .. max_steps - 1 ({c['max_steps'] - 1}); the steps after it give the steady-state speed")
    _need(num(c["vram_budget_gib"]) and c["vram_budget_gib"] >= 0, "vram_budget_gib", c["vram_budget_gib"],
          "GiB >= 0 (0 = whole card)")
    _need(num(c["eval_fraction"]) and 0 < c["eval_fraction"] < 1, "eval_fraction", c["eval_fraction"],
          "a fraction in (0, 1)")
    _need(num(c["eval_blocks"]) and c["eval_blocks"] >= 0, "eval_blocks", c["eval_blocks"],
          "a whole number >= 0 (0 = all)")
    every = c.get("eval_every", 0)
    _need(isinstance(every, int) and not isinstance(every, bool) and 0 <= every <= c["max_steps"], "eval_every",
          every, f"a whole number of steps in 0 .. max_steps ({c['max_steps']}); 0 = only before and after training")
    check_device(c["device"], here)
    seq = c["seq_len"]
    _need(isinstance(seq, int) and seq >= 2, "seq_len", seq, "a whole number >= 2")
    ctx = context_length(c["model"])
    if ctx is not None:
        _need(seq <= ctx, "seq_len", seq, f"at most the model's context of {ctx} tokens")
    if c["quant"] != "none" or c["optimizer"] in BNB_OPTIMIZERS:
        problem = bitsandbytes_problem_elsewhere() if sharded else bitsandbytes_problem()
        if problem:
            raise RuntimeError(problem)
    if here and c["vram_budget_gib"] > 0 and not resolve_device(c["device"]).startswith("cuda"):
        raise ValueError(f"vram_budget_gib={c['vram_budget_gib']!r} needs a CUDA device; this run is on the CPU")
    upcast = c.get("fp32_upcast", False)
    _need(isinstance(upcast, bool), "fp32_upcast", upcast, "True or False")
    _need(not upcast or c["quant"] == "none", "fp32_upcast", upcast,
          f"False with quant {c['quant']!r}: only the 16-bit arm (quant none) takes it; the QLoRA arms are upcast "
          "already (keep_16bit=True turns that off)")
    for name, value, allowed in stack_problems(c):  # before the levers': a peer run names every lever it refuses
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")
    on_gpu = resolve_device(c["device"]).startswith("cuda") if here else None
    for name, value, allowed in lever_problems({**levers_of(c), "quant": c["quant"]}, on_gpu):
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")
    for name, value, allowed in sharding_problems(c, here):
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def environment(device: str, init_cuda: bool = True) -> dict:
    """Versions and hardware a reader needs to judge the figures.

    init_cuda=False (a sharded run's parent, which must fork before CUDA starts): nothing asked of the GPU; the
    processes report their GPUs (helpers.training.sharded.launch)."""
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    env["device"] = device
    # runs sharing the device (helpers.sweep --jobs): 1 means this run had it alone
    env["side_by_side"] = int(os.environ.get("QLORA_STUDY_SIDE_BY_SIDE", "1"))
    env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")  # the GPU helpers.sweep --devices pinned
    env["cpu_threads"] = torch.get_num_threads()  # torch's intra-op threads (sweep --jobs N shares the cores)
    if device.startswith("cuda") and not init_cuda:  # the processes fill these in (helpers.training.sharded.launch)
        env["device_name"] = env["device_total_gib"] = None
    elif device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
        env["device_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["device_total_gib"] = None
    # init_cuda=False: no GPU query here either (telemetry's NVML reader comes with the Trainer, which imports
    # bitsandbytes, which starts CUDA); the processes report their GPUs' UUIDs
    env.update(machine(device if init_cuda else "cpu"))
    return env


# CPU instructions that change which kernels torch and bitsandbytes pick on a CPU (and so the figures):
# bitsandbytes' 4-bit CPU path repacks weights for an inference kernel where avx512_bf16 is present.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


def _cpu_info() -> tuple[str | None, list[str]]:
    """(CPU model name, which of CPU_FLAGS it has) from /proc/cpuinfo; (None, []) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None, []
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Processor", "CPU part") and model is None:
            model = value.strip()
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return model, [f for f in CPU_FLAGS if f in flags]


def machine(device: str) -> dict:
    """Which machine a run ran on: ratios of speed or energy are only taken between runs of one machine.

    host and boot_id tell two leases of the same host apart (a reboot is a new machine for timing);
    gpu_uuid tells GPUs apart where one host has several; cpu_model/cpu_flags say which CPU kernels ran.
    """
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    cpu_model, cpu_flags = _cpu_info()
    out = {"host": platform.node(), "boot_id": boot_id, "cpu_model": cpu_model, "cpu_flags": cpu_flags,
           "gpu_uuid": None, "gpu_index": None}
    if str(device).startswith("cuda"):
        from helpers.training.telemetry import Nvml

        nvml = Nvml(device)
        if nvml.handle is not None:
            try:
                uuid = nvml.nvml.nvmlDeviceGetUUID(nvml.handle)
                out["gpu_uuid"] = uuid.decode() if isinstance(uuid, bytes) else uuid
                out["gpu_index"] = nvml.nvml.nvmlDeviceGetIndex(nvml.handle)  # NVML's (PCI bus order), as nvidia-smi
            except Exception:
                pass
    return out


# --- the run record, as the training notebook builds it ------------------------------------------


def start(config: dict) -> dict:
    """A run record in progress: config, derived id, sidecar path, environment; metrics fill in later."""
    device = resolve_device(config["device"])
    rid = config["run_id"] or run_id(config)
    out = Path(config["output_dir"])
    out = out if out.is_absolute() else PROJECT_ROOT / out
    return {
        "run_id": rid,
        "status": "running",
        "error": None,
        "device": device,
        "sidecar": str(out / f"{rid}.json"),
        "config": dict(config),
        "environment": environment(device, init_cuda=config.get("num_gpus", 1) == 1),
        "metrics": {},
        "history": [],
    }


BUDGET_NOTE = ("emulated: torch's caching allocator capped at vram_budget_gib on a larger card; the CUDA context "
               "and non-torch memory (cuBLAS, bitsandbytes paged) are outside the cap, so a real card of this size "
               "has less room (compare peak_process_est_gib = peak reserved + non-torch with the budget)")


def apply_vram_budget(run: dict) -> None:
    """Emulate a smaller GPU: cap torch's caching allocator at vram_budget_gib (before the model loads).

    This caps only torch's allocator: the CUDA context and bitsandbytes' paged memory are outside it,
    which is why NVML's used memory is recorded beside torch's peaks. The sidecar says it is an emulation.
    """
    budget = run["config"]["vram_budget_gib"]
    run["metrics"]["vram_budget_emulated"] = bool(budget)
    if not budget:
        return
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if budget * 2**30 > total:
        raise ValueError(f"vram_budget_gib={budget!r} is more than this card's {total / 2**30:.1f} GiB: "
                         "use a smaller budget, or 0 for the whole card")
    torch.cuda.set_per_process_memory_fraction(budget * 2**30 / total)
    run["metrics"]["vram_budget_note"] = BUDGET_NOTE


def record_memory(run: dict, steps=None) -> None:
    """Memory figures into run["metrics"]: torch peaks, NVML peaks, non-torch memory, and for a budget
    whether the whole process (context included) would have fitted a real card of that size."""
    from helpers.training.telemetry import memory_peaks

    m = run["metrics"]
    m.update(memory_peaks(run["device"], steps.nvml if steps else None, steps.history if steps else ()))
    record_budget(run)


def record_budget(run: dict) -> None:
    """For a VRAM budget: whether torch's reserve stayed within it (the allocator cap held) and whether the whole
    process, CUDA context and libraries included, would have fitted a real card of that size. A sharded run's plain
    keys hold its fullest GPU's figures (sharded.aggregate), so the verdict is that card's."""
    m, budget = run["metrics"], run["config"]["vram_budget_gib"]
    if budget and m.get("peak_reserved_gib") is not None:
        m["peak_reserved_within_budget"] = m["peak_reserved_gib"] <= budget
        used = m.get("peak_process_est_gib")  # a real card of this size must hold the context too
        m["process_within_budget"] = None if used is None else used <= budget


class guard:
    """Context manager for a notebook step: on any failure record status oom|error, write the sidecar, re-raise.

    An out-of-memory is a result (the feasibility finding), so it is written like any other outcome.
    """

    def __init__(self, run: dict, steps=None):
        self.run, self.steps = run, steps

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, KeyboardInterrupt):
            return False
        self.run["status"] = "oom" if is_oom(e) else "error"
        self.run["error"] = f"{type(e).__name__}: {e}"[:4000]
        if self.steps is not None:
            self.run["history"] = self.steps.history
        try:
            record_memory(self.run, self.steps)
        except Exception:
            pass
        write_sidecar(self.run["sidecar"], _record(self.run))
        _drop_progress(self.run)
        return False


def _record(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "sidecar"}


def _drop_progress(run: dict) -> None:
    """The sidecar holds the whole history now: the progress file has done its work."""
    try:
        progress_path(run["sidecar"]).unlink(missing_ok=True)
    except OSError:
        pass


def finish(run: dict) -> Path:
    run["status"] = "ok"
    path = write_sidecar(run["sidecar"], _record(run))
    _drop_progress(run)
    return path


SUMMARY_KEYS = [
    ("status", "status"), ("params_trainable", "trainable params"), ("params_total", "total params"),
    ("weights_gib", "weights (GiB)"), ("load_s", "load (s)"), ("train_s", "train (s)"),
    ("step_time_median_s", "median step (s)"), ("tokens_per_s", "tokens/s (steady steps)"),
    ("tokens_per_s_window", "tokens/s (steady window, between-step work included)"),
    ("peak_rss_gib", "peak RSS (GiB)"), ("peak_allocated_gib", "peak allocated (GiB)"),
    ("peak_reserved_gib", "peak reserved (GiB)"), ("peak_nvml_process_used_gib", "peak NVML process used (GiB)"),
    ("non_torch_peak_gib", "non-torch incl. CUDA context (GiB)"), ("peak_process_est_gib", "process peak est. (GiB)"),
    ("vram_budget_emulated", "VRAM budget emulated"),
    ("energy_j_per_1k_tokens", "energy (J / 1k tokens)"),
    ("ppl_before", "perplexity before"), ("ppl_after", "perplexity after"),
]


def cell(value, spec: str) -> str:
    """A printed table's cell: value in format spec, or '-' where it was not measured (None)."""
    return "-" if value is None else format(value, spec)


def summary_table(run: dict):
    """One readable table of the run's headline figures (None = not measured on this device)."""
    import pandas as pd

    m = {**run["metrics"], "status": run["status"]}
    keys = SUMMARY_KEYS
    if m.get("synthetic"):  # random weights on random tokens: recorded, never a quality figure
        keys = [(k, f"{label} (synthetic: not quality)" if k.startswith("ppl_") else label) for k, label in keys]
    rows = [(label, m.get(key)) for key, label in keys]
    return pd.DataFrame(rows, columns=["measure", run["run_id"]]).set_index("measure")

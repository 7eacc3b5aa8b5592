"""Run a sweep: a grid of configurations, each executed as the training notebook by papermill.

    python -m helpers.sweep parameters/default.yaml [--dry-run] [--force] [--no-report] [--jobs N]
                            [--devices 0,1,...|none] [--cluster local|ADDRESS]

Every configuration runs in a fresh kernel (clean memory figures) into
reports/local/<name>/runs/<run_id>.ipynb (this machine's runs; git ignores reports/local/); the notebook writes
<run_id>.json last. The report then sets each configuration beside the published reference reports/<name>/
(helpers/analysis/reference.py); `python -m helpers.publish reports/local/<name>` makes these runs the reference. A run
with a sidecar of status ok or oom and a notebook that reads back whole is finished and skipped on a re-run;
anything else is redone. While a run trains, its step and time left are printed every 30 s.

Exit status: 0 every run ok or oom; 1 a run ended in error (or the report failed); 2 refused before
anything ran; 3 stopped because a file could not be written (disk full, no permission); 130 Ctrl-C
(the run in progress is recorded as unfinished, summary.csv is written).

--devices 0,1,... runs one configuration per GPU at a time, every GPU busy: a queue hands the next configuration to
the first device that is free, each kernel pinned to its GPU with CUDA_VISIBLE_DEVICES=<index> (and
CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA's index is NVML's and the sidecar's gpu_uuid is the pinned GPU's). The default
is every GPU this machine shows (CUDA_VISIBLE_DEVICES if set, else NVML's list; torch is not imported); a machine
with none, a sweep whose runs say device: cpu, or --devices none runs as before: one run at a time, unpinned. Each
run has its GPU to itself, so its costs are its own (side_by_side 1); the analysis still takes cost ratios only
between runs of one GPU (machine = host, boot, GPU UUID), so a lever sweep whose ratios matter runs on one device.
A broken GPU fails each run the queue gives it: those are errors, redone by the next sweep (leave it out with
--devices). Runs with num_gpus > 1 (FSDP) take several GPUs each: without --devices they run one at a time, every
GPU visible to them; --devices refuses them. Runs across machines: --cluster (helpers/sweeps/cluster.py, Ray).

--jobs N runs N configurations side by side (one kernel each) on the same device (with --devices: N per GPU). That
is for quality sweeps of small models: perplexity stays valid, but time, throughput, energy and device memory are
then shared by N processes and are not figures of one run. Every sidecar records side_by_side (its N), and the
analysis says so beside every cost chart of such a sweep. Each kernel gets cores // N CPU threads (with --devices:
cores // (GPUs x N); OMP_NUM_THREADS, unless already set), recorded as cpu_threads.
"""
import argparse
import ast
import concurrent.futures
import errno
import functools
import itertools
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

from helpers.sweeps import cluster
from helpers.records.gpus import pinned, visible_gpus
from helpers.sweeps.kernels import kernel_manager_class
from helpers.records.paths import LOCAL_REPORTS, PROJECT_ROOT
from helpers.sweeps.report import build_report
from helpers.records.params import run_id, type_problem
from helpers.records.sidecars import (FINISHED, is_oom, notebook_problem, progress_path, read_sidecar, varying, write_plan,
                       write_sidecar, write_summary)

TRAIN_NOTEBOOK = PROJECT_ROOT / "notebooks" / "01_train.ipynb"
SWEEP_KEYS = {"name", "description", "notebook", "base", "grid", "repeats"}
SIDE_BY_SIDE_ENV = "QLORA_STUDY_SIDE_BY_SIDE"  # how many runs share the device; recorded in every sidecar


class SweepError(ValueError):
    """A sweep file that cannot run; raised before any run starts."""


def notebook_parameters(notebook=TRAIN_NOTEBOOK) -> dict:
    """{name: {"type": str|int|float|bool, "default": value, "help": comment}} from the parameters cell."""
    import papermill

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} not found")
    types = {"str": str, "int": int, "float": float, "bool": bool}
    out = {}
    for name, p in papermill.inspect_notebook(str(notebook)).items():
        out[name] = {"type": types[p["inferred_type_name"]], "default": ast.literal_eval(p["default"]), "help": p["help"]}
    return out


# set by the runner for every run, refused in base: as in grid:, each with what to use instead
RUNNER_KEYS = {"seed": "use repeats (seeds 0..repeats-1)",
               "output_dir": "runs go to <reports>/<name>/runs: set the sweep's name, or --reports",
               "run_id": "each run's id is derived from its parameters"}


def _check_value(where: str, key: str, value, params: dict) -> None:
    if key not in params:
        raise SweepError(f"{where}: unknown parameter {key!r}; the notebook's parameters are {sorted(params)}")
    if key in RUNNER_KEYS:
        raise SweepError(f"{where}: {key} is set by the runner ({RUNNER_KEYS[key]})")
    problem = type_problem(key, value, params[key]["type"])
    if problem:
        raise SweepError(f"{where}: {problem}")


def load_sweep(path, reports_root=None) -> dict:
    """Read and check a sweep file; every problem is raised here, before anything runs."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: expected a mapping with keys {sorted(SWEEP_KEYS)}")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    name = spec.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name == LOCAL_REPORTS.name:
        raise SweepError(f"{path}: name={name!r} must be a folder name (reports/<name>/), not "
                         f"{LOCAL_REPORTS.name!r} (the folder of this machine's runs)")
    notebook = Path(spec.get("notebook") or TRAIN_NOTEBOOK)
    notebook = notebook if notebook.is_absolute() else PROJECT_ROOT / notebook
    if not notebook.is_file():
        raise SweepError(f"{path}: notebook {notebook} not found")
    params = notebook_parameters(notebook)
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"{path}: base must be a mapping of parameter: value")
    for k, v in base.items():
        _check_value(f"{path} base", k, v, params)
    grid = spec.get("grid")
    grids = grid if isinstance(grid, list) else [grid]
    if not grid or not all(isinstance(g, dict) and g for g in grids):
        raise SweepError(f"{path}: grid is empty; give parameter: [values] (or a list of such mappings)")
    for g in grids:
        for k, values in g.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{path} grid: {k} must be a non-empty list of values, got {values!r}")
            for v in values:
                _check_value(f"{path} grid", k, v, params)
    repeats = spec.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise SweepError(f"{path}: repeats={repeats!r} must be a whole number >= 1")
    return {"name": name, "notebook": notebook, "params": params, "base": base, "grids": grids, "repeats": repeats,
            "folder": Path(reports_root or LOCAL_REPORTS) / name}


def expand(sweep: dict) -> list[dict]:
    """Union of the cartesian products of the grid(s), times seeds 0..repeats-1; duplicates dropped."""
    defaults = {k: p["default"] for k, p in sweep["params"].items()}
    out, seen = [], set()
    for g in sweep["grids"]:
        keys = list(g)
        for values in itertools.product(*(g[k] for k in keys)):
            for seed in range(sweep["repeats"]):
                cfg = {**defaults, **sweep["base"], **dict(zip(keys, values)), "seed": seed,
                       "output_dir": str(sweep["folder"] / "runs"), "run_id": ""}
                rid = run_id(cfg)
                if rid not in seen:
                    seen.add(rid)
                    out.append({**cfg, "run_id": rid})
    return out


def record_plan(path, reports_root=None) -> Path:
    """Write a sweep file's plan record (plan.json) into its folder and run nothing: for a folder filled before
    sweeps recorded their plan (run_sweep writes it itself when it starts). Returns the record's path."""
    sweep = load_sweep(path, reports_root)
    return write_plan(sweep["folder"], path, expand(sweep))


def run_state(cfg: dict) -> str:
    """ok | oom | error | unfinished | corrupt | incomplete | missing, from the run's sidecar and notebook.

    incomplete: the sidecar says ok or oom but the executed notebook does not read back whole (a full disk
    cut it): not a result, so a re-run redoes it."""
    path = Path(cfg["output_dir"]) / f"{cfg['run_id']}.json"
    if not path.exists():
        return "missing"
    try:
        status = read_sidecar(path)["status"]
    except ValueError:
        return "corrupt"
    if status in FINISHED and notebook_problem(path.with_suffix(".ipynb")):
        return "incomplete"
    return status


# A write that fails for one of these reasons fails for every later run too: the sweep stops with one line.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: what, where, and what to do."""
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write{where}: {what}; the disk is full: free space (or pick another --reports folder) and re-run"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write{where}: {what}; give yourself write access there or pick another --reports folder, "
                "then re-run")
    return f"{what}{where}"


def _record(cfg: dict, status: str, text: str, metrics: dict | None = None) -> str:
    """Write the run's sidecar as `status` with `text` as its error, keeping what the notebook had recorded
    (measurements, history, environment) if its own sidecar reads. If even that write fails, the sidecar is
    removed, so the run is redone on a re-run, and the OSError is raised (the sweep stops)."""
    path = Path(cfg["output_dir"]) / f"{cfg['run_id']}.json"
    try:
        record = read_sidecar(path)
    except ValueError:
        record = {"run_id": cfg["run_id"], "config": cfg, "environment": {}, "metrics": {}, "history": []}
    record.update(status=status, error=text[:4000])
    record["metrics"] = {**(record.get("metrics") or {}), **(metrics or {})}
    try:
        write_sidecar(path, record)
    except OSError:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    return status


def _record_failure(cfg: dict, e: BaseException) -> str:
    """The notebook failed without writing its own sidecar (e.g. a crash outside a guarded step)."""
    text = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
    return _record(cfg, "oom" if is_oom(text) else "error", text)


# --- the kernel: its exit status, its memory, its progress ---------------------------------------

# The kernel this process runs now (one run at a time per process): "exit", its exit status once it has died
# (-9 = SIGKILL); "stop", set on Ctrl-C (or a side-by-side worker's SIGTERM) so the kernel is shut down at once.
_KERNEL = {}


@functools.cache
def _kernel_manager_class():
    """papermill's kernel manager, keeping the kernel's exit status for execute (a kernel that dies leaves
    nbclient's DeadKernelError, which does not say how), and stopping it at once when the run is interrupted
    (a graceful shutdown of a kernel busy training prints a traceback of its own)."""
    class KernelManager(kernel_manager_class()):
        async def cleanup_resources(self, restart=False):
            process = getattr(self.provisioner, "process", None)
            if process is not None and process.poll() is not None:
                _KERNEL["exit"] = process.returncode
            await super().cleanup_resources(restart)

        async def shutdown_kernel(self, now=False, restart=False):
            await super().shutdown_kernel(now=now or bool(_KERNEL.get("stop")), restart=restart)

    return KernelManager


def _interrupt(signum, frame):
    _KERNEL["stop"] = True
    # the run is being stopped on purpose: nbclient's task for the cell then fails with DeadKernelError, which
    # nothing awaits any more, and asyncio would log it as a traceback ("Task exception was never retrieved")
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    raise KeyboardInterrupt


def oom_kill_count() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed since boot (/proc/vmstat oom_kill,
    Linux >= 4.13); None where the system does not say."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


PROGRESS_POLL_S = 1.0
PROGRESS_EVERY_ENV = "QLORA_STUDY_PROGRESS_EVERY_S"  # seconds between a run's progress lines (default 30)


class KernelWatch:
    """While a run executes: read its progress file (telemetry.ProgressFile) and sample the kernel's resident
    memory and the host's available memory every second, in a thread. `say` gets a progress line for the
    sweep's output at most every QLORA_STUDY_PROGRESS_EVERY_S seconds (30) when the step has moved."""

    def __init__(self, progress_path: Path, say=None):
        self.path, self.say = progress_path, say
        self.every_s = float(os.environ.get(PROGRESS_EVERY_ENV, "30"))
        self.progress, self.rss_last, self.rss_peak, self.available = None, None, None, None
        self._said_step, self._said_at = None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()  # the last word: the progress file and memory as the run ended

    def _loop(self):
        while not self._stop.wait(PROGRESS_POLL_S):
            try:
                self.sample()
                self._maybe_say()
            except Exception:  # a progress line is never worth a failed run
                pass

    def sample(self) -> None:
        import psutil

        try:
            self.progress = json.loads(self.path.read_text())
        except (OSError, ValueError):
            pass
        try:
            for child in psutil.Process().children():
                if any("ipykernel" in part for part in child.cmdline()):
                    rss = child.memory_info().rss / 2**30
                    self.rss_last, self.rss_peak = rss, max(rss, self.rss_peak or 0.0)
            self.available = psutil.virtual_memory().available / 2**30
        except psutil.Error:
            pass

    def where(self) -> str:
        """' at step 12/30' if training had begun, else ''."""
        p = self.progress or {}
        return f" at step {p['step']}/{p['max_steps']}" if "step" in p else ""

    def _maybe_say(self) -> None:
        p = self.progress or {}
        step, total = p.get("step"), p.get("max_steps")
        if self.say is None or not step or step == self._said_step:
            return
        now = time.monotonic()
        if self._said_at is not None and now - self._said_at < self.every_s:
            return
        left = p["elapsed_s"] / step * (total - step)
        mem = f", kernel {self.rss_last:.2f} GiB resident" if self.rss_last is not None else ""
        self.say(f"    step {step}/{total} ({step / total:.0%}), ~{_fmt(left)} left in this run{mem}")
        self._said_step, self._said_at = step, now

    def memory(self) -> tuple[str, dict]:
        """The memory figures a killed kernel leaves: a sentence and sidecar metrics. The kernel's resident
        memory is the last one it reported (progress file, each step) or the sweep sampled (each second):
        the figure at its death was at least that."""
        import psutil

        total = psutil.virtual_memory().total / 2**30
        last = self.rss_last if self.rss_last is not None else (self.progress or {}).get("rss_gib")
        text = f"host RAM {total:.1f} GiB"
        if last is not None:
            text += f"; the kernel's resident memory last seen {last:.2f} GiB (highest sample {self.rss_peak or last:.2f} GiB)"
        if self.available is not None:
            text += f"; host memory available at the last sample {self.available:.2f} GiB"
        metrics = {"host_total_gib": total, "kernel_rss_last_gib": last, "kernel_rss_peak_sampled_gib": self.rss_peak,
                   "host_available_last_gib": self.available}
        return text, metrics


def dead_kernel_outcome(exit_status, oom_kills_before, oom_kills_after, where: str, memory: str):
    """(status, error text) for a kernel that died. Evidence, and its limits:

    - exit status -9 (SIGKILL) and the system's oom_kill count rose during the run: the out-of-memory killer
      took the kernel, a result ("oom", out of memory (host)). The count is system-wide: another process
      killed by it in the same window would read the same, and the kernel is the usual victim (largest RSS);
    - SIGKILL with the count unchanged: killed by someone or something else (kill -9, a job limit): "error";
    - SIGKILL where the system keeps no count: "error", saying the OOM killer is only the likely cause;
    - any other exit: "error" naming the signal or the exit code.
    """
    if exit_status is None:
        return "error", f"the kernel died{where} (exit status unknown); {memory}"
    if exit_status >= 0:
        return "error", f"the kernel exited with status {exit_status}{where}; {memory}"
    sig = -exit_status
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
    if sig != signal.SIGKILL:
        return "error", f"the kernel died of {name}{where}; {memory}"
    if oom_kills_before is None or oom_kills_after is None:
        return "error", (f"the kernel was killed by SIGKILL{where}: the system's out-of-memory killer is the usual cause, "
                         f"but this system does not count its kills (/proc/vmstat oom_kill); {memory}")
    if oom_kills_after > oom_kills_before:
        return "oom", (f"out of memory (host): the kernel was killed by the system's out-of-memory killer{where} "
                       f"(SIGKILL; oom_kill count +{oom_kills_after - oom_kills_before}); {memory}")
    return "error", (f"the kernel was killed by SIGKILL{where}, not by the out-of-memory killer (its kill count did "
                     f"not change): a kill -9 or a job limit?; {memory}")


def execute(sweep: dict, cfg: dict, say=None) -> str:
    """Run one configuration in a fresh kernel; return its status. Failures are results, not crashes.

    The run is ok only if its sidecar says so and its executed notebook reads back whole. A dead kernel is
    classified by dead_kernel_outcome. Ctrl-C writes the run as `unfinished` and re-raises. A write that fails
    for want of space or permission is recorded as an error if it can be, then raised (the sweep stops).
    `say` gets progress lines while the run trains (KernelWatch)."""
    import papermill

    folder = Path(cfg["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    sidecar = folder / f"{cfg['run_id']}.json"
    notebook = folder / f"{cfg['run_id']}.ipynb"
    progress = progress_path(sidecar)
    sidecar.unlink(missing_ok=True)  # an old result must not survive a redo that is killed midway
    progress.unlink(missing_ok=True)
    params = {k: v for k, v in cfg.items() if k in sweep["params"]}
    _KERNEL.clear()
    oom_kills = oom_kill_count()
    failure = None
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _interrupt) if main_thread else None
    with KernelWatch(progress, say) as watch:
        try:
            papermill.execute_notebook(str(sweep["notebook"]), str(notebook), parameters=params,
                                       cwd=str(PROJECT_ROOT), progress_bar=False,
                                       kernel_manager_class=_kernel_manager_class())
        except KeyboardInterrupt:
            watch.sample()  # the step reached
            try:
                _record(cfg, "unfinished", f"interrupted (Ctrl-C){watch.where()}: re-run the sweep to redo this run")
            except OSError:
                pass
            raise
        except Exception as e:  # the notebook raised (papermill marks the cell), the kernel died, a write failed
            failure = e
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
            watch.sample()  # the step and memory as the run ended, before the file goes
            try:
                progress.unlink(missing_ok=True)  # the sidecar is the record now
            except OSError:
                pass
    if isinstance(failure, OSError) and failure.errno in STORAGE_ERRNOS:
        if not failure.filename:  # papermill's write says what failed, not where
            failure = OSError(failure.errno, failure.strerror, str(notebook))
        _record(cfg, "error", f"the executed notebook could not be written: {describe_os_error(failure)}")
        raise failure
    if failure is not None and not isinstance(failure, papermill.PapermillExecutionError):
        memory, metrics = watch.memory()
        if "exit" in _KERNEL or type(failure).__name__ == "DeadKernelError":
            status, text = dead_kernel_outcome(_KERNEL.get("exit"), oom_kills, oom_kill_count(), watch.where(), memory)
            return _record(cfg, status, text, metrics)
        text = f"{type(failure).__name__}: {failure}"
        return _record(cfg, "oom" if is_oom(text) else "error", text)
    try:
        status = read_sidecar(sidecar)["status"]
    except ValueError as e:
        if failure is not None:  # the notebook raised outside a guarded step: no sidecar of its own
            return _record_failure(cfg, failure)
        return _record(cfg, "error", f"the notebook ended without a readable sidecar ({e})")
    problem = notebook_problem(notebook)
    if problem:
        return _record(cfg, "error", f"{notebook}: {problem} (a full disk?); the run itself ended {status}")
    return status


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


_IN_RUN = threading.Event()  # a side-by-side worker is inside execute (SIGTERM then means: stop this run)


def _stop_worker(signum, frame):
    if _IN_RUN.is_set():
        _interrupt(signum, frame)  # execute records the run as unfinished
    sys.exit(0)


def _side_by_side_worker(jobs: int, workers: int) -> None:
    os.environ[SIDE_BY_SIDE_ENV] = str(jobs)  # the kernels papermill starts inherit it
    # Each kernel would otherwise start one CPU thread per core: N kernels x all cores threads on one machine.
    # Share the cores out as torchrun does for several processes a node (a value the user set is kept).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    # Ctrl-C at a terminal reaches the whole process group: the parent alone handles it and stops the workers
    # with SIGTERM, so each records its run as unfinished and none dies with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)


def _execute_in_worker(sweep: dict, cfg: dict, device: str | None) -> str:
    _IN_RUN.set()
    try:
        with pinned(device):
            return execute(sweep, cfg)
    finally:
        _IN_RUN.clear()


# --- devices: one run per GPU ----------------------------------------------------------------------------------

def choose_devices(devices, configs: list[dict]) -> list[str] | None:
    """The GPUs the runs go to, one run per GPU at a time; None: one run at a time, unpinned, as on a CPU.

    devices: None (every visible GPU, where the runs can use one), "none", or a list / comma-separated string of
    CUDA_VISIBLE_DEVICES entries, each of which must be visible here. SweepError names a bad one."""
    wanted = {c["device"] for c in configs}
    gpu_runs = wanted <= {"auto", "cuda", "cuda:0"}  # a pinned kernel sees its GPU as cuda:0
    several = sorted({c.get("num_gpus", 1) for c in configs} - {1})  # FSDP runs: each takes num_gpus GPUs
    if devices is None:
        found = visible_gpus()
        return found if found and gpu_runs and not several else None
    if isinstance(devices, str):
        if devices.strip().lower() == "none":
            return None
        devices = [d for d in devices.split(",") if d.strip()]
    devices = [str(d).strip() for d in devices]
    if not devices:
        raise SweepError("--devices is empty: give GPU indices such as 0,1 (or none: one run at a time, unpinned)")
    if len(set(devices)) != len(devices):
        raise SweepError(f"--devices {','.join(devices)} names a GPU twice; to run several runs on one GPU use --jobs N")
    found = visible_gpus()
    unknown = [d for d in devices if d not in found]
    if unknown:
        where = f"this machine's GPUs are {','.join(found)}" if found else "this machine shows no GPU (NVML finds none)"
        raise SweepError(f"--devices: {','.join(unknown)} not found; {where}"
                         + (" (CUDA_VISIBLE_DEVICES limits them)" if "CUDA_VISIBLE_DEVICES" in os.environ else ""))
    if several:
        raise SweepError(f"this sweep has runs with num_gpus {several}: each takes that many GPUs, and --devices gives "
                         "a run one GPU; leave --devices out (one run at a time, every GPU visible to it) or use "
                         "--cluster (each run asks for num_gpus GPUs of one node)")
    if not gpu_runs:
        raise SweepError(f"--devices pins runs to GPUs, but this sweep's runs ask for device {sorted(wanted)}: use "
                         "device auto or cuda (each pinned kernel sees its GPU as cuda:0), or leave --devices out")
    return devices


PREDICTION_NOTE = ("  pred: the peak GPU memory per GPU that helpers/fit/ predicts (a prediction, not a measurement; "
                   "what torch's allocator needs, and the CUDA context and libraries beside it): with num_gpus N > 1, FSDP's sharded terms (weights, "
                   "adapters, their gradients, optimizer state) are divided by N, with fsdp_cpu_offload they are in "
                   "host memory; activations are not sharded. 'fits' compares the first with vram_budget_gib, an allocator cap.")


def per_gpu_predictions(configs: list[dict]) -> list[str]:
    """'  | pred 14.2 GiB/GPU, fits 24 GiB' for each configuration helpers.fit can predict (a registry model or a
    local folder, on a GPU), '' for the others (device cpu, a hub id: the dry run reads no network)."""
    from helpers import fit
    from helpers.records import registry

    out = []
    for c in configs:
        model = str(c.get("model"))
        known = model in registry.SYNTHETIC or model in registry.EMBEDDED or Path(model).expanduser().is_dir()
        if c.get("device") == "cpu" or not known:
            out.append("")
            continue
        try:
            p = fit.predict_per_gpu({k: c[k] for k in fit.DEFAULTS if k in c}, c.get("num_gpus", 1),
                                    bool(c.get("fsdp_cpu_offload", False)))
        except (ValueError, OSError) as e:  # a setting or shape the predictor does not know
            out.append(f"  | no prediction ({str(e)[:80]})")
            continue
        fits = f", {'fits' if p['fits_budget'] else 'over'} {c['vram_budget_gib']:g} GiB" if c.get("vram_budget_gib") else ""
        out.append(f"  | pred {p['needs_under_cap_gib']:.1f} GiB/GPU + {p['outside_torch_gib']:.1f} outside torch{fits}")
    return out


def _label(c: dict, show: list) -> str:
    return " ".join(f"{k}={c[k]}" for k in show)


def _run_one_at_a_time(sweep, configs, todo, states, show, out, t0) -> None:
    """Run `todo` in order, one fresh kernel at a time; print each start (with time left), the running run's
    step now and then, and each outcome."""
    done = 0
    say = lambda line: print(line, file=out, flush=True)  # noqa: E731
    for i, c in enumerate(configs, 1):
        if c not in todo:
            print(f"[{i}/{len(configs)}] skip {c['run_id']} ({states[c['run_id']]}) {_label(c, show)}", file=out,
                  flush=True)
            continue
        redo = f" (redo: was {states[c['run_id']]})" if states[c["run_id"]] not in ("missing",) else ""
        elapsed = time.perf_counter() - t0
        eta = f", ~{_fmt(elapsed / done * (len(todo) - done))} left" if done else ""
        print(f"[{i}/{len(configs)}] run {c['run_id']}{redo} {_label(c, show)} (elapsed {_fmt(elapsed)}{eta})",
              file=out, flush=True)
        t = time.perf_counter()
        states[c["run_id"]] = execute(sweep, c, say)
        done += 1
        print(f"    -> {states[c['run_id']]} in {_fmt(time.perf_counter() - t)}", file=out, flush=True)


def _list_skipped(configs, todo, states, out) -> dict:
    """Print the finished runs a sweep skips; return each run's place in the sweep (run id -> i of N)."""
    index = {c["run_id"]: i for i, c in enumerate(configs, 1)}
    for c in configs:
        if c not in todo:
            print(f"[{index[c['run_id']]}/{len(configs)}] skip {c['run_id']} ({states[c['run_id']]})", file=out, flush=True)
    return index


def _say_outcome(c, status, where, show, index, n_configs, done, n_todo, t0, out) -> None:
    """'[i/N] <status> <run id><where> <label> (done/todo done, elapsed, ~time left)' for a run that has ended."""
    elapsed = time.perf_counter() - t0
    left = f", ~{_fmt(elapsed / done * (n_todo - done))} left" if done < n_todo else ""
    print(f"[{index[c['run_id']]}/{n_configs}] {status} {c['run_id']}{where} {_label(c, show)} "
          f"({done}/{n_todo} done, elapsed {_fmt(elapsed)}{left})", file=out, flush=True)


def _run_side_by_side(sweep, configs, todo, states, show, slots, out, t0) -> None:
    """Run `todo` in one worker process per slot, feeding each configuration to the first free slot; print each
    start (with its device) and each outcome, with i/N and time left. A slot is a device (a CUDA_VISIBLE_DEVICES
    entry; None: unpinned) that one run holds at a time; --jobs N gives a device N slots."""
    index = _list_skipped(configs, todo, states, out)
    on = lambda device: f" on GPU {device}" if device is not None else ""  # noqa: E731
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or CUDA state
    jobs = max(slots.count(d) for d in slots)  # runs that share one device
    pool = concurrent.futures.ProcessPoolExecutor(len(slots), mp_context=ctx, initializer=_side_by_side_worker,
                                                  initargs=(jobs, len(slots)))
    queue, free, running = list(todo), list(slots), {}
    try:
        done = 0
        while queue or running:
            while queue and free:  # the next configuration to the first free device
                c, device = queue.pop(0), free.pop(0)
                running[pool.submit(_execute_in_worker, sweep, c, device)] = (c, device)
                print(f"[{index[c['run_id']]}/{len(configs)}] run {c['run_id']}{on(device)} {_label(c, show)}",
                      file=out, flush=True)
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in finished:
                c, device = running.pop(f)
                free.append(device)
                try:
                    states[c["run_id"]] = f.result()
                except OSError as e:
                    if e.errno in STORAGE_ERRNOS:
                        raise
                    states[c["run_id"]] = _record_failure(c, e)
                except Exception as e:  # the worker process itself died
                    states[c["run_id"]] = _record_failure(c, e)
                done += 1
                _say_outcome(c, states[c["run_id"]], on(device), show, index, len(configs), done, len(todo), t0, out)
    except BaseException:  # Ctrl-C or a full disk: stop the runs in flight, each records itself as unfinished
        for process in list((pool._processes or {}).values()):
            try:
                process.terminate()
            except OSError:
                pass
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_on_cluster(sweep, configs, todo, states, show, address, out, t0) -> None:
    """Run `todo` on a Ray cluster (helpers/sweeps/cluster.py); print each outcome with its node, i/N and time left."""
    index = _list_skipped(configs, todo, states, out)
    if not todo:
        return
    done = 0

    def outcome(c, status, where):
        nonlocal done
        states[c["run_id"]], done = status, done + 1
        _say_outcome(c, status, where, show, index, len(configs), done, len(todo), t0, out)

    # Ray sends execute to the nodes by its module's name: helpers.sweep's, also when this file runs as __main__
    from helpers.sweeps import sweep as runner

    cluster.run_on_ray(sweep, todo, address, runner.execute, _record, outcome, out, SIDE_BY_SIDE_ENV)


class SweepFault(RuntimeError):
    """The sweep stopped early: a file could not be written (full disk, no permission). Runs done are kept."""


class ReportError(RuntimeError):
    """Every run ran, but the analysis notebook of the report failed."""


def _done(states: dict) -> int:
    return sum(s in FINISHED for s in states.values())


def _summary_best_effort(folder) -> Path | None:
    try:
        return write_summary(folder)
    except OSError:
        return None


def run_sweep(path, dry_run: bool = False, force: bool = False, report: bool = True, reports_root=None,
              out=None, jobs: int = 1, devices=None, cluster: str | None = None) -> dict:
    """Check the sweep file, then run every configuration not yet finished; return {run_id: status}.

    jobs > 1 runs that many side by side (see the module docstring for what that does to cost figures).
    devices: the GPUs, one run each at a time (choose_devices; default every visible GPU, none on a CPU machine).
    cluster: a Ray cluster's address, or "local" (helpers/sweeps/cluster.py); the runs' files come back to this machine.
    Ctrl-C: the run in progress is recorded as unfinished, summary.csv is written, "interrupted: N of M runs
    done" is printed and KeyboardInterrupt raised. A write that fails for want of space or permission raises
    SweepFault (one line: what, where, and how many runs are done)."""
    from filelock import FileLock, Timeout

    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise SweepError(f"jobs={jobs!r} must be a whole number >= 1 (1 = one run at a time)")
    out = out or sys.stdout
    sweep = load_sweep(path, reports_root)
    configs = expand(sweep)
    from helpers.training.runs import validate

    types = {k: p["type"] for k, p in sweep["params"].items()}
    for cfg in configs:  # every configuration is checked before the first one runs
        try:
            validate(cfg, here=not dry_run, types=types)
        except (ValueError, RuntimeError) as e:  # RuntimeError: bitsandbytes missing for a quantized run
            raise SweepError(f"{path}: run {cfg['run_id']}: {e}") from e
    if cluster is not None:
        if jobs > 1 or devices is not None:
            raise SweepError("--cluster places each run on a free GPU (or CPU) of the cluster itself: leave out "
                             "--jobs and --devices")
        gpus = None
    else:
        gpus = choose_devices(devices, configs)
    show = varying(configs)
    states = {c["run_id"]: run_state(c) for c in configs}
    todo = [c for c in configs if force or states[c["run_id"]] not in FINISHED]
    print(f"sweep {sweep['name']}: {len(configs)} runs, {len(configs) - len(todo)} finished, {len(todo)} to run "
          f"-> {sweep['folder']}", file=out, flush=True)
    if gpus:
        print(f"{len(gpus)} GPU(s) ({','.join(gpus)}): {jobs} run(s) per GPU at a time, each kernel pinned with "
              "CUDA_VISIBLE_DEVICES" + ("" if jobs > 1 else "; each run's costs are its own"), file=out, flush=True)
    if dry_run:
        predicted = per_gpu_predictions(configs)
        for i, c in enumerate(configs, 1):
            what = "run" if c in todo else f"skip ({states[c['run_id']]})"
            print(f"  [{i}/{len(configs)}] {what:10} {c['run_id']}  {_label(c, show)}{predicted[i - 1]}", file=out)
        if any(predicted):
            print(PREDICTION_NOTE, file=out)
        return states
    sweep["folder"].mkdir(parents=True, exist_ok=True)
    lock = FileLock(sweep["folder"] / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SweepError(f"another sweep is already running on {sweep['folder']} (lock {lock.lock_file}); "
                         "wait for it to finish or stop it first") from None
    try:
        try:  # what this sweep file plans, for the analysis to say what is missing (it never reads the sweep file)
            write_plan(sweep["folder"], path, configs)
        except OSError as e:
            raise SweepFault(f"{describe_os_error(e)} (nothing ran)") from e
        t0 = time.perf_counter()
        try:
            if jobs > 1:
                print(f"{jobs} runs side by side{' per GPU' if gpus else ''}: perplexity is valid, "
                      "time/throughput/energy/device memory are shared figures, not one run's", file=out, flush=True)
            slots = [d for _ in range(jobs) for d in (gpus or [None])]  # GPUs interleaved: the first runs spread out
            if cluster is not None:
                _run_on_cluster(sweep, configs, todo, states, show, cluster, out, t0)
            elif len(slots) > 1:
                _run_side_by_side(sweep, configs, todo, states, show, slots, out, t0)
            else:
                with pinned(slots[0]):
                    _run_one_at_a_time(sweep, configs, todo, states, show, out, t0)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the summary short
            try:
                states.update({c["run_id"]: run_state(c) for c in configs})
                summary = _summary_best_effort(sweep["folder"])
                print(f"interrupted: {_done(states)} of {len(configs)} runs done, re-run to resume"
                      + (f" (summary {summary})" if summary else ""), file=out, flush=True)
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            raise
        except OSError as e:
            if e.errno not in STORAGE_ERRNOS:
                raise
            states.update({c["run_id"]: run_state(c) for c in configs})
            _summary_best_effort(sweep["folder"])
            raise SweepFault(f"{describe_os_error(e)} ({_done(states)} of {len(configs)} runs done)") from e
        try:
            summary = write_summary(sweep["folder"])
        except OSError as e:
            raise SweepFault(f"{describe_os_error(e)} (all {len(configs)} runs ran; summary.csv not written)") from e
        counts = {s: list(states.values()).count(s) for s in sorted(set(states.values()))}
        print(f"done in {_fmt(time.perf_counter() - t0)}: {counts}; summary {summary}", file=out, flush=True)
        if report:
            import papermill

            try:
                html = build_report(sweep["folder"], summary=False)  # summary.csv: written just above, once
            except papermill.PapermillExecutionError as e:
                raise ReportError(f"the report's analysis notebook failed ({e.ename}: {e.evalue}); its executed copy "
                                  f"is {sweep['folder'] / 'analysis.failed.ipynb'}") from e
            print(f"report: {html}", file=out, flush=True)
    finally:
        lock.release()
    return states


# Exit codes of python -m helpers.sweep (README, "Sweeps"): a script can tell these apart.
EXIT_OK = 0           # every run is ok or oom (an out-of-memory run is a result, not an error)
EXIT_RUN_ERRORS = 1   # the sweep ran to its end, but a run ended in error (summary.csv says why), or the report failed
EXIT_REFUSED = 2      # nothing ran: the sweep file or a value in it was refused, or another sweep holds the folder
EXIT_CANNOT_WRITE = 3  # stopped: a file could not be written (disk full, no permission); finished runs are kept
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it); the run in progress is recorded unfinished


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_file", help="e.g. parameters/default.yaml")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and whether each would run or be skipped")
    ap.add_argument("--force", action="store_true", help="redo every run, finished or not")
    ap.add_argument("--no-report", action="store_true", help="write summary.csv but skip the analysis and HTML")
    ap.add_argument("--reports", default=None, help="reports folder (default: reports/local/, this machine's runs; "
                    "reports/<name>/ is the published reference)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side on one device (quality sweeps only: "
                    "cost figures become shared ones); default 1; with several GPUs, per GPU")
    ap.add_argument("--devices", default=None, help="GPUs to use, one run per GPU at a time, e.g. 0,1,2,3 (default: "
                    "every GPU this machine shows; none: one run at a time, unpinned, as on a CPU)")
    ap.add_argument("--cluster", default=None, metavar="ADDRESS", help="run on a Ray cluster (pip install "
                    "'.[cluster]'): local (a cluster of this machine) or the head's address (auto, host:6379, "
                    "ray://host:10001); each run's files come back here")
    a = ap.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        states = run_sweep(a.sweep_file, dry_run=a.dry_run, force=a.force, report=not a.no_report,
                           reports_root=a.reports, jobs=a.jobs, devices=a.devices, cluster=a.cluster)
    except (SweepError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED  # run_sweep printed "interrupted: N of M runs done" if a run had started
    except SweepFault as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    except OSError as e:
        if e.errno == errno.EPIPE:  # e.g. --dry-run | head: the reader left; not an error of the sweep
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUN_ERRORS
    if a.dry_run:
        return EXIT_OK
    failed = sorted(rid for rid, s in states.items() if s not in FINISHED)
    if failed:
        print(f"error: {len(failed)} of {len(states)} runs ended in error (see the error column of summary.csv): "
              f"{', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}", file=sys.stderr)
        return EXIT_RUN_ERRORS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

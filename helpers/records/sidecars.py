"""The records on disk, readable without torch: one JSON sidecar per run, written atomically and last;
summary.csv, one flat row per sidecar; and plan.json, the runs a sweep plans. The training notebook writes
sidecars (through helpers.runs), the sweep writes the plan; the sweep, the reports and the analysis read them
from here, so a reader never re-parses the writer's inputs (the sweep file, the training notebook).
"""
import json
import math
from pathlib import Path

from helpers.records.files import atomic_write
from helpers.records.paths import shown

SIDECAR_VERSION = 1
FINISHED = ("ok", "oom")  # outcomes that are results (an out-of-memory run is a finding); the rest are redone
PLAN_FILE, PLAN_VERSION = "plan.json", 1


def _clean(x):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_sidecar(path, record: dict) -> Path:
    """Write a run's JSON record atomically (atomic_write): a crash leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"sidecar_version": SIDECAR_VERSION, **_clean(record)}
    return atomic_write(path, lambda f: json.dump(record, f, indent=1, allow_nan=False))


def read_sidecar(path) -> dict:
    """Read one sidecar; raises ValueError naming the file if it is not a complete sidecar."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable sidecar ({e})") from e
    if not isinstance(record, dict) or "status" not in record or "config" not in record:
        raise ValueError(f"{path}: sidecar lacks 'status' or 'config'")
    return record


def notebook_problem(path) -> str | None:
    """None if the executed run notebook reads as a notebook, else why not (truncated, not JSON, ...)."""
    import nbformat

    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as e:  # nbformat raises NotJSONError, ValueError, KeyError, ... for broken files
        return f"executed notebook is not a readable notebook ({type(e).__name__}: {str(e)[:200]})"
    if not isinstance(nb.get("cells"), list):
        return "executed notebook has no cells"
    return None


def progress_path(sidecar) -> Path:
    """<run_id>.progress beside the sidecar: the training step a running kernel has reached, for the sweep's line
    (telemetry.ProgressFile writes it, the sweep reads it; not a result, and not a *.json a reader takes for one)."""
    return Path(sidecar).with_suffix(".progress")


def read_all(folder) -> list[dict]:
    """Every sidecar in a folder; unreadable ones come back as {'status': 'corrupt', 'error': ...}."""
    out = []
    for p in sorted(Path(folder).glob("*.json")):
        try:
            out.append(read_sidecar(p))
        except ValueError as e:
            out.append({"run_id": p.stem, "status": "corrupt", "error": str(e), "config": {}})
    return out


# environment keys that summary.csv carries (env_<key>): what a reader needs to tell machines and stacks apart
ENV_COLUMNS = ("device", "device_name", "device_total_gib", "side_by_side", "torch", "transformers", "peft",
               "bitsandbytes", "host", "boot_id", "gpu_uuid", "cpu_model")


def summary_rows(records: list[dict]) -> list[dict]:
    """One flat row per run (config keys, then metrics, then a few environment keys), failures included."""
    rows = []
    for r in records:
        env = r.get("environment") or {}
        row = {"run_id": r.get("run_id"), "status": r.get("status"), "error": r.get("error")}
        row.update({k: v for k, v in (r.get("config") or {}).items() if k != "run_id"})
        row.update(r.get("metrics") or {})
        row.update({f"env_{k}": env.get(k) for k in ENV_COLUMNS})
        row["env_cpu_flags"] = " ".join(env.get("cpu_flags") or []) or None
        rows.append(row)
    return rows


def write_summary(folder) -> Path:
    """reports/<sweep>/summary.csv from the sidecars in reports/<sweep>/runs (written atomically)."""
    import pandas as pd

    folder = Path(folder)
    df = pd.DataFrame(summary_rows(read_all(folder / "runs")))
    return atomic_write(folder / "summary.csv", df.to_csv(index=False))


# How an out-of-memory reads: torch's OutOfMemoryError by its name, the CUDA runtime ("CUDA error: out of memory";
# bitsandbytes' native code prints "Error out of memory at line ..."), cuBLAS failing to get its workspace, the
# driver API, and the host allocator ("DefaultCPUAllocator: not enough memory").
OOM_PATTERNS = ("out of memory", "cublas_status_alloc_failed", "cudaerrormemoryallocation",
                "cuda_error_out_of_memory", "not enough memory", "outofmemoryerror")


def is_oom(e) -> bool:
    """An exception (or an error text, e.g. a dead kernel's output) that says memory ran out: the outcome is oom,
    a result, not error. torch.OutOfMemoryError is told by its name ('OutOfMemoryError: ...'), so no torch import."""
    if isinstance(e, MemoryError):
        return True
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return any(p in text.lower() for p in OOM_PATTERNS)


# --- the plan: which runs a sweep file plans, recorded by the sweep when it starts ----------------------------

def varying(configs: list[dict]) -> list[str]:
    """Parameters whose value differs between runs (what progress lines show, and how missing runs are grouped)."""
    keys = [k for k in configs[0] if k not in ("run_id", "output_dir")] if configs else []
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def write_plan(folder, sweep_file, configs: list[dict]) -> Path:
    """<folder>/plan.json: the sweep file (as shown, relative to the project when inside it), the keys that vary,
    and every planned run's id and configuration (output_dir left out: it is this machine's path). helpers.sweep
    writes it when a sweep starts; the analysis reads it to say which planned runs have no result yet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"plan_version": PLAN_VERSION, "sweep_file": str(shown(sweep_file)), "varying": varying(configs),
              "runs": [{"run_id": c["run_id"],
                        "config": {k: v for k, v in c.items() if k not in ("run_id", "output_dir")}} for c in configs]}
    return atomic_write(folder / PLAN_FILE, lambda f: json.dump(_clean(record), f, indent=1, allow_nan=False))


def read_plan(folder) -> dict | None:
    """The folder's plan record, or None where there is none (a folder filled before plans were recorded); raises
    ValueError naming the file if it is there but unreadable."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{shown(path)}: not a readable plan record ({e})") from e
    if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list) or "sweep_file" not in plan:
        raise ValueError(f"{shown(path)}: plan record lacks 'runs' or 'sweep_file'")
    return plan


# --- training losses of two runs, compared (the speed levers' equivalence check) ------------------------------

def step_losses(history) -> dict:
    """{step: loss} of a run's history rows (dicts, or a DataFrame with step and loss), logged losses only."""
    rows = history.to_dict("records") if hasattr(history, "to_dict") else history
    return {r["step"]: r["loss"] for r in rows
            if r.get("loss") is not None and not (isinstance(r["loss"], float) and math.isnan(r["loss"]))}


def loss_gap(a, b) -> float | None:
    """Largest relative difference of the training loss at any step both runs logged: a and b are history rows
    (dicts or a DataFrame with step and loss). None when they share no logged step. The study's equivalence check
    for a speed lever: < 1% against the plain run on the same seed and data."""
    la, lb = step_losses(a), step_losses(b)
    common = sorted(set(la) & set(lb))
    return max(abs(la[s] - lb[s]) / abs(la[s]) for s in common) if common else None

"""The run record on disk, readable without torch: one JSON sidecar per run, written atomically and last, and
summary.csv, one flat row per sidecar. The training notebook writes sidecars (through helpers.runs); the sweep,
the reports and the analysis read them from here.
"""
import json
import math
from pathlib import Path

from .files import atomic_write

SIDECAR_VERSION = 1


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

"""Loading and tidying (notebook 02, "The sweep"): a sweep folder's sidecars as two tables, and each run's label.

    summary, history = load_sweep("reports/default")

summary: one row per run; history: one row per logged training step. Config keys a sidecar lacks (recorded before
the parameter existed) take the value those runs used (registry.ADDED_LATER), never a re-read of the notebook.
"""
from pathlib import Path

import pandas as pd

from helpers.records import sidecars
from helpers.records.paths import resolve_sweep_dir
from helpers.records.registry import ADDED_LATER, QUANT_ORDER, RANDOM_CORPUS
from helpers.records.registry import is_synthetic as is_synthetic_model

# Config keys that do not make a configuration different: where results go, the seed (a repeat),
# the device string, and the VRAM budget (the feasibility matrix's other axis).
NOT_CONFIG = ("run_id", "output_dir", "seed", "device", "vram_budget_gib")
# Every metric a chart reads: absent from a sidecar means not measured (NaN), never zero.
METRICS = ("load_s", "eval_before_s", "train_s", "eval_after_s", "weights_gib", "params_total", "params_trainable",
           "ppl_before", "ppl_after", "tokens_per_s", "tokens_per_s_window", "step_time_median_s", "peak_rss_gib",
           "peak_allocated_gib", "peak_reserved_gib", "peak_nvml_process_used_gib", "peak_process_est_gib", "energy_j",
           "energy_j_per_1k_tokens", "energy_steady_j_per_1k_tokens")
# Names a sidecar may use for the NVML per-process peak; else it is the maximum of the step rows.
NVML_PEAK_KEYS = ("peak_nvml_process_used_gib", "nvml_process_used_gib_peak", "peak_nvml_used_gib")
# The training notebook's parameters, for tables that lost the sweep's own list (summary.attrs['config_keys']).
CONFIG_KEYS_FALLBACK = ("model", "quant", "dtype", "double_quant", "fp32_upcast", "corpus", "seq_len", "eval_fraction",
                        "eval_blocks", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                        "gradient_checkpointing", "max_steps", "batch_size", "grad_accum", "learning_rate",
                        "warmup_steps", "optimizer", "fused_kernels", "torch_compile", "offload_activations",
                        "keep_16bit", "chunked_loss", "tiled_mlp", "timing_warmup_steps")


def synthetic_row(row) -> bool:
    """A run of random weights (a synthetic shape): its perplexity and loss are no quality figure."""
    flag = row.get("synthetic")
    if isinstance(flag, bool) or (isinstance(flag, (int, float)) and not pd.isna(flag)):
        if bool(flag):
            return True
    return is_synthetic_model(str(row.get("model") or "")) or row.get("corpus") == RANDOM_CORPUS


def _notebook_rows(folder: Path, rows: list[dict]) -> None:
    """Mark each row's executed notebook ok | missing | corrupt; an executed notebook without a sidecar becomes a
    row of its own (corrupt if unreadable, else unfinished: papermill wrote it but the run was cut short)."""
    by_id = {r["run_id"]: r for r in rows}
    for r in rows:
        r["notebook"], r["notebook_error"] = "missing", None
    for nb in sorted((folder / "runs").glob("*.ipynb")):
        problem = sidecars.notebook_problem(nb)
        if nb.stem in by_id:
            by_id[nb.stem].update(notebook="corrupt" if problem else "ok", notebook_error=problem)
        else:
            row = {"run_id": nb.stem, "notebook": "corrupt" if problem else "ok", "notebook_error": problem}
            if problem:
                row.update(status="corrupt", error=problem)
            else:
                row.update(status="unfinished", error="executed notebook without a sidecar: the run did not finish")
            rows.append(row)


def load_sweep(sweep_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, history) of a sweep folder.

    summary: one row per run (sidecars.summary_rows: run_id, status, error, config, metrics, env_*),
    plus `notebook` (ok | missing | corrupt, and `notebook_error` saying why), `synthetic`, and `config` (a label made of the config
    keys that vary in this sweep). A corrupt sidecar is a row with status corrupt; an executed notebook
    with no sidecar is a row with status corrupt (unreadable) or unfinished; the rest load as usual.
    history: one row per training step of every readable run, with run_id and the config columns.
    """
    folder = resolve_sweep_dir(sweep_dir)
    records = sidecars.read_all(folder / "runs")
    rows = sidecars.summary_rows(records)
    _notebook_rows(folder, rows)

    steps = []
    for rec in records:
        for h in rec.get("history") or []:
            if isinstance(h, dict):
                steps.append({"run_id": rec.get("run_id"), **h})
    history = pd.DataFrame(steps, columns=None if steps else ["run_id", "step", "loss", "step_time_s"])

    summary = pd.DataFrame(rows)
    for col in ("run_id", "status", "error", "notebook", "model", "quant", "lora_r", "vram_budget_gib",
                "env_device", *METRICS):
        if col not in summary.columns:
            summary[col] = None
    for key in NVML_PEAK_KEYS[1:]:  # a later sidecar may name the NVML peak differently
        if key in summary.columns:
            summary["peak_nvml_process_used_gib"] = summary["peak_nvml_process_used_gib"].fillna(summary[key])
    if "nvml_process_used_gib" in history.columns and not history.empty:
        step_peak = history.groupby("run_id")["nvml_process_used_gib"].max()
        summary["peak_nvml_process_used_gib"] = summary["peak_nvml_process_used_gib"].fillna(
            summary["run_id"].map(step_peak))
    for col in METRICS:
        summary[col] = pd.to_numeric(summary[col], errors="coerce")
    summary["vram_budget_gib"] = pd.to_numeric(summary["vram_budget_gib"], errors="coerce").fillna(0.0)
    summary["synthetic"] = [synthetic_row(r) for r in summary.to_dict("records")]
    summary = _sort_runs(summary)
    summary.attrs["config_keys"] = sorted(_config_keys(records))
    _fill_added_later(summary, summary.attrs["config_keys"])
    summary["config"] = config_labels(summary)
    summary = summary.reset_index(drop=True)

    config_cols = [c for c in summary.columns
                   if c in _config_keys(records) or c in ("status", "synthetic", "config")]
    if not history.empty:
        history = history.merge(summary[["run_id", *config_cols]], on="run_id", how="left")
        for col in ("step", "loss", "step_time_s", "eval_ppl"):
            if col in history.columns:
                history[col] = pd.to_numeric(history[col], errors="coerce")
    return summary, history


def load_sweeps(sweep_dirs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, history) of several sweep folders as one, each row with its `sweep` (folder name): for comparisons
    whose arms were run as separate sweeps (parameters/precision.yaml's new cells beside reports/quality's). A
    config key that a sweep's sidecars lack (recorded before it existed) takes the value those runs used
    (registry.ADDED_LATER)."""
    parts = [(Path(d).name, *load_sweep(d)) for d in sweep_dirs]
    keys = sorted(set().union(*(s.attrs["config_keys"] for _, s, _ in parts)))
    summary = pd.concat([s.assign(sweep=name) for name, s, _ in parts], ignore_index=True)
    history = pd.concat([h for _, _, h in parts if not h.empty] or [parts[0][2]], ignore_index=True)
    _fill_added_later(summary, keys)
    summary.attrs["config_keys"] = keys
    summary["config"] = config_labels(summary)
    return summary, history


def _fill_added_later(summary: pd.DataFrame, keys) -> None:
    """A config key that a run's sidecar lacks (recorded before the parameter existed) takes the value every run
    before it used (registry.ADDED_LATER); else an old plain run and a new run with the key on would get one label
    (pandas' nunique does not count a missing value)."""
    has_config = summary["quant"].notna()
    for k in keys:
        if k not in ADDED_LATER:
            continue
        if k not in summary.columns:
            summary[k] = None
        missing = has_config & summary[k].isna()
        if missing.any():
            summary[k] = summary[k].astype(object)
            summary.loc[missing, k] = ADDED_LATER[k]
            if isinstance(ADDED_LATER[k], (int, float)) and not isinstance(ADDED_LATER[k], bool):
                summary[k] = pd.to_numeric(summary[k], errors="coerce")  # one type: 0 and 0.0 are one value


def quant_rank(quant) -> int:
    """A quantization's place in the reading and chart order (registry.QUANT_ORDER: 16-bit first); others after."""
    return QUANT_ORDER.index(quant) if quant in QUANT_ORDER else len(QUANT_ORDER)


def _config_keys(records) -> set:
    return {k for r in records for k in (r.get("config") or {}) if k != "run_id"}


def _sort_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs in a reading order: model, then 16-bit before quantized, then rank, budget, seed."""
    keys = pd.DataFrame({"model": df["model"].astype(str), "q": df["quant"].map(quant_rank),
                         "r": pd.to_numeric(df["lora_r"], errors="coerce")})
    for extra in ("seq_len", "vram_budget_gib", "seed"):
        if extra in df.columns:
            keys[extra] = pd.to_numeric(df[extra], errors="coerce")
    order = keys.sort_values(list(keys.columns), kind="stable", na_position="last").index
    return df.loc[order]


def _fmt(key, value) -> str:
    if key == "quant":
        return str(value)
    if key == "lora_r":
        return f"r{int(value)}" if not pd.isna(value) else "r?"
    if key == "model":
        return Path(str(value)).name
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{key}={value}"


def config_labels(summary: pd.DataFrame, exclude=()) -> pd.Series:
    """A short label per run from the config keys that vary in this sweep: 'nf4 · r8', 'none · r32 · seq_len=512'.

    quant and rank are always named; the model only when the sweep has several. exclude drops more keys.
    """
    skip = set(NOT_CONFIG) | set(exclude)
    has_config = summary["quant"].notna()
    cand = [c for c in summary.attrs.get("config_keys", CONFIG_KEYS_FALLBACK) if c in summary.columns]
    varying = [c for c in cand if c not in skip and summary.loc[has_config, c].astype(str).nunique() > 1]
    keys = [k for k in ("model", "quant", "lora_r") if k not in set(exclude)]
    keys = [k for k in keys if k != "model" or "model" in varying]
    named = summary.loc[has_config].astype({k: str for k in varying})
    for k in varying:  # add a key only if the label so far does not already tell it (corpus follows model)
        if k not in keys and (not keys or named.groupby(keys)[k].nunique().max() > 1):
            keys.append(k)
    labels = []
    for rec in summary.to_dict("records"):
        if pd.isna(rec.get("quant")):
            labels.append(None)  # a corrupt or unfinished run: no config to label
        else:
            labels.append(" · ".join(_fmt(k, rec.get(k)) for k in keys) or "all runs")
    return pd.Series(labels, index=summary.index, dtype=object)

"""One sweep, analysed: its sidecars as tidy tables, and one function per chart.

    summary, history = load_sweep("reports/default")
    fig, takeaway = throughput(summary)

Every chart function returns (figure, takeaway), the takeaway a line computed from the same rows the
figure draws; where the sweep lacks the data (a CPU has no energy counter) it returns (None, a sentence
saying why). Only runs with status ok are measured; failed runs show in the feasibility matrix and the
run table. Synthetic runs (random weights of a named shape) count for time, memory and energy but
never for quality: their perplexity and loss mean nothing.
"""
import math
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer
from plotly.subplots import make_subplots

from . import sidecars
from .registry import LEVERS, QUANT_ORDER, RANDOM_CORPUS
from .registry import is_synthetic as is_synthetic_model
from .paths import PROJECT_ROOT, resolve_sweep_dir, shown  # noqa: F401 - resolve_sweep_dir: callers know it from here

# Config keys that do not make a configuration different: where results go, the seed (a repeat),
# the device string, and the VRAM budget (the feasibility matrix's other axis).
NOT_CONFIG = ("run_id", "output_dir", "seed", "device", "vram_budget_gib")
STATUS_CODE = {"ok": 0, "oom": 1, "error": 2}
STATUS_COLOR = {"ok": "#2ca02c", "oom": "#d62728", "error": "#7f7f7f"}
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
Q4_1_NOTE = "smollm2-135m's weights were already rounded to 4 bits (Q4_1) in the GGUF it ships as"


# --- loading -------------------------------------------------------------------------------------

def synthetic_row(row) -> bool:
    """A run of random weights (a synthetic shape): its perplexity and loss are no quality figure."""
    flag = row.get("synthetic")
    if isinstance(flag, bool) or (isinstance(flag, (int, float)) and not pd.isna(flag)):
        if bool(flag):
            return True
    return is_synthetic_model(str(row.get("model") or "")) or row.get("corpus") == RANDOM_CORPUS


def load_sweep(sweep_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, history) of a sweep folder.

    summary: one row per run (helpers.runs.summary_rows: run_id, status, error, config, metrics, env_*),
    plus `notebook` (ok | missing | corrupt, and `notebook_error` saying why), `synthetic`, and `config` (a label made of the config
    keys that vary in this sweep). A corrupt sidecar is a row with status corrupt; an executed notebook
    with no sidecar is a row with status corrupt (unreadable) or unfinished; the rest load as usual.
    history: one row per training step of every readable run, with run_id and the config columns.
    """
    folder = resolve_sweep_dir(sweep_dir)
    records = sidecars.read_all(folder / "runs")
    rows = sidecars.summary_rows(records)
    by_id = {r["run_id"]: r for r in rows}
    for r in rows:
        r["notebook"], r["notebook_error"] = "missing", None
    for nb in sorted((folder / "runs").glob("*.ipynb")):
        problem = sidecars.notebook_problem(nb)
        if nb.stem in by_id:
            by_id[nb.stem].update(notebook="corrupt" if problem else "ok", notebook_error=problem)
        else:  # papermill wrote the notebook but no sidecar followed: the run was cut short
            row = {"run_id": nb.stem, "notebook": "corrupt" if problem else "ok", "notebook_error": problem}
            if problem:
                row.update(status="corrupt", error=problem)
            else:
                row.update(status="unfinished", error="executed notebook without a sidecar: the run did not finish")
            rows.append(row)

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
    _fill_defaults(summary, summary.attrs["config_keys"])
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
    config key that a sweep's sidecars lack (recorded before it existed) takes the training notebook's default,
    which is what those runs used."""
    parts = [(Path(d).name, *load_sweep(d)) for d in sweep_dirs]
    keys = sorted(set().union(*(s.attrs["config_keys"] for _, s, _ in parts)))
    summary = pd.concat([s.assign(sweep=name) for name, s, _ in parts], ignore_index=True)
    history = pd.concat([h for _, _, h in parts if not h.empty] or [parts[0][2]], ignore_index=True)
    _fill_defaults(summary, keys)
    summary.attrs["config_keys"] = keys
    summary["config"] = config_labels(summary)
    return summary, history


def _fill_defaults(summary: pd.DataFrame, keys) -> None:
    """A config key that a run's sidecar lacks (recorded before the parameter existed) takes the training
    notebook's default, which is what that run used; else an old plain run and a new run with the key on would
    get one label (pandas' nunique does not count a missing value)."""
    from .sweep import notebook_parameters

    defaults = {k: p["default"] for k, p in notebook_parameters().items()}
    has_config = summary["quant"].notna()
    for k in keys:
        if k not in defaults:
            continue
        if k not in summary.columns:
            summary[k] = None
        missing = has_config & summary[k].isna()
        if missing.any():
            summary[k] = summary[k].astype(object)
            summary.loc[missing, k] = defaults[k]
            if isinstance(defaults[k], (int, float)) and not isinstance(defaults[k], bool):
                summary[k] = pd.to_numeric(summary[k], errors="coerce")  # one type: 0 and 0.0 are one value


def _config_keys(records) -> set:
    return {k for r in records for k in (r.get("config") or {}) if k != "run_id"}


def _sort_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs in a reading order: model, then 16-bit before quantized, then rank, budget, seed."""
    quant_rank = df["quant"].map(lambda q: QUANT_ORDER.index(q) if q in QUANT_ORDER else len(QUANT_ORDER))
    keys = pd.DataFrame({"model": df["model"].astype(str), "q": quant_rank,
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



def _ok(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["status"] == "ok"]


def _by_config(df: pd.DataFrame, cols) -> pd.DataFrame:
    """Median over repeats (seeds, budgets) per configuration, in the sweep's reading order."""
    order = list(dict.fromkeys(df["config"]))
    out = df.groupby("config", sort=False)[list(cols)].median(numeric_only=True)
    return out.reindex(order)


def _vs_16bit(rows: pd.DataFrame, col: str) -> dict:
    """{quant: median ratio of col to the 16-bit arm's (quant none)}, over configurations alike in all but quant
    and run on one machine (machine_keys)."""
    rows = rows[rows[col].notna()]
    if rows.empty or not (rows["quant"] == "none").any():
        return {}
    key = config_labels(rows, exclude=("quant",)) + " @ " + machine_keys(rows)  # ratios within one machine only
    base = rows[rows["quant"] == "none"].groupby(key[rows["quant"] == "none"])[col].median()
    out = {}
    for quant in [q for q in QUANT_ORDER if q != "none"] + sorted(set(rows["quant"]) - set(QUANT_ORDER)):
        mine = rows["quant"] == quant
        if not mine.any():
            continue
        vals = rows[mine].groupby(key[mine])[col].median()
        shared = vals.index.intersection(base.index)
        if len(shared):
            out[quant] = float((vals[shared] / base[shared]).median())
    return out


def _device_words(summary: pd.DataFrame) -> str:
    devs = sorted({str(d) for d in summary["env_device"].dropna()})
    return ", ".join(devs) if devs else "an unknown device"


def _on_cpu_only(summary: pd.DataFrame) -> bool:
    devs = {str(d) for d in summary["env_device"].dropna()}
    return bool(devs) and all(d == "cpu" for d in devs)


# --- overview tables -----------------------------------------------------------------------------

def overview(summary: pd.DataFrame) -> str:
    """One line: how many runs, by status, on what device."""
    if summary.empty:
        return "This sweep folder has no runs yet."
    counts = summary["status"].value_counts()
    parts = ", ".join(f"{counts[s]} {s}" for s in ("ok", "oom", "error", "corrupt", "unfinished") if s in counts)
    names = sorted({str(n) for n in summary.get("env_device_name", pd.Series(dtype=object)).dropna()})
    where = _device_words(summary) + (f" ({', '.join(names)})" if names else "")
    bad_nb = int((summary["notebook"] == "corrupt").sum())
    nb = f"; {bad_nb} executed run notebook(s) unreadable" if bad_nb else ""
    return f"{len(summary)} runs: {parts}; on {where}{nb}."


def plan_status(sweep_dir, summary: pd.DataFrame, sweep_file=None) -> str:
    """Against the sweep file that fills this folder (default parameters/<folder name>.yaml): how many planned
    runs have a result, which are missing (and how to resume), and which runs here it no longer plans.
    '' when there is no such file, or it names another folder."""
    from collections import Counter

    from .sweep import FINISHED, SweepError, expand, load_sweep, varying

    folder = Path(sweep_dir)
    path = Path(sweep_file) if sweep_file else PROJECT_ROOT / "parameters" / f"{folder.name}.yaml"
    if not path.is_file():
        return ""
    shown_path = shown(path)
    try:
        sweep = load_sweep(path, folder.parent)
    except SweepError as e:
        return f" Its sweep file cannot be read: {e}."
    if sweep["folder"].resolve() != folder.resolve():
        return ""
    configs = expand(sweep)
    here = set(summary["run_id"]) if not summary.empty else set()
    done = set(summary.loc[summary["status"].isin(FINISHED), "run_id"]) if not summary.empty else set()
    missing = [c for c in configs if c["run_id"] not in done]
    if missing:
        key = next((k for k in varying(configs) if k != "seed"), None)
        groups = Counter(f"{key}={c[key]}" for c in missing) if key else {}
        which = ", ".join(f"{g} ({n})" for g, n in groups.items())
        line = (f" **{len(configs) - len(missing)} of the {len(configs)} runs that `{shown_path}` plans have a result**; "
                f"still to run: {which or len(missing)} (resume: `python -m helpers.sweep {shown_path}`)")
    else:
        line = f" All {len(configs)} runs that `{shown_path}` plans have a result"
    extra = here - {c["run_id"] for c in configs}
    if extra:
        line += f"; {len(extra)} run(s) here are not in it as it stands (an earlier recipe)"
    return line + "."


def run_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every run with its outcome (the charts hold the figures); failed and corrupt runs included and marked. A run
    that shared the device shows no tokens/s (not its own)."""
    cols = ["config", "vram_budget_gib", "seed", "status", "notebook", "tokens_per_s", "ppl_after", "error", "run_id"]
    t = summary[[c for c in cols if c in summary.columns]].copy()
    t["config"] = t["config"].fillna("(no config)")
    problems = [e if isinstance(e, str) else n if isinstance(n, str) else ""
                for e, n in zip(summary["error"], summary.get("notebook_error", summary["error"]))]
    t["error"] = [p if len(p) <= 100 else p[:97] + "..." for p in problems]
    t["tokens_per_s"] = t["tokens_per_s"].round(2).mask(side_by_side(summary))  # shared device: not the run's own
    t["ppl_after"] = t["ppl_after"].round(3)
    if "vram_budget_gib" in t.columns:  # 0 means no cap: say so instead of showing "0.0"
        t["vram_budget_gib"] = [_budget_label(b) for b in pd.to_numeric(t["vram_budget_gib"]).fillna(0.0)]
        t = t.rename(columns={"vram_budget_gib": "memory budget"})
    if "synthetic" in summary.columns:  # random weights: a perplexity, but no quality figure
        t.loc[summary["synthetic"].fillna(False).astype(bool).values, "ppl_after"] = None
    if "seed" in t.columns:
        t["seed"] = pd.to_numeric(t["seed"], errors="coerce").astype("Int64")
    t.index = range(1, len(t) + 1)
    return t


# --- charts --------------------------------------------------------------------------------------

def _budget_label(b: float) -> str:
    return "whole device" if b == 0 else f"{b:g} GiB"


def feasibility_matrix(summary: pd.DataFrame):
    """Configuration x VRAM budget, each cell ok / oom / error (the worst over repeats)."""
    df = summary[summary["status"].isin(list(STATUS_CODE))]
    if df.empty:
        return None, "No feasibility matrix: no run in this sweep has a readable sidecar."
    budgets = sorted(df["vram_budget_gib"].unique(), key=lambda b: math.inf if b == 0 else b)
    configs = list(dict.fromkeys(df["config"]))
    z, text, hover = [], [], []
    for c in configs:
        zr, tr, hr = [], [], []
        for b in budgets:
            cell = df[(df["config"] == c) & (df["vram_budget_gib"] == b)]
            if cell.empty:
                zr.append(None)
                tr.append("")
                hr.append("not run")
                continue
            worst = max(cell["status"], key=STATUS_CODE.get)
            n_ok = int((cell["status"] == "ok").sum())
            zr.append(STATUS_CODE[worst])
            tr.append(worst if len(cell) == 1 else f"{worst} ({n_ok}/{len(cell)} ok)")
            err = next((str(e) for e in cell["error"] if isinstance(e, str) and e), "")
            hr.append(f"{worst}: {err[:120]}" if err else worst)
        z.append(zr)
        text.append(tr)
        hover.append(hr)
    colorscale = [[0, STATUS_COLOR["ok"]], [1 / 3, STATUS_COLOR["ok"]], [1 / 3, STATUS_COLOR["oom"]],
                  [2 / 3, STATUS_COLOR["oom"]], [2 / 3, STATUS_COLOR["error"]], [1, STATUS_COLOR["error"]]]
    fig = go.Figure(go.Heatmap(
        z=z, x=[_budget_label(b) for b in budgets], y=configs, text=text, customdata=hover,
        texttemplate="%{text}", hovertemplate="%{y} at %{x}<br>%{customdata}<extra></extra>",
        zmin=-0.5, zmax=2.5, colorscale=colorscale, showscale=False, xgap=3, ygap=3))
    fig.update_layout(title="Feasibility: did the configuration train within the memory budget?",
                      xaxis_title="vram_budget_gib (torch allocator cap)", yaxis_title="configuration",
                      yaxis_autorange="reversed", height=max(260, 60 + 45 * len(configs)))

    n = len(df)
    counts = df["status"].value_counts()
    line = (f"{counts.get('ok', 0)} of {n} runs trained, {counts.get('oom', 0)} ran out of memory, "
            f"{counts.get('error', 0)} failed with another error")
    capped = [b for b in budgets if b > 0]
    if capped:
        smallest = capped[0]
        at = df[df["vram_budget_gib"] == smallest]
        fit = [c for c in configs if ((at["config"] == c) & (at["status"] == "ok")).any()]
        line += f"; at the smallest budget ({smallest:g} GiB) {len(fit)} of {at['config'].nunique()} configurations fit"
        line += f" ({', '.join(fit)})" if fit and len(fit) < at["config"].nunique() else ""
        all_fit = [b for b in capped if set(df.loc[df["vram_budget_gib"] == b, "config"]) <= set(
            df.loc[(df["vram_budget_gib"] == b) & (df["status"] == "ok"), "config"])]
        if all_fit and all_fit[0] != smallest:
            line += f"; all fit from {all_fit[0]:g} GiB"
    return fig, line + "."


# --- whose costs: side-by-side runs and machines ------------------------------------------------------------

UNKNOWN_MACHINE = "machine not recorded"


def machine_labels(rows: pd.DataFrame) -> pd.Series:
    """Which machine each run ran on (helpers.runs.machine): host and boot id (a reboot or a new lease of the same
    host is another machine for timing), and the GPU's UUID where recorded; None where the sidecar predates them."""
    def one(r):
        host, boot, gpu = r.get("env_host"), r.get("env_boot_id"), r.get("env_gpu_uuid")
        if not isinstance(host, str) or not isinstance(boot, str) or not host or not boot:
            return None
        return f"{host} · boot {boot[:8]}" + (f" · {gpu}" if isinstance(gpu, str) and gpu else "")
    return pd.Series([one(r) for r in rows.to_dict("records")], index=rows.index, dtype=object)


def machine_keys(rows: pd.DataFrame) -> pd.Series:
    """machine_labels with the unrecorded ones as one group, UNKNOWN_MACHINE: a ratio is taken within a key only."""
    return machine_labels(rows).fillna(UNKNOWN_MACHINE)


def machines_note(rows: pd.DataFrame) -> str:
    """'' when every run recorded one and the same machine; else the sentence that says the rows mix machines
    (ratios were taken within one only) and/or that some recorded none (whether they shared one is not known)."""
    if rows.empty:
        return ""
    m = machine_labels(rows)
    known, unknown = list(dict.fromkeys(m.dropna())), int(m.isna().sum())
    out = ""
    if len(known) > 1:
        out += (f" Mixed machines: these runs ran on {len(known)} machines ({'; '.join(known)}); cost ratios are "
                "taken only between runs of one machine.")
    if unknown:
        out += (f" Machine unknown for {unknown} of {len(rows)} run(s) (sidecars from before host and boot id were "
                "recorded): that the runs compared shared one machine is assumed, not checked.")
    return out


def side_by_side(rows: pd.DataFrame) -> pd.Series:
    """True for runs that shared the device with others (helpers.sweep --jobs N, sidecar env side_by_side > 1):
    their time, speed and energy are not their own. A sidecar without the field counts as alone."""
    n = pd.to_numeric(rows.get("env_side_by_side", pd.Series(index=rows.index, dtype=float)), errors="coerce")
    return (n > 1).reindex(rows.index, fill_value=False)


def own_costs(rows: pd.DataFrame) -> pd.DataFrame:
    """The runs whose time, speed and energy are their own: not side by side."""
    return rows[~side_by_side(rows)]


def side_by_side_note(rows: pd.DataFrame) -> str:
    """Why runs are missing from a cost figure: they went side by side on one device; '' when none did."""
    shared = side_by_side(rows)
    if not shared.any():
        return ""
    n = int(pd.to_numeric(rows.loc[shared, "env_side_by_side"], errors="coerce").max())
    return (f" {int(shared.sum())} of {len(rows)} run(s) went up to {n} side by side on one device (helpers.sweep "
            "--jobs): their time, throughput and energy are the device's, not theirs, and are left out (quality "
            "only); torch's per-process memory peaks still hold, NVML's device-wide ones do not.")


def peak_memory(summary: pd.DataFrame):
    """Weights after load and peak memory per configuration: torch allocated / reserved and NVML on a GPU;
    peak resident memory of the process on a CPU."""
    ok = _ok(summary).copy()
    if ok.empty:
        return None, "No memory chart: no run in this sweep finished."
    # side by side, NVML's readings (and the estimate built on them) can include the other runs' memory
    ok.loc[side_by_side(ok), ["peak_nvml_process_used_gib", "peak_process_est_gib"]] = math.nan
    # NVML has no peak counter (step-end readings can miss the peak); the estimate is torch's exact reserved
    # peak plus the largest non-torch memory NVML saw (CUDA context, cuBLAS, bitsandbytes' paged memory)
    gpu = [("peak_allocated_gib", "peak allocated (torch)"), ("peak_reserved_gib", "peak reserved (torch)"),
           ("peak_nvml_process_used_gib", "peak process used (NVML, step ends)"),
           ("peak_process_est_gib", "peak process, estimated (reserved + non-torch)")]
    measures = [m for m in gpu if ok[m[0]].notna().any()]
    if not measures:
        measures = [("peak_rss_gib", "peak resident memory (process, CPU)")] if ok["peak_rss_gib"].notna().any() else []
    if not measures:
        return None, "No memory chart: the finished runs recorded no memory peaks."
    shown = ([("weights_gib", "weights after load")] if ok["weights_gib"].notna().any() else []) + measures
    med = _by_config(ok, [m[0] for m in shown])
    fig = go.Figure([go.Bar(name=label, x=med.index, y=med[col], hovertemplate="%{x}<br>%{y:.2f} GiB")
                     for col, label in shown])
    fig.update_layout(barmode="group", title="Memory by configuration (median over repeats)",
                      yaxis_title="GiB", xaxis_title="configuration", legend_title="measure", height=450)

    # the takeaway's measure: the widest one (process estimate, NVML, reserved; RSS on a CPU) among those
    # that cover the most configurations, so a few sidecars with a newer metric do not decide it alone
    cover = {c: int(med[c].notna().sum()) for c, _ in measures}
    col, label = [m for m in measures if cover[m[0]] == max(cover.values())][-1]
    vals = med[col].dropna()
    lo, hi = vals.idxmin(), vals.idxmax()
    if lo == hi:
        line = f"{lo} peaks at {vals[lo]:.2f} GiB ({label})"
    else:
        line = (f"{lo} needs the least memory: {vals[lo]:.2f} GiB {label}, "
                f"{100 * (1 - vals[lo] / vals[hi]):.0f}% below {hi} ({vals[hi]:.2f} GiB)")
    ratios = _vs_16bit(ok, col)
    if ratios:
        line += "; vs 16-bit LoRA in the same configuration: " + ", ".join(
            f"{q} {100 * (r - 1):+.0f}%" for q, r in ratios.items())
    return fig, line + "." + side_by_side_note(ok)


def throughput(summary: pd.DataFrame):
    """Steady-state tokens/s, and wall-clock per phase (load, eval before, train, eval after), of the runs that had
    the device to themselves; ratios only between runs of one machine."""
    ok = _ok(summary)
    if ok.empty or ok["tokens_per_s"].isna().all():
        return None, "No throughput chart: no finished run recorded its speed."
    shared_note = side_by_side_note(ok)
    ok = own_costs(ok)
    if ok.empty:
        return None, "No throughput chart: every finished run shared the device, so no speed is a run's own." + shared_note
    phases = [("load_s", "load"), ("eval_before_s", "eval before"), ("train_s", "train"), ("eval_after_s", "eval after")]
    phases = [p for p in phases if ok[p[0]].notna().any()]
    med = _by_config(ok, ["tokens_per_s"] + [p[0] for p in phases])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("steady-state tokens/s (higher is better)",
                                                        "wall-clock by phase, s (lower is better)"))
    fig.add_trace(go.Bar(x=med.index, y=med["tokens_per_s"], name="tokens_per_s", showlegend=False,
                         marker_color="#1f77b4", hovertemplate="%{x}<br>%{y:.1f} tokens/s"), row=1, col=1)
    for col, label in phases:
        fig.add_trace(go.Bar(x=med.index, y=med[col], name=label, hovertemplate="%{x}<br>%{y:.1f} s"), row=1, col=2)
    fig.update_layout(barmode="stack", title="Throughput and wall-clock (median over repeats)", height=450,
                      legend_title="phase")
    fig.update_yaxes(title_text="tokens_per_s", row=1, col=1)
    fig.update_yaxes(title_text="s", row=1, col=2)

    tps = med["tokens_per_s"].dropna()
    fast, slow = tps.idxmax(), tps.idxmin()
    if fast == slow:
        line = f"{fast} trains at {tps[fast]:.1f} tokens/s"
    else:
        line = f"{fast} is fastest at {tps[fast]:.1f} tokens/s, {tps[fast] / tps[slow]:.2f}x {slow} ({tps[slow]:.1f} tokens/s)"
    window = _by_config(ok, ["tokens_per_s_window"])["tokens_per_s_window"].reindex(tps.index) \
        if ok["tokens_per_s_window"].notna().any() else None
    if window is not None and window.notna().all():  # runs recorded before the window was: not shown
        line += (f" (over the whole window, between-step work included: {window[fast]:.1f}"
                 + (f" and {window[slow]:.1f}" if fast != slow else "") + " tokens/s)")
    ratios = _vs_16bit(ok, "tokens_per_s")
    if ratios:
        line += "; speed vs 16-bit LoRA in the same configuration: " + ", ".join(f"{q} {r:.2f}x" for q, r in ratios.items())
    if "train_s" in med.columns and med["train_s"].notna().any():
        t = med["train_s"].dropna()
        line += f"; training took {t.min():.0f}–{t.max():.0f} s" if len(t) > 1 else f"; training took {t.iloc[0]:.0f} s"
    return fig, line + "." + shared_note + machines_note(ok)


def _quality_rows(summary: pd.DataFrame, col: str):
    ok = _ok(summary)
    synthetic = int(ok["synthetic"].sum())
    rows = ok[~ok["synthetic"] & ok[col].notna()]
    note = f" {synthetic} synthetic run(s) left out: random weights have no meaningful perplexity." if synthetic else ""
    return rows, note


def _q4_1_note(rows: pd.DataFrame) -> str:
    return f" Note: {Q4_1_NOTE}." if (rows["model"].astype(str) == "smollm2-135m").any() else ""


def perplexity_vs_rank(summary: pd.DataFrame):
    """Held-out perplexity before (dotted) and after (solid) training against LoRA rank, one colour per quant."""
    rows, note = _quality_rows(summary, "ppl_after")
    if rows.empty:
        why = "every finished run is synthetic" if note else "no finished run has a perplexity"
        return None, f"No perplexity chart: {why}.{note}"
    rows = rows.assign(series=config_labels(rows, exclude=("lora_r",)).values,
                       lora_r=pd.to_numeric(rows["lora_r"], errors="coerce"))
    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    best = None
    for i, (series, g) in enumerate(rows.groupby("series", sort=False)):
        med = g.groupby("lora_r")[["ppl_before", "ppl_after"]].median().sort_index()
        color = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=med.index, y=med["ppl_after"], mode="lines+markers", name=f"{series} after",
                                 line=dict(color=color), hovertemplate="r=%{x}<br>ppl_after %{y:.3f}"))
        fig.add_trace(go.Scatter(x=med.index, y=med["ppl_before"], mode="lines+markers", name=f"{series} before",
                                 line=dict(color=color, dash="dot"), marker_symbol="circle-open",
                                 hovertemplate="r=%{x}<br>ppl_before %{y:.3f}"))
        r = med["ppl_after"].idxmin()
        if best is None or med.loc[r, "ppl_after"] < best[2]:
            best = (series, r, med.loc[r, "ppl_after"], med.loc[r, "ppl_before"])
    fig.update_layout(title="Held-out perplexity vs LoRA rank (lower is better)", xaxis_title="lora_r",
                      yaxis_title="perplexity", xaxis_type="log", height=450,
                      xaxis=dict(tickvals=sorted(rows["lora_r"].dropna().unique())))
    series, r, after, before = best
    line = f"Lowest perplexity after training: {series} at r{r:g}, {after:.3f} (before {before:.3f}, {100 * (1 - after / before):.1f}% lower)"
    # quantization cost at equal rank: each quant's ppl_after minus the 16-bit arm's
    q = rows.groupby(["quant", "lora_r"])["ppl_after"].median()
    if "none" in q.index.get_level_values(0):
        gaps = []
        for quant in [x for x in QUANT_ORDER if x != "none" and x in q.index.get_level_values(0)]:
            shared = q["none"].index.intersection(q[quant].index)
            if len(shared):
                gaps.append(f"{quant} {float((q[quant][shared] - q['none'][shared]).mean()):+.3f}")
        if gaps:
            line += f"; vs 16-bit at equal rank: {', '.join(gaps)}"
    return fig, line + "." + note + _q4_1_note(rows)


def loss_curves(history: pd.DataFrame):
    """Training loss per step, one line per run; a Plotly dropdown picks the quantization (works in the HTML too)."""
    if history.empty or "loss" not in history.columns or history["loss"].isna().all():
        return None, "No loss curves: no run logged a training loss."
    h = history[history["loss"].notna()]
    synthetic = h.loc[h["synthetic"].astype(bool), "run_id"].nunique() if "synthetic" in h.columns else 0
    if synthetic:
        h = h[~h["synthetic"].astype(bool)]
    note = f" {synthetic} synthetic run(s) left out: random weights on random tokens." if synthetic else ""
    if h.empty:
        return None, f"No loss curves: every run that logged a loss is synthetic.{note}"
    fig = go.Figure()
    quants, drops = [], {}
    finished = h["run_id"][h["status"] == "ok"] if "status" in h.columns else h["run_id"]
    judged = set(finished) or set(h["run_id"])  # the takeaway compares finished runs: a failed one stopped early
    many_seeds = "seed" in h.columns and h["seed"].nunique() > 1
    many_budgets = "vram_budget_gib" in h.columns and h["vram_budget_gib"].nunique() > 1
    for run_id, g in h.groupby("run_id", sort=False):
        g = g.sort_values("step")
        name = str(g["config"].iloc[0]) + (f" · seed {g['seed'].iloc[0]}" if many_seeds else "")
        name += f" · {_budget_label(float(g['vram_budget_gib'].iloc[0]))}" if many_budgets else ""
        if "status" in g.columns and g["status"].iloc[0] != "ok":
            name += f" ({g['status'].iloc[0]})"
        fig.add_trace(go.Scatter(x=g["step"], y=g["loss"], mode="lines+markers", name=name,
                                 meta=str(g["quant"].iloc[0]), hovertemplate="step %{x}<br>loss %{y:.3f}"))
        quants.append(str(g["quant"].iloc[0]))
        k = min(3, max(1, len(g) // 3))  # average a few steps at each end: per-step loss is noisy
        if run_id in judged:
            drops[name] = (g["loss"].iloc[:k].mean(), g["loss"].iloc[-k:].mean(), int(g["step"].iloc[-1]))
    buttons = [dict(label="all quantizations", method="restyle", args=[{"visible": [True] * len(quants)}])]
    for q in [x for x in QUANT_ORDER if x in quants] + sorted(set(quants) - set(QUANT_ORDER)):
        buttons.append(dict(label=f"quant {q}", method="restyle", args=[{"visible": [x == q for x in quants]}]))
    fig.update_layout(title="Training loss per step", xaxis_title="step", yaxis_title="loss", height=480,
                      updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.15,
                                        yanchor="top", showactive=True)])
    fell = {n: a - b for n, (a, b, _) in drops.items()}
    most = max(fell, key=fell.get)
    a, b, steps = drops[most]
    line = f"Loss fell most for {most}: {a:.3f} → {b:.3f} over {steps} steps"
    least = min(fell, key=fell.get)
    if least != most:
        a2, b2, _ = drops[least]
        line += f"; least for {least}: {a2:.3f} → {b2:.3f}"
    return fig, line + " (mean of the first and last logged steps; finished runs)." + note


SETTLED_SHARE, SETTLED_CHANGE = 0.25, 0.01  # settled: held-out ppl moved < 1% over the last quarter of training


def held_out_curves(history: pd.DataFrame):
    """Held-out perplexity during training (runs with eval_every), mean over seeds per configuration, and whether
    it has settled: the relative change of that mean over the last quarter of the steps, against a 1% bound."""
    if history.empty or "eval_ppl" not in history.columns or history["eval_ppl"].isna().all():
        return None, "No held-out curves: no run scored the eval blocks during training (eval_every 0)."
    h = history[history["eval_ppl"].notna()]
    if "synthetic" in h.columns:
        h = h[~h["synthetic"].astype(bool)]
    if "status" in h.columns:
        h = h[h["status"] == "ok"]
    if h.empty:
        return None, "No held-out curves: the runs that have them are synthetic or did not finish."
    mean = h.groupby(["config", "step"], sort=False)["eval_ppl"].mean().reset_index()
    fig = go.Figure()
    verdicts = {}
    for config, g in mean.groupby("config", sort=False):
        g = g.sort_values("step")
        fig.add_trace(go.Scatter(x=g["step"], y=g["eval_ppl"], mode="lines+markers", name=str(config),
                                 hovertemplate="step %{x}<br>held-out ppl %{y:.3f}"))
        last = g["step"].max()
        start = g[g["step"] <= last * (1 - SETTLED_SHARE)]
        if not start.empty:
            a, b = start["eval_ppl"].iloc[-1], g["eval_ppl"].iloc[-1]
            verdicts[config] = (b / a - 1, int(start["step"].iloc[-1]), int(last))
    fig.update_layout(title="Held-out perplexity during training (mean over seeds)", xaxis_title="step",
                      yaxis_title="held-out perplexity", height=480)
    if not verdicts:
        return fig, "Too few points per run to judge settling (score at least twice, eval_every < max_steps)."
    moving = {c: v for c, v in verdicts.items() if abs(v[0]) >= SETTLED_CHANGE}
    worst = max(verdicts, key=lambda c: abs(verdicts[c][0]))
    w = verdicts[worst]
    line = (f"{len(verdicts) - len(moving)} of {len(verdicts)} configurations settled (held-out perplexity moved < "
            f"{100 * SETTLED_CHANGE:.0f}% over the last {100 * SETTLED_SHARE:.0f}% of steps); the most moving: {worst}, "
            f"{100 * w[0]:+.2f}% from step {w[1]} to {w[2]}")
    return fig, line + "."


def _pareto_front(x: pd.Series, y: pd.Series) -> list:
    """Labels no other point beats on both axes (lower x and lower y), sorted by x."""
    front, best_y = [], math.inf
    for label in sorted(x.index, key=lambda i: (x[i], y[i])):
        if y[label] < best_y:
            front.append(label)
            best_y = y[label]
    return front


def cost_quality(summary: pd.DataFrame):
    """Perplexity after training against training time, and against energy where it was measured.
    The line joins the Pareto front: configurations no other one beats on both cost and quality."""
    rows, note = _quality_rows(summary, "ppl_after")
    shared_note = side_by_side_note(rows)
    rows = own_costs(rows[rows["train_s"].notna()])
    if rows.empty:
        why = "every finished run is synthetic" if note else "no finished run has both a perplexity and a training time"
        why = "every run shared the device, so no training time or energy is a run's own" if shared_note else why
        return None, f"No cost-quality chart: {why}.{note}{shared_note}"
    med = _by_config(rows, ["train_s", "energy_j", "ppl_after"])
    axes = [("train_s", "training time, s")]
    if med["energy_j"].notna().any():
        axes.append(("energy_j", "training energy, J"))
    fig = make_subplots(rows=1, cols=len(axes), shared_yaxes=True, subplot_titles=[a[1] for a in axes])
    fronts = {}
    for i, (col, label) in enumerate(axes, start=1):
        m = med[med[col].notna()]
        front = _pareto_front(m[col], m["ppl_after"])
        fronts[col] = front
        fig.add_trace(go.Scatter(x=m[col], y=m["ppl_after"], mode="markers+text", text=m.index,
                                 textposition="top center", name="configuration", showlegend=i == 1,
                                 marker=dict(size=11, color="#1f77b4"),
                                 hovertemplate="%{text}<br>%{x:.1f}<br>ppl_after %{y:.3f}<extra></extra>"), row=1, col=i)
        fig.add_trace(go.Scatter(x=m.loc[front, col], y=m.loc[front, "ppl_after"], mode="lines",
                                 line=dict(color="#d62728", dash="dash"), name="Pareto front", showlegend=i == 1,
                                 hoverinfo="skip"), row=1, col=i)
        lo, hi = m[col].min(), m[col].max()
        pad = 0.2 * (hi - lo) if hi > lo else 0.2 * abs(hi) or 1.0  # room for the point labels
        fig.update_xaxes(title_text=col, range=[lo - pad, hi + pad], row=1, col=i)
    lo, hi = med["ppl_after"].min(), med["ppl_after"].max()
    pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0
    fig.update_yaxes(title_text="ppl_after", range=[lo - pad, hi + 1.5 * pad], row=1, col=1)
    fig.update_layout(title="Cost vs quality (down-left is better)", height=480)

    front = fronts["train_s"]
    dominated = [c for c in med.index if c not in front]
    if len(med) == 1:
        c = med.index[0]
        return fig, (f"One configuration: {c} trained in {med.loc[c, 'train_s']:.0f} s to perplexity "
                     f"{med.loc[c, 'ppl_after']:.3f}." + note + _q4_1_note(rows))
    line = (f"Time–quality front: {front[0]} is fastest ({med.loc[front[0], 'train_s']:.0f} s, ppl {med.loc[front[0], 'ppl_after']:.3f})")
    if len(front) > 1:
        line += f", {front[-1]} is best ({med.loc[front[-1], 'train_s']:.0f} s, ppl {med.loc[front[-1], 'ppl_after']:.3f})"
    line += f"; {len(dominated)} of {len(med)} configurations are beaten on both"
    if "energy_j" in fronts:
        line += f"; energy front: {', '.join(fronts['energy_j'])}"
    return fig, line + "." + note + _q4_1_note(rows) + shared_note + machines_note(rows)


def energy_per_token(summary: pd.DataFrame):
    """Training energy per 1k tokens (J), where the GPU reported it; absent, not zero, elsewhere."""
    ok = _ok(summary)
    if ok.empty:
        return None, "No energy chart: no run in this sweep finished."
    shared_note = side_by_side_note(ok)
    rows = own_costs(ok[ok["energy_j_per_1k_tokens"].notna()])
    if rows.empty and shared_note:
        return None, "No energy chart: every run shared the device, whose energy counter is not one run's." + shared_note
    if rows.empty:
        if _on_cpu_only(ok):
            return None, "No energy chart: this sweep ran on a CPU, which has no energy counter (energy is absent, not zero)."
        return None, f"No energy chart: the device ({_device_words(ok)}) reported neither an energy counter nor power samples."
    med = _by_config(rows, ["energy_j_per_1k_tokens"])["energy_j_per_1k_tokens"]
    sources = sorted({str(s) for s in rows.get("energy_source", pd.Series(dtype=object)).dropna()})
    fig = go.Figure(go.Bar(x=med.index, y=med.values, marker_color="#9467bd",
                           hovertemplate="%{x}<br>%{y:.1f} J per 1k tokens<extra></extra>"))
    fig.update_layout(title=f"Energy per 1k training tokens (source: {', '.join(sources) or 'unknown'})",
                      xaxis_title="configuration", yaxis_title="energy_j_per_1k_tokens", height=420)
    lo, hi = med.idxmin(), med.idxmax()
    if lo == hi:
        line = f"{lo} uses {med[lo]:.1f} J per 1k tokens"
    else:
        line = (f"{lo} uses the least energy: {med[lo]:.1f} J per 1k tokens, "
                f"{med[hi] / med[lo]:.2f}x less than {hi} ({med[hi]:.1f} J)")
    ratios = _vs_16bit(rows, "energy_j_per_1k_tokens")
    if ratios:
        line += "; vs 16-bit LoRA in the same configuration: " + ", ".join(f"{q} {r:.2f}x" for q, r in ratios.items())
    if "nvml_power_sampled" in sources:
        line += "; some runs' energy is sampled power x step time, not the counter"
    skipped = len(own_costs(ok)) - len(rows)
    if skipped:
        line += f"; {skipped} finished run(s) have no energy figure"
    return fig, line + "." + shared_note + machines_note(rows)


# --- speed and memory levers (parameters/levers.yaml, benchmarks/fast_arm.py) --------------------------------

LEVER_KEYS = (*LEVERS, "optimizer", "gradient_checkpointing")  # and the two notebook knobs a lever sweep varies


def _lever_label(row, plain: dict) -> str:
    """'plain', or the settings that differ from the plain stack: 'fused_kernels + optimizer=adamw_torch_fused'."""
    changed = []
    for k in LEVER_KEYS:
        v = row.get(k)
        v = plain[k] if v is None or (isinstance(v, float) and math.isnan(v)) else v
        v = int(v) if isinstance(v, float) and v.is_integer() else v  # a column with gaps reads 8 as 8.0
        if v != plain[k]:
            changed.append(k if v is True else f"{k}={v}")
    return " + ".join(changed) or "plain"


def loss_gap(a, b) -> float | None:
    """Largest relative difference of the training loss at any step both runs logged: a and b are history rows
    (dicts or a DataFrame with step and loss). None when they share no logged step. The study's equivalence check
    for a speed lever: < 1% against the plain run on the same seed and data."""
    def losses(h):
        rows = h.to_dict("records") if isinstance(h, pd.DataFrame) else h
        return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None and not pd.isna(r["loss"])}
    la, lb = losses(a), losses(b)
    common = sorted(set(la) & set(lb))
    return max(abs(la[s] - lb[s]) / abs(la[s]) for s in common) if common else None


# The lever check: a lever run against the plain run of the same seed and data (the same batches in the same order).
# loss_gap cannot fail where the loss barely moves (random weights on random tokens: a lever that zeroed every
# gradient would pass it), so the check asks what a broken lever cannot give: the same *fall* of the training loss
# and the same held-out perplexity after training, and says "cannot tell" where the plain run learned too little.
CHECK_WINDOW = 0.1      # the first and last 10% of the logged steps (at least one) give the loss's start and end
CHECK_MIN_FALL = 0.10   # the plain run's loss must fall by >= 10% of its start, else no lever can be told apart
CHECK_FALL_TOL = 0.05   # pass: the lever's fall is 95-105% of the plain run's ...
CHECK_PPL_TOL = 0.01    # ... and its ppl_after within 1% of the plain run's
CHECK_RULE = (f"pass: the plain run's training loss fell >= {100 * CHECK_MIN_FALL:g}% (mean of the first vs the last "
              f"{100 * CHECK_WINDOW:g}% of the logged steps), the lever's fell {100 * (1 - CHECK_FALL_TOL):g}–"
              f"{100 * (1 + CHECK_FALL_TOL):g}% as much over the same steps, and its held-out perplexity after "
              f"training is within {100 * CHECK_PPL_TOL:g}% of the plain run's")


def _losses(h) -> dict:
    rows = h.to_dict("records") if isinstance(h, pd.DataFrame) else h
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None and not pd.isna(r["loss"])}


def lever_check(plain_history, lever_history, plain_ppl_after=None, lever_ppl_after=None) -> dict:
    """CHECK_RULE for one lever run against its plain run (history rows: dicts or a DataFrame with step and loss).
    Returns plain_fall_pct (how far the plain run's loss fell, % of its start), fall_kept (the lever's fall over the
    plain run's, on the steps both logged), ppl_after_x (the lever's ppl_after over the plain run's), and verdict:
    'pass', 'FAIL', or 'cannot tell' (too few shared steps, no ppl_after, or a plain run that learned too little),
    with why."""
    out = {"plain_fall_pct": math.nan, "fall_kept": math.nan, "ppl_after_x": math.nan}
    lp, ll = _losses(plain_history), _losses(lever_history)
    common = sorted(set(lp) & set(ll))
    if len(common) < 2:
        return {**out, "verdict": "cannot tell", "why": f"{len(common)} logged step(s) in common"}
    k = max(1, round(CHECK_WINDOW * len(common)))
    first, last = common[:k], common[-k:]

    def fall(losses):
        return sum(losses[s] for s in first) / k - sum(losses[s] for s in last) / k
    start = sum(lp[s] for s in first) / k
    out["plain_fall_pct"] = 100 * fall(lp) / abs(start) if start else math.nan
    if fall(lp) > 0:
        out["fall_kept"] = fall(ll) / fall(lp)
    if plain_ppl_after is not None and lever_ppl_after is not None and not pd.isna(plain_ppl_after) \
            and not pd.isna(lever_ppl_after):
        out["ppl_after_x"] = lever_ppl_after / plain_ppl_after
    if not out["plain_fall_pct"] >= 100 * CHECK_MIN_FALL:
        why = (f"the plain run's loss fell {out['plain_fall_pct']:.3g}% (< {100 * CHECK_MIN_FALL:g}%): a lever that "
               "trained nothing would look the same")
        return {**out, "verdict": "cannot tell", "why": why}
    problems = []
    if not abs(out["fall_kept"] - 1) <= CHECK_FALL_TOL:
        problems.append(f"its loss fell {out['fall_kept']:.3f}x as much as the plain run's")
    if math.isnan(out["ppl_after_x"]):
        if not problems:
            return {**out, "verdict": "cannot tell", "why": "no ppl_after for one of the two runs"}
    elif not abs(out["ppl_after_x"] - 1) <= CHECK_PPL_TOL:
        problems.append(f"its ppl_after is {out['ppl_after_x']:.4f}x the plain run's")
    if problems:
        return {**out, "verdict": "FAIL", "why": "; ".join(problems)}
    return {**out, "verdict": "pass", "why": (f"loss fell {out['fall_kept']:.3f}x the plain run's "
                                              f"{out['plain_fall_pct']:.1f}%, ppl_after {out['ppl_after_x']:.4f}x")}


def lever_table(summary: pd.DataFrame, history: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per finished run that differs from the plain stack only by levers, against the plain runs of the
    same configuration (same quant, shape, batch, rank, budget) *on the same machine* (machine_keys; a sidecar
    without one is on UNKNOWN_MACHINE): tokens/s, peak reserved memory and energy per 1k tokens, each with its
    ratio (memory: difference) to plain; `machine` says which. Energy twice: over the whole training window
    (compilation and warm-up included, what a short run costs) and over the steady steps tokens/s counts (what a
    token costs in a long run; NaN for runs recorded before steps carried their own energy). A run that shared
    the device (side_by_side) has no speed or energy of its own: NaN. With history (load_sweep's second table),
    the equivalence check against the plain run of the same configuration and seed (any machine; the first by run
    id where there are several): loss_gap_pct (the largest relative difference of the training loss at any logged
    step, in percent), and lever_check's fall_kept, ppl_after_x and check (pass / FAIL / cannot tell, CHECK_RULE).
    Empty when no such pair exists."""
    from .sweep import notebook_parameters

    plain = {k: p["default"] for k, p in notebook_parameters().items() if k in LEVER_KEYS}
    ok = _ok(summary).copy()
    cols = ["quant", "levers", "machine", "tokens_per_s", "speed_x", "peak_reserved_gib", "reserved_vs_plain_gib",
            "energy_j_per_1k_tokens", "energy_x", "energy_steady_j_per_1k_tokens", "energy_steady_x"]
    if history is not None:
        cols += ["loss_gap_pct", "fall_kept", "ppl_after_x", "check"]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    figures = ["tokens_per_s", "peak_reserved_gib", "energy_j_per_1k_tokens", "energy_steady_j_per_1k_tokens"]
    for k in figures + ["ppl_after"]:
        if k not in ok:
            ok[k] = float("nan")
    ok.loc[side_by_side(ok), ["tokens_per_s", "energy_j_per_1k_tokens", "energy_steady_j_per_1k_tokens"]] = math.nan
    ok["levers"] = [_lever_label(r, plain) for r in ok.to_dict("records")]
    ok["context"] = config_labels(ok, exclude=LEVER_KEYS).values
    ok["machine"] = machine_keys(ok).values
    is_plain = ok["levers"] == "plain"
    rows = ok[ok["context"].isin(set(ok.loc[is_plain, "context"]))]
    if rows["levers"].eq("plain").all():
        return pd.DataFrame(columns=cols)
    base = ok[is_plain].groupby(["context", "machine"])[figures].median()  # cost ratios within one machine only
    out = rows[["quant", "levers", "context", "machine", "run_id", "seed", "ppl_after", *figures]].copy()
    ref = base.reindex(pd.MultiIndex.from_frame(out[["context", "machine"]])).set_index(out.index)
    out["speed_x"] = out["tokens_per_s"] / ref["tokens_per_s"]
    out["reserved_vs_plain_gib"] = out["peak_reserved_gib"] - ref["peak_reserved_gib"]
    out["energy_x"] = out["energy_j_per_1k_tokens"] / ref["energy_j_per_1k_tokens"]
    out["energy_steady_x"] = out["energy_steady_j_per_1k_tokens"] / ref["energy_steady_j_per_1k_tokens"]
    if history is not None:
        steps = {rid: h for rid, h in history.groupby("run_id")} if not history.empty else {}
        plains = out[out["levers"] == "plain"].sort_values("run_id")
        first_plain = plains.groupby(["context", "seed"])["run_id"].first()
        ppl = out.set_index("run_id")["ppl_after"]
        gaps, checks = [], []
        for c, seed, rid in zip(out["context"], out["seed"], out["run_id"]):
            ref_id = first_plain.get((c, seed))
            ref_h = steps.get(ref_id, []) if ref_id is not None else []
            gaps.append(loss_gap(ref_h, steps.get(rid, [])))
            checks.append(lever_check(ref_h, steps.get(rid, []), ppl.get(ref_id), ppl[rid]) if ref_id is not None
                          else {"fall_kept": math.nan, "ppl_after_x": math.nan, "verdict": "cannot tell"})
        out["loss_gap_pct"] = [float("nan") if g is None else 100 * g for g in gaps]
        out["fall_kept"] = [c["fall_kept"] for c in checks]
        out["ppl_after_x"] = [c["ppl_after_x"] for c in checks]
        out["check"] = [c["verdict"] for c in checks]
        out.loc[out["levers"] == "plain", "check"] = "reference"
    out["is_plain"] = out["levers"] == "plain"  # plain first in each configuration, then fastest first
    out = out.sort_values(["context", "is_plain", "speed_x"], ascending=[True, False, False])
    return out.set_index("context")[cols]


def lever_effects(summary: pd.DataFrame, table: pd.DataFrame | None = None):
    """Each lever's (and each combination's) speed against the plain stack of the same configuration.
    table: lever_table(summary) when the caller has it already."""
    table = lever_table(summary) if table is None else table
    if table.empty:
        return None, ("No lever comparison: no finished run here differs from a finished plain-stack run of the "
                      "same configuration by its levers alone (parameters/levers.yaml has such pairs).")
    runs_ = table[table["levers"] != "plain"]
    fig = go.Figure()
    for quant in list(dict.fromkeys(runs_["quant"])):
        r = runs_[runs_["quant"] == quant]
        fig.add_trace(go.Bar(
            name=str(quant), x=r["levers"], y=r["speed_x"],
            customdata=r[["tokens_per_s", "reserved_vs_plain_gib", "energy_x"]].values,
            hovertemplate="%{x}<br>%{y:.2f}x plain tokens/s (%{customdata[0]:.0f})<br>"
                          "peak reserved %{customdata[1]:+.2f} GiB vs plain<br>energy %{customdata[2]:.2f}x plain"
                          "<extra>" + str(quant) + "</extra>"))
    fig.add_hline(y=1.0, line_dash="dash", line_color="gray")
    fig.update_layout(title="Tokens/s against the plain stack of the same configuration", barmode="group",
                      xaxis_title="levers on", yaxis_title="speed_x (tokens/s over plain)", height=460)
    best = runs_.iloc[runs_["speed_x"].to_numpy().argmax()]  # the index (configuration) repeats: by position
    line = f"fastest: {best['quant']} · {best['levers']} at {best['speed_x']:.2f}x the plain stack's tokens/s"
    mem = runs_.iloc[runs_["reserved_vs_plain_gib"].to_numpy().argmin()]
    if mem["reserved_vs_plain_gib"] < 0:
        line += (f"; most memory saved: {mem['quant']} · {mem['levers']}, {-mem['reserved_vs_plain_gib']:.2f} GiB "
                 f"less peak reserved")
    slower = runs_[runs_["speed_x"] < 1]
    if len(slower):
        line += "; slower than plain: " + ", ".join(f"{q} · {l} ({x:.2f}x)" for q, l, x in
                                                   slower[["quant", "levers", "speed_x"]].values)
    line += ". One run per arm: differences inside run-to-run noise (see the sweep) are not resolved; " \
            "benchmarks/fast_arm.py measures plain vs optimised in interleaved pairs"
    if "check" in table.columns:
        verdicts = runs_["check"].value_counts()
        line += (f". Equivalence ({CHECK_RULE}): " + ", ".join(f"{n} {v}" for v, n in verdicts.items()))
        failed = runs_[runs_["check"] == "FAIL"]
        if len(failed):
            line += " (FAIL: " + ", ".join(f"{q} · {lv}" for q, lv in failed[["quant", "levers"]].values) + ")"
    ok = _ok(summary)
    return fig, line + "." + side_by_side_note(ok) + machines_note(ok)


CHARTS = (feasibility_matrix, peak_memory, throughput, perplexity_vs_rank, cost_quality, energy_per_token)


# --- quality across seeds (sweeps with repeats) ---------------------------------------------------

# Two-sided 95% Student t critical values t(0.975, df) for df = 1..30 (any statistics table; scipy is not a
# dependency). Above 30: the Cornish-Fisher expansion around z = 1.959964, within 0.001 of the table there.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
NO_REPEATS = ("a sweep with one run per configuration has no spread across seeds to build a confidence "
              "interval from (set repeats: 3 or more in the sweep file)")


def t_critical_95(df: int) -> float:
    """t(0.975, df): half of a two-sided 95% interval is t x standard error."""
    if df < 1:
        return math.nan
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values) -> tuple[float, float, int]:
    """(mean, half width of the 95% t interval, n) of the non-missing values; half width NaN below 2 values.
    The interval is mean ± t(0.975, n-1) x sample standard deviation (n-1) / sqrt(n)."""
    v = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").dropna().astype(float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v.iloc[0]), math.nan, 1
    return float(v.mean()), t_critical_95(n - 1) * float(v.std(ddof=1)) / math.sqrt(n), n


def _ci_words(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(half):
        return f"{mean:.{digits}f} (one seed, no interval)"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def repeats_problem(summary: pd.DataFrame) -> str | None:
    """None if some configuration has finished, non-synthetic runs from 2 or more seeds; else why not."""
    rows, note = _quality_rows(summary, "ppl_after")
    if rows.empty:
        return ("no finished run has a quality figure" + (" (every finished run is synthetic)" if note else ""))
    if "seed" not in rows.columns or rows.groupby("config")["seed"].nunique().max() < 2:
        return NO_REPEATS
    return None


def ppl_ci_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (finished, non-synthetic runs): n_seeds, ppl_before and ppl_after as mean with the half
    width of their 95% t interval across seeds (ci95), and the interval's ends; the sweep's reading order."""
    rows, _ = _quality_rows(summary, "ppl_after")
    out = []
    for config, g in rows.groupby("config", sort=False):
        after, half, n = mean_ci95(g["ppl_after"])
        before, before_half, _ = mean_ci95(g["ppl_before"])
        out.append({"config": config, "quant": g["quant"].iloc[0], "lora_r": pd.to_numeric(g["lora_r"]).iloc[0],
                    "n_seeds": n, "ppl_before_mean": before, "ppl_before_ci95": before_half,
                    "ppl_after_mean": after, "ppl_after_ci95": half,
                    "ppl_after_lo": after - half, "ppl_after_hi": after + half})
    cols = ["config", "quant", "lora_r", "n_seeds", "ppl_before_mean", "ppl_before_ci95", "ppl_after_mean",
            "ppl_after_ci95", "ppl_after_lo", "ppl_after_hi"]
    return pd.DataFrame(out, columns=cols).set_index("config")


def paired_ratio_ci(rows: pd.DataFrame, col: str, quant: str) -> tuple[float, float, int, bool]:
    """quant's col over the unquantized arm's (quant none), paired by seed and by every other config key.

    Per seed, the ratio at each shared configuration (e.g. each rank) is averaged; the seeds' averages give
    (mean, 95% half width, n_seeds, exact). exact: every paired ratio is the same number (a deterministic
    figure such as ppl_before on one device), so the ratio has no sampling spread at all.
    """
    rows = rows[rows[col].notna()]
    key = config_labels(rows, exclude=("quant",)) + " · seed " + rows["seed"].astype(str)
    base = rows[rows["quant"] == "none"].groupby(key[rows["quant"] == "none"])[col].mean()
    mine = rows["quant"] == quant
    vals = rows[mine].groupby(key[mine])[col].mean()
    shared = vals.index.intersection(base.index)
    if not len(shared):
        return math.nan, math.nan, 0, False
    ratio = vals[shared] / base[shared]
    seed = rows[mine].groupby(key[mine])["seed"].first()[shared]
    per_seed = ratio.groupby(seed.values).mean()
    exact = bool(ratio.max() - ratio.min() <= 1e-12 * abs(ratio.mean()))
    mean, half, n = mean_ci95(per_seed)
    return mean, (0.0 if exact else half), n, exact


def _quants_in(rows: pd.DataFrame) -> list:
    present = set(rows["quant"])
    return [q for q in QUANT_ORDER if q in present] + sorted(present - set(QUANT_ORDER))


def _ratio_words(mean: float, half: float, exact: bool) -> str:
    if exact:
        return f"{mean:.4f}x (exact: the same in every run)"
    if math.isnan(half):
        return f"{mean:.4f}x (one seed, no interval)"
    return f"{mean:.4f}x (95% CI {mean - half:.4f}–{mean + half:.4f})"


def perplexity_ci(summary: pd.DataFrame):
    """Perplexity after training per configuration: mean across seeds with its 95% t interval (error bars),
    and each quantization's ppl_after over the unquantized arm's, paired by seed and rank."""
    problem = repeats_problem(summary)
    if problem:
        return None, f"No confidence intervals: {problem}."
    rows, note = _quality_rows(summary, "ppl_after")
    t = ppl_ci_table(summary)
    fig = go.Figure(go.Scatter(x=t.index, y=t["ppl_after_mean"], mode="markers",
                               error_y=dict(type="data", array=t["ppl_after_ci95"], visible=True),
                               customdata=t["n_seeds"], marker=dict(size=10, color="#1f77b4"),
                               hovertemplate="%{x}<br>ppl_after %{y:.3f} ± %{error_y.array:.3f} (n=%{customdata})<extra></extra>"))
    fig.update_layout(title="Perplexity after training: mean and 95% interval across seeds (lower is better)",
                      xaxis_title="configuration", yaxis_title="ppl_after", height=450)
    best = t["ppl_after_mean"].idxmin()
    line = (f"Best: {best}, ppl_after {_ci_words(t.loc[best, 'ppl_after_mean'], t.loc[best, 'ppl_after_ci95'])} "
            f"over {t.loc[best, 'n_seeds']} seeds")
    gaps = []
    if "none" in set(rows["quant"]):
        for q in [x for x in _quants_in(rows) if x != "none"]:
            mean, half, n, exact = paired_ratio_ci(rows, "ppl_after", q)
            if n:
                gaps.append(f"{q} {_ratio_words(mean, half, exact)}")
    if gaps:
        line += "; ppl_after vs the unquantized arm at equal rank and seed: " + ", ".join(gaps)
    return fig, line + "." + note + _q4_1_note(rows)


def quantization_gap(summary: pd.DataFrame):
    """The quantization-only gap: perplexity of each quantized base before training over the unquantized base's,
    on the same eval blocks. ppl_before depends on no seed, so on one device it is usually the same in every
    run and the ratio is exact; where it varies (non-deterministic kernels), a 95% interval across seeds."""
    rows, note = _quality_rows(summary, "ppl_before")
    problem = repeats_problem(summary)
    if problem:
        return None, f"No quantization-only gap with intervals: {problem}."
    if "none" not in set(rows["quant"]):
        return None, "No quantization-only gap: the sweep has no unquantized (quant none) arm to compare with." + note
    quants = _quants_in(rows)
    stats = {q: mean_ci95(rows.loc[rows["quant"] == q, "ppl_before"]) for q in quants}
    fig = go.Figure(go.Bar(x=quants, y=[stats[q][0] for q in quants], marker_color="#8c564b",
                           error_y=dict(type="data", array=[0.0 if math.isnan(stats[q][1]) else stats[q][1]
                                                            for q in quants], visible=True),
                           hovertemplate="%{x}<br>ppl_before %{y:.3f}<extra></extra>"))
    fig.update_layout(title="Quantization alone: perplexity of the base before training (same eval blocks)",
                      xaxis_title="quant", yaxis_title="ppl_before", height=420)
    parts = []
    for q in [x for x in quants if x != "none"]:
        mean, half, n, exact = paired_ratio_ci(rows, "ppl_before", q)
        if n:
            parts.append(f"{q} {_ratio_words(mean, half, exact)}")
    line = f"Before any training, the unquantized base scores {stats['none'][0]:.3f}"
    if parts:
        line += "; quantized base over unquantized: " + ", ".join(parts)
    dtypes = sorted({str(d) for d in rows.get("dtype_resolved", pd.Series(dtype=object)).dropna()})
    if dtypes:
        line += f" (base dtype {', '.join(dtypes)})"
    return fig, line + "." + note + _q4_1_note(rows)


def flattening_rank(ranks, means, halves) -> float:
    """The unpaired rule the report used before issue 15, kept to trace the old figures in results.md: the
    smallest rank whose mean ppl_after is at or below the upper end of the best rank's 95% interval. It ignores
    that runs of one seed share their batch order across ranks, so at 3 seeds it calls ranks equal that are worse
    in every seed; rank_returns uses FLAT_RULE (paired_rank_table, flattening_rank_paired). NaN if no rank has a
    mean."""
    t = pd.DataFrame({"r": list(ranks), "m": list(means), "h": list(halves)}).dropna(subset=["r", "m"])
    if t.empty:
        return math.nan
    b = t.loc[t["m"].idxmin()]
    bound = b["m"] + (0.0 if pd.isna(b["h"]) else b["h"])
    return float(t.loc[t["m"] <= bound, "r"].min())


# Where returns flatten, paired by seed within an arm: a rank counts as flat when the upper end of the 95% t
# interval of its paired difference from the best rank is at most FLAT_MARGIN_PCT. An equivalence rule: a rank
# must be shown to be at most that much worse, so too few seeds (a wide interval) make no rank flat, unlike "the
# interval includes 0", which low power passes. The margin, a quarter of a percent of perplexity, is a third of
# the smallest quantization gap the study reports (int8's 0.8%) and about the seed-to-seed spread of one rank.
FLAT_MARGIN_PCT = 0.25
FLAT_RULE = (f"returns flatten at the smallest rank whose paired difference from the arm's best rank (per seed, "
             f"ppl_after over the best rank's - 1) has a 95% interval ending at or below +{FLAT_MARGIN_PCT:g}%")


def paired_differences(rows: pd.DataFrame, col: str, a, b, key_exclude=()) -> pd.DataFrame:
    """Pairs of runs alike in every config key but those in key_exclude (and the seed, which pairs them): a and b
    are boolean masks over rows (the two sides); one row per pair with pair (the shared label), seed, a, b and
    pct = 100 (a / b - 1)."""
    rows = rows[rows[col].notna()]
    label = config_labels(rows, exclude=key_exclude) + " · seed " + rows["seed"].astype(str)
    a, b = a.reindex(rows.index, fill_value=False), b.reindex(rows.index, fill_value=False)
    va = rows[a].groupby(label[a])[col].mean()
    vb = rows[b].groupby(label[b])[col].mean()
    shared = va.index.intersection(vb.index)
    seed = rows.groupby(label)["seed"].first()
    out = pd.DataFrame({"pair": shared, "seed": seed[shared].values, "a": va[shared].values, "b": vb[shared].values})
    out["pct"] = 100 * (out["a"] / out["b"] - 1)
    return out


def paired_summary(pairs: pd.DataFrame) -> dict:
    """Mean paired difference in % with its 95% t interval over seeds (pairs of one seed averaged first: they
    share the batch order), and the sign count over all pairs."""
    per_seed = pairs.groupby("seed")["pct"].mean() if len(pairs) else pd.Series(dtype=float)
    mean, half, n = mean_ci95(per_seed)
    return {"n_seeds": n, "n_pairs": len(pairs), "mean_pct": mean, "ci95_pct": half,
            "lo_pct": mean - half, "hi_pct": mean + half,
            "worse": int((pairs["pct"] > 0).sum()), "better": int((pairs["pct"] < 0).sum())}


def paired_rank_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Each rank against the best rank (lowest mean ppl_after) of its arm (the config label without lora_r),
    paired by seed: n_seeds, mean paired difference in %, its 95% interval, how many seeds it is worse / better
    in, and whether it is flat by FLAT_RULE. One row per arm and rank, in the sweep's order."""
    rows, _ = _quality_rows(summary, "ppl_after")
    cols = ["arm", "lora_r", "best_r", "ppl_after_mean", "n_seeds", "mean_pct", "ci95_pct", "lo_pct", "hi_pct",
            "worse", "better", "flat"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    rows = rows.assign(arm=config_labels(rows, exclude=("lora_r",)).values,
                       lora_r=pd.to_numeric(rows["lora_r"], errors="coerce"))
    out = []
    for arm, g in rows.groupby("arm", sort=False):
        means = g.groupby("lora_r")["ppl_after"].mean()
        best = means.idxmin()
        for r in sorted(means.index):
            s = paired_summary(paired_differences(g, "ppl_after", g["lora_r"] == r, g["lora_r"] == best,
                                                  key_exclude=("lora_r",)))
            flat = bool(r == best or (s["n_seeds"] >= 2 and s["hi_pct"] <= FLAT_MARGIN_PCT))
            out.append({"arm": arm, "lora_r": r, "best_r": best, "ppl_after_mean": means[r], **s, "flat": flat})
    return pd.DataFrame(out)[cols]


def flattening_rank_paired(table: pd.DataFrame) -> float:
    """FLAT_RULE on one arm's rows of paired_rank_table: the smallest flat rank (the best rank always is)."""
    flat = table.loc[table["flat"].astype(bool), "lora_r"]
    return float(flat.min()) if len(flat) else math.nan


def rank_returns(summary: pd.DataFrame):
    """Mean ppl_after (95% interval across seeds) against LoRA rank, one line per quantization (and any other
    varying key), with the rank where returns flatten marked (FLAT_RULE: paired by seed against the arm's best)."""
    problem = repeats_problem(summary)
    if problem:
        return None, f"No rank-returns chart: {problem}."
    rows, note = _quality_rows(summary, "ppl_after")
    t = ppl_ci_table(summary)
    series = dict(zip(rows["config"], config_labels(rows, exclude=("lora_r",))))
    t["series"] = [series[c] for c in t.index]
    if t["lora_r"].nunique() < 2:
        return None, "No rank-returns chart: the sweep has one LoRA rank." + note
    paired = paired_rank_table(summary)
    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    parts = []
    for i, (name, g) in enumerate(t.groupby("series", sort=False)):
        g = g.sort_values("lora_r")
        color = palette[i % len(palette)]
        p = paired[paired["arm"] == name]
        r_flat = flattening_rank_paired(p)
        fig.add_trace(go.Scatter(x=g["lora_r"], y=g["ppl_after_mean"], mode="lines+markers", name=name,
                                 line=dict(color=color), error_y=dict(type="data", array=g["ppl_after_ci95"]),
                                 hovertemplate="r=%{x}<br>ppl_after %{y:.3f}<extra></extra>"))
        if not math.isnan(r_flat):
            y = g.loc[g["lora_r"] == r_flat, "ppl_after_mean"].iloc[0]
            fig.add_trace(go.Scatter(x=[r_flat], y=[y], mode="markers", showlegend=False,
                                     marker=dict(symbol="star", size=16, color=color, line=dict(color="black", width=1)),
                                     hovertemplate=f"{name}: returns flatten at r{r_flat:g}<extra></extra>"))
        best = p["best_r"].iloc[0]
        below = p[p["lora_r"] < r_flat]
        words = f"{name} r{r_flat:g} (best r{best:g}"
        if len(below):
            worst = below.iloc[-1]  # the next rank down: the one the rule turned away
            words += (f"; r{worst['lora_r']:g} {worst['mean_pct']:+.2f}% "
                      f"[{worst['lo_pct']:+.2f}, {worst['hi_pct']:+.2f}], worse in {worst['worse']} of "
                      f"{worst['worse'] + worst['better']} seeds")
        parts.append(words + ")")
    fig.update_layout(title="Perplexity after training vs LoRA rank (★: where returns flatten, paired by seed)",
                      xaxis_title="lora_r", yaxis_title="ppl_after (mean, 95% interval)", xaxis_type="log",
                      xaxis=dict(tickvals=sorted(t["lora_r"].unique())), height=450)
    line = f"Rule: {FLAT_RULE}. " + "; ".join(parts)
    return fig, line + "." + note + _q4_1_note(rows)


# --- quantization apart from precision (parameters/precision.yaml with reports/quality) -----------------------

# The 2 x 2 cells: (quant, whether norms, embeddings and head train in float32: helpers.train.upcasts_to_fp32)
PRECISION_CELLS = {("none", False): "16-bit", ("none", True): "16-bit + fp32 upcast",
                   ("nf4", True): "NF4 (upcast, as QLoRA)", ("nf4", False): "NF4 + keep_16bit"}
# (name, numerator cell, denominator cell): ppl_after of one over the other, paired by rank and seed
PRECISION_RATIOS = (
    ("quantization, precision matched: both upcast", ("nf4", True), ("none", True)),
    ("quantization, precision matched: neither upcast", ("nf4", False), ("none", False)),
    ("quantization and precision mixed (as the quality study compared)", ("nf4", True), ("none", False)),
    ("precision alone, 16-bit base: upcast / not", ("none", True), ("none", False)),
    ("precision alone, NF4 base: upcast / not", ("nf4", True), ("nf4", False)),
)


def precision_cells(rows: pd.DataFrame) -> pd.Series:
    """Each row's 2 x 2 cell (quant, upcast), or None for a quant outside the design."""
    from .train import upcasts_to_fp32

    def cell(r):
        q = r.get("quant")
        if q not in ("none", "nf4"):
            return None
        return (q, upcasts_to_fp32(q, bool(r.get("keep_16bit") or False), bool(r.get("fp32_upcast") or False)))
    return pd.Series([cell(r) for r in rows.to_dict("records")], index=rows.index, dtype=object)


def precision_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The PRECISION_RATIOS of ppl_after, paired by rank and seed (runs alike in every other config key): per
    comparison, the ratio's mean with its 95% t interval over seeds (a seed's ranks averaged first: they share the
    batch order), n_seeds, n_pairs, how many pairs the numerator is worse / better in, and the mean ratio per rank.
    Rows with no pairs are left out."""
    rows, _ = _quality_rows(summary, "ppl_after")
    cols = ["comparison", "n_seeds", "n_pairs", "ratio", "ci95", "lo", "hi", "worse", "better", "by_rank"]
    if rows.empty:
        return pd.DataFrame(columns=cols).set_index("comparison")
    cells = precision_cells(rows)
    out = []
    for name, num, den in PRECISION_RATIOS:
        pairs = paired_differences(rows, "ppl_after", cells == num, cells == den,
                                   key_exclude=("quant", "keep_16bit", "fp32_upcast"))
        if pairs.empty:
            continue
        s = paired_summary(pairs)
        rank = pairs["pair"].str.extract(r"\br(\d+)\b")[0]
        by_rank = (1 + pairs.groupby(rank)["pct"].mean() / 100).sort_index(key=lambda x: x.astype(int))
        out.append({"comparison": name, "n_seeds": s["n_seeds"], "n_pairs": s["n_pairs"],
                    "ratio": 1 + s["mean_pct"] / 100, "ci95": s["ci95_pct"] / 100,
                    "lo": 1 + s["lo_pct"] / 100, "hi": 1 + s["hi_pct"] / 100, "worse": s["worse"],
                    "better": s["better"], "by_rank": ", ".join(f"r{r} {v:.4f}x" for r, v in by_rank.items())})
    return pd.DataFrame(out, columns=cols).set_index("comparison")


def precision_matched(summary: pd.DataFrame):
    """NF4 over 16-bit perplexity after training with precision matched both ways (both arms upcast, neither
    upcast), beside the mixed comparison and precision's own effect; paired by rank and seed, 95% intervals. Needs
    the 2 x 2 cells, which parameters/precision.yaml adds to reports/quality (load_sweeps of both folders)."""
    rows, note = _quality_rows(summary, "ppl_after")
    t = precision_table(summary)
    matched = [n for n, *_ in PRECISION_RATIOS[:2] if n in t.index]
    if not matched:
        have = sorted({PRECISION_CELLS[c] for c in precision_cells(rows).dropna()}) if not rows.empty else []
        return None, ("No precision-matched ratio: it needs NF4 and 16-bit runs of the same upcast (cells "
                      f"{list(PRECISION_CELLS.values())}; this summary has {have or 'none'}): run "
                      "parameters/precision.yaml and load it with reports/quality (analysis.load_sweeps)." + note)
    fig = go.Figure(go.Scatter(x=t["ratio"], y=t.index, mode="markers", marker=dict(size=11, color="#1f77b4"),
                               error_x=dict(type="data", array=t["ci95"], visible=True),
                               customdata=t[["n_pairs", "by_rank"]].values,
                               hovertemplate="%{y}<br>%{x:.4f}x (%{customdata[0]} pairs)<br>%{customdata[1]}"
                                             "<extra></extra>"))
    fig.add_vline(x=1.0, line_dash="dash", line_color="gray")
    fig.update_layout(title="Perplexity after training: NF4 over 16-bit with precision matched (paired, 95% CI)",
                      xaxis_title="ppl_after ratio", yaxis_autorange="reversed", height=380)

    def words(name):
        r = t.loc[name]
        ci = "one seed, no interval" if math.isnan(r["ci95"]) else f"95% CI {r['lo']:.4f}–{r['hi']:.4f}"
        return f"{r['ratio']:.4f}x ({ci}; worse in {r['worse']} of {r['n_pairs']} pairs; {r['by_rank']})"
    line = "NF4 / 16-bit with precision matched: " + "; ".join(f"{n.split(': ')[1]} {words(n)}" for n in matched)
    rest = [n for n, *_ in PRECISION_RATIOS[2:] if n in t.index]
    if rest:
        line += ". Beside it: " + "; ".join(f"{n} {words(n)}" for n in rest)
    return fig, line + "." + note + _q4_1_note(rows)


MEMORY_COLS = (("peak_process_est_gib", "peak process memory, estimated, GiB"),
               ("peak_nvml_process_used_gib", "peak process memory (NVML), GiB"),
               ("peak_reserved_gib", "peak reserved (torch), GiB"), ("peak_rss_gib", "peak resident memory, GiB"))


def cost_quality_frontier(summary: pd.DataFrame):
    """Mean ppl_after (95% interval) against this sweep's own median training time and peak memory per
    configuration; the dashed line is the Pareto front on the means (no other configuration is both cheaper and
    better). The memory measure is the widest one every configuration has (process estimate, NVML, reserved;
    resident memory on a CPU)."""
    problem = repeats_problem(summary)
    if problem:
        return None, f"No cost-quality frontier with intervals: {problem}."
    rows, note = _quality_rows(summary, "ppl_after")
    t = ppl_ci_table(summary)
    costs = rows.copy()  # side by side: no training time, no NVML figure is a run's own; torch's peaks are
    shared = side_by_side(costs)
    costs.loc[shared, ["train_s", "peak_process_est_gib", "peak_nvml_process_used_gib"]] = math.nan
    cost = costs.groupby("config", sort=False)[["train_s"] + [c for c, _ in MEMORY_COLS]].median().reindex(t.index)
    mem = next(((c, label) for c, label in MEMORY_COLS if cost[c].notna().all()), None)
    time_axis = [("train_s", "training time, s")] if cost["train_s"].notna().all() else []
    axes = time_axis + ([mem] if mem else [])
    if not axes:
        return None, ("No cost-quality frontier: no cost measure covers every configuration (runs side by side have "
                      "no training time of their own)." + side_by_side_note(rows))
    fig = make_subplots(rows=1, cols=len(axes), shared_yaxes=True, subplot_titles=[a[1] for a in axes])
    fronts = {}
    for i, (col, label) in enumerate(axes, start=1):
        ok = cost[col].notna()
        x, y = cost.loc[ok, col], t.loc[ok, "ppl_after_mean"]
        front = _pareto_front(x, y)
        fronts[col] = front
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers+text", text=x.index, textposition="top center",
                                 error_y=dict(type="data", array=t.loc[ok, "ppl_after_ci95"]),
                                 marker=dict(size=10, color="#1f77b4"), name="configuration", showlegend=i == 1,
                                 hovertemplate="%{text}<br>%{x:.2f}<br>ppl_after %{y:.3f}<extra></extra>"), row=1, col=i)
        fig.add_trace(go.Scatter(x=x[front], y=y[front], mode="lines", line=dict(color="#d62728", dash="dash"),
                                 name="Pareto front", showlegend=i == 1, hoverinfo="skip"), row=1, col=i)
        fig.update_xaxes(title_text=col, row=1, col=i)
    fig.update_yaxes(title_text="ppl_after (mean, 95% interval)", row=1, col=1)
    fig.update_layout(title="Cost vs quality across seeds (down-left is better)", height=480)

    def describe(col, unit):
        f = fronts[col]
        s = f"{f[0]} is cheapest ({cost.loc[f[0], col]:.2f}{unit}, ppl {_ci_words(t.loc[f[0], 'ppl_after_mean'], t.loc[f[0], 'ppl_after_ci95'])})"
        if len(f) > 1:
            s += (f", {f[-1]} best ({cost.loc[f[-1], col]:.2f}{unit}, ppl "
                  f"{_ci_words(t.loc[f[-1], 'ppl_after_mean'], t.loc[f[-1], 'ppl_after_ci95'])})")
        return s + f", {len(f)} of {len(t)} configurations on the front"
    parts = ["time front: " + describe("train_s", " s") if time_axis else
             "no time front (runs side by side have no training time of their own)"]
    parts.append(f"memory front ({mem[0]}): " + describe(mem[0], " GiB") if mem else
                 "no memory measure covers every configuration")
    line = "; ".join(parts)
    line = line[0].upper() + line[1:]
    return fig, line + "." + note + _q4_1_note(rows) + side_by_side_note(rows) + machines_note(own_costs(rows))


REPEAT_CHARTS = (perplexity_ci, quantization_gap, rank_returns, cost_quality_frontier)


# --- display -------------------------------------------------------------------------------------

class _ReportHtmlRenderer(MimetypeRenderer):
    """text/html for nbconvert: each figure's div and its Plotly.newPlot call, nothing else.

    Plotly's own 'notebook' renderer adds a MathJax <script src> from a CDN to every figure; this one
    adds no script from anywhere. plotly.js itself goes into the HTML report once (helpers.report's
    template); in JupyterLab the plotly_mimetype output renders the figure instead.
    """

    def to_mimebundle(self, fig_dict):
        html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                           default_width="100%", default_height=480, validate=False)
        return {"text/html": html}


def use_report_renderer() -> str:
    """Figures shown as both the Plotly MIME bundle (JupyterLab) and offline text/html (nbconvert's HTML)."""
    pio.renderers["report_html"] = _ReportHtmlRenderer()
    pio.renderers.default = "plotly_mimetype+report_html"
    return pio.renderers.default


def show(fig, takeaway: str) -> None:
    """The takeaway as a line of text, then the figure (or, for a skipped chart, only the sentence why)."""
    from IPython.display import Markdown, display

    display(Markdown(f"**Takeaway:** {takeaway}" if fig is not None else f"*Skipped.* {takeaway}"))
    if fig is not None:
        fig.show()


def explorer(summary: pd.DataFrame, history: pd.DataFrame):
    """ipywidgets selectors for JupyterLab: any per-step measure of any runs. Not kept in the HTML report."""
    try:
        import ipywidgets as widgets
    except ImportError:
        return "ipywidgets is not installed: the interactive explorer is not available."
    if history.empty:
        return "No per-step rows to explore in this sweep."
    measures = [c for c in ("loss", "step_time_s", "rss_gib", "allocated_gib", "reserved_gib",
                            "nvml_process_used_gib", "power_w", "learning_rate")
                if c in history.columns and pd.to_numeric(history[c], errors="coerce").notna().any()]
    names = {r: f"{c} · {r}" for r, c in history.groupby("run_id", sort=False)["config"].first().items()}
    measure = widgets.Dropdown(options=measures, value=measures[0], description="measure")
    chosen = widgets.SelectMultiple(options=[(v, k) for k, v in names.items()], value=tuple(names),
                                    description="runs", rows=min(8, len(names)),
                                    layout=widgets.Layout(width="70%"))

    def draw(measure, chosen):
        fig = go.Figure()
        for rid in chosen:
            g = history[history["run_id"] == rid].sort_values("step")
            fig.add_trace(go.Scatter(x=g["step"], y=pd.to_numeric(g[measure], errors="coerce"),
                                     mode="lines+markers", name=names[rid]))
        fig.update_layout(xaxis_title="step", yaxis_title=measure, height=420)
        fig.show()

    out = widgets.interactive_output(draw, {"measure": measure, "chosen": chosen})
    return widgets.VBox([widgets.HBox([measure, chosen]), out])

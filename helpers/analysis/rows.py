"""Row selections every chart shares: finished runs, medians per configuration, ratios to the 16-bit arm, whose
costs are a run's own (side by side, machines), quality rows (no synthetic runs), and the notes that travel with
them. Each chart of the package is a row selection (these), a figure and a takeaway; `drawn` joins the three.
"""
import math

import pandas as pd

from helpers.analysis.load import config_labels, quant_rank

Q4_1_NOTE = "smollm2-135m's weights were already rounded to 4 bits (Q4_1) in the GGUF it ships as"
UNKNOWN_MACHINE = "machine not recorded"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def drawn(selection, figure, takeaway):
    """(figure, takeaway) of a chart's row selection; a selection that is a str is the sentence saying why there is
    no chart: (None, it)."""
    if isinstance(selection, str):
        return None, selection
    return figure(selection), takeaway(selection)


def finished(summary: pd.DataFrame) -> pd.DataFrame:
    """The runs that are measured: status ok."""
    return summary[summary["status"] == "ok"]


def by_config(df: pd.DataFrame, cols) -> pd.DataFrame:
    """Median over repeats (seeds, budgets) per configuration, in the sweep's reading order."""
    order = list(dict.fromkeys(df["config"]))
    out = df.groupby("config", sort=False)[list(cols)].median(numeric_only=True)
    return out.reindex(order)


def quants_in(quants) -> list:
    """These quantizations (a column of them, or any iterable) once each, in the chart order (load.quant_rank),
    unknown ones last and alphabetical."""
    return sorted(set(quants), key=lambda q: (quant_rank(q), q))


def vs_16bit(rows: pd.DataFrame, col: str) -> dict:
    """{quant: median ratio of col to the 16-bit arm's (quant none)}, over configurations alike in all but quant
    and run on one machine (machine_keys)."""
    rows = rows[rows[col].notna()]
    if rows.empty or not (rows["quant"] == "none").any():
        return {}
    key = config_labels(rows, exclude=("quant",)) + " @ " + machine_keys(rows)  # ratios within one machine only
    base = rows[rows["quant"] == "none"].groupby(key[rows["quant"] == "none"])[col].median()
    out = {}
    for quant in [q for q in quants_in(rows["quant"]) if q != "none"]:
        mine = rows["quant"] == quant
        vals = rows[mine].groupby(key[mine])[col].median()
        shared = vals.index.intersection(base.index)
        if len(shared):
            out[quant] = float((vals[shared] / base[shared]).median())
    return out


def vs_16bit_words(rows: pd.DataFrame, col: str, fmt, what: str = "") -> str:
    """'; <what>vs 16-bit LoRA in the same configuration: nf4 0.80x, ...' (fmt(ratio) per quant), '' without ratios."""
    ratios = vs_16bit(rows, col)
    if not ratios:
        return ""
    return f"; {what}vs 16-bit LoRA in the same configuration: " + ", ".join(f"{q} {fmt(r)}" for q, r in ratios.items())


def extremes_words(vals: pd.Series, one, least) -> str:
    """A takeaway's opening over medians per configuration: one(label) where a single configuration has the lowest
    and the highest value, else least(lowest label, highest label)."""
    lo, hi = vals.idxmin(), vals.idxmax()
    return one(lo) if lo == hi else least(lo, hi)


def device_words(summary: pd.DataFrame) -> str:
    devs = sorted({str(d) for d in summary["env_device"].dropna()})
    return ", ".join(devs) if devs else "an unknown device"


def on_cpu_only(summary: pd.DataFrame) -> bool:
    devs = {str(d) for d in summary["env_device"].dropna()}
    return bool(devs) and all(d == "cpu" for d in devs)


def budget_label(b: float) -> str:
    """A VRAM budget as a reader says it: 0 is no cap."""
    return "whole device" if b == 0 else f"{b:g} GiB"


# --- whose costs: side-by-side runs and machines ------------------------------------------------------------

def machine_labels(rows: pd.DataFrame) -> pd.Series:
    """Which machine each run ran on (helpers.training.runs.machine): host and boot id (a reboot or a new lease of the same
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


def sharded_note(rows: pd.DataFrame) -> str:
    """What an FSDP run's cost figures are (helpers/training/sharded.py aggregates its processes): '' when no run used
    several GPUs."""
    n = pd.to_numeric(rows["num_gpus"], errors="coerce").fillna(1) if "num_gpus" in rows else pd.Series(dtype=float)
    several = n > 1
    if not several.any():
        return ""
    most = int(n.max())
    gpus = most if n[several].nunique() == 1 else f"up to {most}"
    return (f" {int(several.sum())} of {len(rows)} run(s) trained on {gpus} GPUs (num_gpus, FSDP): their memory is "
            "the fullest GPU's; their tokens/s and energy are all GPUs' together.")


def side_by_side_note(rows: pd.DataFrame) -> str:
    """Why runs are missing from a cost figure: they went side by side on one device; '' when none did."""
    shared = side_by_side(rows)
    if not shared.any():
        return ""
    n = int(pd.to_numeric(rows.loc[shared, "env_side_by_side"], errors="coerce").max())
    return (f" {int(shared.sum())} of {len(rows)} run(s) went up to {n} side by side on one device (helpers.sweep "
            "--jobs): their time, throughput and energy are the device's, not theirs, and are left out (quality "
            "only); torch's per-process memory peaks still hold, NVML's device-wide ones do not.")


# --- quality: finished, real-weight runs ----------------------------------------------------------------------

def quality_rows(summary: pd.DataFrame, col: str):
    """(finished non-synthetic runs with col, the note saying how many synthetic runs were left out)."""
    ok = finished(summary)
    synthetic = int(ok["synthetic"].sum())
    rows = ok[~ok["synthetic"] & ok[col].notna()]
    note = f" {synthetic} synthetic run(s) left out: random weights have no meaningful perplexity." if synthetic else ""
    return rows, note


def q4_1_note(rows: pd.DataFrame) -> str:
    """The default model's quality caveat, wherever its numbers are shown."""
    return f" Note: {Q4_1_NOTE}." if (rows["model"].astype(str) == "smollm2-135m").any() else ""


def pareto_front(x: pd.Series, y: pd.Series) -> list:
    """Labels no other point beats on both axes (lower x and lower y), sorted by x."""
    front, best_y = [], math.inf
    for label in sorted(x.index, key=lambda i: (x[i], y[i])):
        if y[label] < best_y:
            front.append(label)
            best_y = y[label]
    return front

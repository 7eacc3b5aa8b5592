"""Speed and memory levers (notebook 02; parameters/levers.yaml, benchmarks/fast_arm.py): each lever run against
the plain stack (registry.PLAIN_STACK) of the same configuration on the same machine, and the equivalence check
against the plain run of the same seed. The chart is `lever_rows`, `lever_figure` and `lever_takeaway`.
"""
import math

import pandas as pd
import plotly.graph_objects as go

from helpers.records.registry import PLAIN_STACK
from helpers.records.sidecars import loss_gap, step_losses
from helpers.analysis.load import config_labels
from helpers.analysis.rows import drawn, finished, machine_keys, machines_note, side_by_side, side_by_side_note

LEVER_KEYS = tuple(PLAIN_STACK)  # the levers and the two notebook knobs a lever sweep varies


def _lever_label(row, plain: dict = PLAIN_STACK) -> str:
    """'plain', or the settings that differ from the plain stack: 'fused_kernels + optimizer=adamw_torch_fused'."""
    changed = []
    for k in LEVER_KEYS:
        v = row.get(k)
        v = plain[k] if v is None or (isinstance(v, float) and math.isnan(v)) else v
        v = int(v) if isinstance(v, float) and v.is_integer() else v  # a column with gaps reads 8 as 8.0
        if v != plain[k]:
            changed.append(k if v is True else f"{k}={v}")
    return " + ".join(changed) or "plain"


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


def lever_check(plain_history, lever_history, plain_ppl_after=None, lever_ppl_after=None) -> dict:
    """CHECK_RULE for one lever run against its plain run (history rows: dicts or a DataFrame with step and loss).
    Returns plain_fall_pct (how far the plain run's loss fell, % of its start), fall_kept (the lever's fall over the
    plain run's, on the steps both logged), ppl_after_x (the lever's ppl_after over the plain run's), and verdict:
    'pass', 'FAIL', or 'cannot tell' (too few shared steps, no ppl_after, or a plain run that learned too little),
    with why."""
    out = {"plain_fall_pct": math.nan, "fall_kept": math.nan, "ppl_after_x": math.nan}
    lp, ll = step_losses(plain_history), step_losses(lever_history)
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
    plain = PLAIN_STACK
    ok = finished(summary).copy()
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


def lever_rows(summary: pd.DataFrame, table: pd.DataFrame | None = None):
    """The lever runs of lever_table (plain runs left out) and the finished runs the notes speak of, or why there
    is no comparison. table: lever_table(summary) when the caller has it already."""
    table = lever_table(summary) if table is None else table
    if table.empty:
        return ("No lever comparison: no finished run here differs from a finished plain-stack run of the "
                "same configuration by its levers alone (parameters/levers.yaml has such pairs).")
    return {"table": table, "levers": table[table["levers"] != "plain"], "runs": finished(summary)}


def lever_figure(sel: dict) -> go.Figure:
    runs_ = sel["levers"]
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
    return fig


def lever_takeaway(sel: dict) -> str:
    runs_, table = sel["levers"], sel["table"]
    timed = runs_[runs_["speed_x"].notna()]  # a ratio needs the lever and a plain run, one at a time, on one machine
    if len(timed):
        best = timed.iloc[timed["speed_x"].to_numpy().argmax()]  # the index (configuration) repeats: by position
        line = f"fastest: {best['quant']} · {best['levers']} at {best['speed_x']:.2f}x the plain stack's tokens/s"
    else:
        line = ("No speed ratio: no lever run has a plain run of its own machine, both run one at a time "
                "(side-by-side runs have no speed of their own; ratios are taken within one machine)")
    sized = runs_[runs_["reserved_vs_plain_gib"].notna()]
    mem = sized.iloc[sized["reserved_vs_plain_gib"].to_numpy().argmin()] if len(sized) else None
    if mem is not None and mem["reserved_vs_plain_gib"] < 0:
        line += (f"; most memory saved: {mem['quant']} · {mem['levers']}, {-mem['reserved_vs_plain_gib']:.2f} GiB "
                 f"less peak reserved")
    slower = runs_[runs_["speed_x"] < 1]
    if len(slower):
        line += "; slower than plain: " + ", ".join(f"{q} · {lv} ({x:.2f}x)" for q, lv, x in
                                                   slower[["quant", "levers", "speed_x"]].values)
    line += ". One run per arm: differences inside run-to-run noise (see the sweep) are not resolved; " \
            "benchmarks/fast_arm.py measures plain vs optimised in interleaved pairs"
    if "check" in table.columns:
        verdicts = runs_["check"].value_counts()
        line += (f". Equivalence ({CHECK_RULE}): " + ", ".join(f"{n} {v}" for v, n in verdicts.items()))
        failed = runs_[runs_["check"] == "FAIL"]
        if len(failed):
            line += " (FAIL: " + ", ".join(f"{q} · {lv}" for q, lv in failed[["quant", "levers"]].values) + ")"
    return line + "." + side_by_side_note(sel["runs"]) + machines_note(sel["runs"])


def lever_effects(summary: pd.DataFrame, table: pd.DataFrame | None = None):
    """Each lever's (and each combination's) speed against the plain stack of the same configuration.
    table: lever_table(summary) when the caller has it already."""
    return drawn(lever_rows(summary, table), lever_figure, lever_takeaway)

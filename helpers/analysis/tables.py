"""Tables (notebook 02, "The sweep" and "Every run"): how many runs and how they ended, against the plan the
sweep recorded, and every run with its outcome. The plan is read from the sweep folder's plan.json, which the
sweep writes when it starts (helpers.records.sidecars.write_plan): the analysis never reads the sweep file itself.
"""
from collections import Counter
from pathlib import Path

import pandas as pd

from helpers.records import sidecars
from helpers.records.paths import shown
from helpers.analysis.rows import budget_label, device_words, side_by_side

NO_PLAN = (" This folder has no plan record (plan.json, which helpers.sweep writes when a sweep starts; folders "
           "filled before that have none), so runs that were planned but never ran would not show here.")


def overview(summary: pd.DataFrame) -> str:
    """One line: how many runs, by status, on what device."""
    if summary.empty:
        return "This sweep folder has no runs yet."
    counts = summary["status"].value_counts()
    parts = ", ".join(f"{counts[s]} {s}" for s in ("ok", "oom", "error", "corrupt", "unfinished") if s in counts)
    names = sorted({str(n) for n in summary.get("env_device_name", pd.Series(dtype=object)).dropna()})
    where = device_words(summary) + (f" ({', '.join(names)})" if names else "")
    bad_nb = int((summary["notebook"] == "corrupt").sum())
    nb = f"; {bad_nb} executed run notebook(s) unreadable" if bad_nb else ""
    return f"{len(summary)} runs: {parts}; on {where}{nb}."


def plan_status(sweep_dir, summary: pd.DataFrame, sweep_file=None) -> str:
    """Against the plan the sweep recorded in this folder (plan.json): how many planned runs have a result, which
    are missing (and how to resume), and which runs here it does not plan. sweep_file: count only a plan written
    from that sweep file. '' when the folder is no sweep folder or its plan is another sweep file's; NO_PLAN when
    the folder has runs but no plan record (filled before plans were recorded)."""
    folder = Path(sweep_dir)
    try:
        plan = sidecars.read_plan(folder)
    except ValueError as e:
        return f" Its plan record cannot be read: {e}."
    if plan is None:
        return NO_PLAN if (folder / "runs").is_dir() else ""
    if sweep_file is not None and plan["sweep_file"] != str(shown(sweep_file)):
        return ""
    return _plan_words(plan, summary)


def _missing_key(missing: list, plan: dict) -> str | None:
    """The varying setting that best names the runs still to run: the fewest distinct values among them, then
    values the plan's other runs rarely have (a lever that is on where most runs have it off), then plan order."""
    keys = [k for k in plan.get("varying") or [] if k != "seed"]
    if not keys:
        return None

    def score(k):
        usual = Counter(repr(r["config"].get(k)) for r in plan["runs"]).most_common(1)[0][0]
        values = [repr(r["config"].get(k)) for r in missing]
        return len(set(values)), sum(v == usual for v in values)

    return min(keys, key=score)  # min keeps the first of equals: plan order


def _plan_words(plan: dict, summary: pd.DataFrame) -> str:
    planned, sweep_file = plan["runs"], plan["sweep_file"]
    done = set(summary.loc[summary["status"].isin(sidecars.FINISHED), "run_id"]) if not summary.empty else set()
    missing = [r for r in planned if r["run_id"] not in done]
    if missing:
        key = _missing_key(missing, plan)
        groups = Counter(f"{key}={r['config'].get(key)}" for r in missing) if key else {}
        which = ", ".join(f"{g} ({n})" for g, n in groups.items())
        line = (f" **{len(planned) - len(missing)} of the {len(planned)} runs that `{sweep_file}` plans have a result**; "
                f"still to run: {which or len(missing)} (resume: `python -m helpers.sweep {sweep_file}`)")
    else:
        line = f" All {len(planned)} runs that `{sweep_file}` plans have a result"
    here = set(summary["run_id"]) if not summary.empty else set()
    extra = here - {r["run_id"] for r in planned}
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
        t["vram_budget_gib"] = [budget_label(b) for b in pd.to_numeric(t["vram_budget_gib"]).fillna(0.0)]
        t = t.rename(columns={"vram_budget_gib": "memory budget"})
    if "synthetic" in summary.columns:  # random weights: a perplexity, but no quality figure
        t.loc[summary["synthetic"].fillna(False).astype(bool).values, "ppl_after"] = None
    if "seed" in t.columns:
        t["seed"] = pd.to_numeric(t["seed"], errors="coerce").astype("Int64")
    t.index = range(1, len(t) + 1)
    return t

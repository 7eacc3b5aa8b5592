"""A user's run of a published sweep, set beside the published reference: same answer, or a loud flag.

Published sweeps live in `reports/<name>/` and are read-only references; a user's runs go to
`reports/local/<name>/` (git ignores it; `helpers.sweep`'s default). For each configuration in both (the run
id is derived from the parameters, so the same configuration has the same id in both folders):

- perplexity before and after training: the same weights, data, seed and steps should give the same
  figure on any machine to within PPL_TOLERANCE (1%; float32 CPU runs agreed to 1e-5 across machines). A
  larger difference is flagged, naming the configuration, both values and what differs in the environment.
- tokens/s: a ratio "this machine / reference", never flagged (speed is the machine's).
- peak memory on a GPU (torch's peak reserved): the same configuration should need the same memory, so a
  difference over MEMORY_TOLERANCE is flagged; a CPU's resident memory is shown as a ratio only.

Selecting the rows (`comparison`), telling what differs (`environment_differences`) and the English
(`flags`, `verdict`) are separate, so a test can perturb a reference value and see it flagged.
"""
from pathlib import Path

import pandas as pd

from helpers.analysis import load_sweep
from helpers.records.paths import PUBLISHED_REPORTS, shown
PPL_TOLERANCE = 0.01
MEMORY_TOLERANCE = 0.10
# what can make the same configuration give another figure: the CPU (its instructions pick kernels), the
# GPU, and the library versions
ENV_KEYS = ("device_name", "cpu_model", "cpu_flags", "torch", "transformers", "peft", "bitsandbytes")


def reference_dir(folder) -> Path | None:
    """The published folder to compare a sweep folder with: reports/<name>/ when `folder` is not itself a
    published folder and reports/<name>/runs exists; else None."""
    folder = Path(folder).resolve()
    ref = PUBLISHED_REPORTS / folder.name
    if folder == ref.resolve() or not (ref / "runs").is_dir():
        return None
    return ref


def _finished(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["status"] == "ok"].set_index("run_id")


def comparison(summary: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration run `ok` in both: this machine's figure, the reference's, and their
    relative difference (perplexity, GPU memory) or ratio (speed); `flagged` says whether any is out of bounds."""
    here, ref = _finished(summary), _finished(reference)
    both = [r for r in here.index if r in ref.index]
    rows = []
    for rid in both:
        a, b = here.loc[rid], ref.loc[rid]
        row = {"run_id": rid, "config": a.get("config")}
        out = []
        for key in ("ppl_before", "ppl_after"):
            row[key], row[f"{key}_ref"] = a.get(key), b.get(key)
            row[f"{key}_diff_pct"] = _rel(a.get(key), b.get(key))
            if row[f"{key}_diff_pct"] is not None and abs(row[f"{key}_diff_pct"]) > 100 * PPL_TOLERANCE:
                out.append(key)
        row["tokens_per_s_ratio"] = _ratio(a.get("tokens_per_s"), b.get("tokens_per_s"))
        on_gpu = str(a.get("env_device")).startswith("cuda") and str(b.get("env_device")).startswith("cuda")
        mem = "peak_reserved_gib" if on_gpu else "peak_rss_gib"
        row["memory_measure"] = mem
        row["memory_ratio"] = _ratio(a.get(mem), b.get(mem))
        if on_gpu and row["memory_ratio"] is not None and abs(row["memory_ratio"] - 1) > MEMORY_TOLERANCE:
            out.append(mem)
        row["out_of_bounds"] = ", ".join(out)
        row["flagged"] = bool(out)
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "config", "flagged"])


def _num(x):
    x = pd.to_numeric(x, errors="coerce")
    return None if pd.isna(x) else float(x)


def _rel(a, b):
    a, b = _num(a), _num(b)
    return None if a is None or not b else 100 * (a / b - 1)


def _ratio(a, b):
    a, b = _num(a), _num(b)
    return None if a is None or not b else a / b


def environment_differences(summary: pd.DataFrame, reference: pd.DataFrame) -> dict:
    """{key: (this machine's values, the reference's)} for each ENV_KEYS entry whose values differ; a sidecar
    made before a key was recorded counts as 'not recorded'."""
    out = {}
    for key in ENV_KEYS:
        col = f"env_{key}"

        def values(df):
            if col not in df.columns:
                return "not recorded"
            vals = sorted({str(v) for v in df[col].dropna()})
            return ", ".join(vals) if vals else "not recorded"

        here, ref = values(summary), values(reference)
        if here != ref:
            out[key] = (here, ref)
    return out


def flags(table: pd.DataFrame, env_diff: dict) -> list[str]:
    """One line per flagged configuration: what is out of bounds, both values, and what differs in the environment."""
    if table.empty or not table["flagged"].any():
        return []
    differs = "; ".join(f"{k}: {here} here, {ref} in the reference" for k, (here, ref) in env_diff.items())
    lines = []
    for row in table[table["flagged"]].to_dict("records"):
        parts = []
        for key in row["out_of_bounds"].split(", "):
            if key.startswith("ppl_"):
                parts.append(f"{key} {row[key]:.4f} here against {row[key + '_ref']:.4f} "
                             f"({row[key + '_diff_pct']:+.2f}%, more than ±{100 * PPL_TOLERANCE:g}%)")
            else:
                parts.append(f"{key} {row['memory_ratio']:.3f}× the reference (more than ±{100 * MEMORY_TOLERANCE:g}%)")
        lines.append(f"`{row['config']}` ({row['run_id']}): " + "; ".join(parts)
                     + f". Environment: {differs or 'no recorded difference'}.")
    return lines


def verdict(table: pd.DataFrame, env_diff: dict, ref: Path, missing: int) -> str:
    """The paragraph at the top of a report: agreement, or the flags."""
    ref_shown = shown(ref)
    if table.empty:
        return (f"Published reference `{ref_shown}`: no configuration here has an `ok` run in both folders yet, "
                "so nothing is compared.")
    speed = table["tokens_per_s_ratio"].dropna()
    speed_words = (f" Speed on this machine / reference: median {speed.median():.2f}× "
                   f"(range {speed.min():.2f}–{speed.max():.2f}×)." if len(speed) else "")
    gap = f" {missing} configuration(s) of the reference have no `ok` run here." if missing else ""
    lines = flags(table, env_diff)
    if not lines:
        worst = table[["ppl_before_diff_pct", "ppl_after_diff_pct"]].abs().max().max()
        return (f"**Same answer as the published reference** `{ref_shown}`: all {len(table)} configurations agree "
                f"within ±{100 * PPL_TOLERANCE:g}% in perplexity before and after training (largest difference "
                f"{worst:.3f}%).{speed_words}{gap}")
    head = (f"**⚠ Different answer from the published reference** `{ref_shown}` in {len(lines)} of {len(table)} "
            "configurations:")
    return "\n".join([head, *[f"- {line}" for line in lines], "", (speed_words + gap).strip()])


def compare(folder) -> tuple[str, pd.DataFrame] | None:
    """(verdict, table) for a sweep folder against its published reference, or None when it has none."""
    ref = reference_dir(folder)
    if ref is None:
        return None
    summary, _ = load_sweep(folder)
    reference, _ = load_sweep(ref)
    table = comparison(summary, reference)
    missing = len(set(_finished(reference).index) - set(table["run_id"]))
    return verdict(table, environment_differences(summary, reference), ref, missing), table


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison as a reader wants it: one row per configuration, figures rounded."""
    cols = ["config", "ppl_before", "ppl_before_ref", "ppl_before_diff_pct", "ppl_after", "ppl_after_ref",
            "ppl_after_diff_pct", "tokens_per_s_ratio", "memory_measure", "memory_ratio", "flagged"]
    return table[[c for c in cols if c in table.columns]].set_index("config").round(4)

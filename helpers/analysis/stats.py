"""Statistics across seeds (notebook 02, "Quality across seeds"): 95% Student t intervals, paired comparisons
(runs of one seed share their batch order, so differences are taken within a seed), the per-configuration
perplexity table and where returns in LoRA rank flatten. Tables and numbers only; the charts are in seeds.py.
"""
import math

import pandas as pd

from helpers.analysis.load import config_labels
from helpers.analysis.rows import quality_rows

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


def ci_words(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(half):
        return f"{mean:.{digits}f} (one seed, no interval)"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def ratio_words(mean: float, half: float, exact: bool) -> str:
    if exact:
        return f"{mean:.4f}x (exact: the same in every run)"
    if math.isnan(half):
        return f"{mean:.4f}x (one seed, no interval)"
    return f"{mean:.4f}x (95% CI {mean - half:.4f}–{mean + half:.4f})"


def repeats_problem(summary: pd.DataFrame) -> str | None:
    """None if some configuration has finished, non-synthetic runs from 2 or more seeds; else why not."""
    rows, note = quality_rows(summary, "ppl_after")
    if rows.empty:
        return ("no finished run has a quality figure" + (" (every finished run is synthetic)" if note else ""))
    if "seed" not in rows.columns or rows.groupby("config")["seed"].nunique().max() < 2:
        return NO_REPEATS
    return None


def ppl_ci_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (finished, non-synthetic runs): n_seeds, ppl_before and ppl_after as mean with the half
    width of their 95% t interval across seeds (ci95), and the interval's ends; the sweep's reading order."""
    rows, _ = quality_rows(summary, "ppl_after")
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
    """quant's col over the unquantized arm's (quant none), paired by seed and by every other config key
    (paired_differences).

    Per seed, the ratio at each shared configuration (e.g. each rank) is averaged; the seeds' averages give
    (mean, 95% half width, n_seeds, exact). exact: every paired ratio is the same number (a deterministic
    figure such as ppl_before on one device), so the ratio has no sampling spread at all.
    """
    pairs = paired_differences(rows, col, rows["quant"] == quant, rows["quant"] == "none", key_exclude=("quant",))
    if pairs.empty:
        return math.nan, math.nan, 0, False
    ratio = pairs["a"] / pairs["b"]
    per_seed = ratio.groupby(pairs["seed"].values).mean()
    exact = bool(ratio.max() - ratio.min() <= 1e-12 * abs(ratio.mean()))
    mean, half, n = mean_ci95(per_seed)
    return mean, (0.0 if exact else half), n, exact


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


def paired_rank_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Each rank against the best rank (lowest mean ppl_after) of its arm (the config label without lora_r),
    paired by seed: n_seeds, mean paired difference in %, its 95% interval, how many seeds it is worse / better
    in, and whether it is flat by FLAT_RULE. One row per arm and rank, in the sweep's order."""
    rows, _ = quality_rows(summary, "ppl_after")
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


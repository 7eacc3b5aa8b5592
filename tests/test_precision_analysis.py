"""The precision-matched NF4 / 16-bit ratio (issue 15): new cells of parameters/precision.yaml in one folder, the
quality study's arms in another (sidecars from before fp32_upcast existed), paired by rank and seed."""
import math

import pytest

from helpers import analysis
from test_analysis import fake_record, write_run

SEED = (0.99, 1.01, 1.0)  # shared by every arm of a seed: pairing cancels it
RANK = {8: 1.002, 16: 1.0}


def two_folders(tmp_path, cells):
    """cells: {(folder, quant, extra config as a tuple of items): ppl_after at r16, seed factor 1}."""
    for (folder, quant, extra), ppl in cells.items():
        for r in RANK:
            for seed in range(3):
                rec = fake_record(False, quant=quant, lora_r=r, seed=seed, **dict(extra))
                rec["metrics"]["ppl_after"] = ppl * RANK[r] * SEED[seed]
                write_run(tmp_path / folder, rec, notebook=False)
    return [tmp_path / f for f in dict.fromkeys(f for f, _, _ in cells)]


QUALITY = {("quality", "none", ()): 10.0, ("quality", "nf4", ()): 10.6}  # old sidecars: no keep_16bit, no fp32_upcast
PRECISION = {("precision", "none", (("fp32_upcast", True), ("keep_16bit", False))): 10.1,
             ("precision", "nf4", (("fp32_upcast", False), ("keep_16bit", True))): 10.5}


def test_precision_matched_both_ways_paired_by_rank_and_seed(tmp_path):
    summary, _ = analysis.load_sweeps(two_folders(tmp_path, {**PRECISION, **QUALITY}))
    assert set(summary["sweep"]) == {"precision", "quality"} and summary["fp32_upcast"].notna().all()
    t = analysis.precision_table(summary)
    expected = {"quantization, precision matched: both upcast": 10.6 / 10.1,
                "quantization, precision matched: neither upcast": 10.5 / 10.0,
                "quantization and precision mixed (as the quality study compared)": 1.06,
                "precision alone, 16-bit base: upcast / not": 1.01,
                "precision alone, NF4 base: upcast / not": 10.6 / 10.5}
    assert list(t.index) == list(expected)
    for name, ratio in expected.items():
        row = t.loc[name]
        assert row["ratio"] == pytest.approx(ratio) and row["ci95"] == pytest.approx(0, abs=1e-12)
        assert (row["n_seeds"], row["n_pairs"], row["worse"]) == (3, 6, 6)
    assert t.loc["quantization, precision matched: neither upcast", "by_rank"] == "r8 1.0500x, r16 1.0500x"
    fig, line = analysis.precision_matched(summary)
    assert fig is not None
    assert line.startswith("NF4 / 16-bit with precision matched: both upcast 1.0495x (95% CI 1.0495–1.0495; "
                           "worse in 6 of 6 pairs")


def test_unpaired_runs_and_missing_cells_say_so(tmp_path):
    summary, _ = analysis.load_sweeps(two_folders(tmp_path, QUALITY))
    fig, line = analysis.precision_matched(summary)  # the quality study alone: only the mixed comparison
    assert fig is None and "No precision-matched ratio" in line and "parameters/precision.yaml" in line
    # a new cell that differs in something else (here max_steps) pairs with nothing
    other = {("precision", "nf4", (("keep_16bit", True), ("max_steps", 12))): 10.5}
    summary, _ = analysis.load_sweeps(two_folders(tmp_path / "b", {**other, **QUALITY}))
    assert "neither" not in " ".join(analysis.precision_table(summary).index)


def test_seed_noise_gives_an_interval(tmp_path):
    cells = {**PRECISION, **QUALITY}
    folders = two_folders(tmp_path, cells)
    # one pair (nf4 keep_16bit, r16, seed 2) 1% worse: the seed means differ, the interval opens
    summary, _ = analysis.load_sweeps(folders)
    i = summary.index[(summary["quant"] == "nf4") & (summary["keep_16bit"] == True) & (summary["lora_r"] == 16)  # noqa: E712
                      & (summary["seed"] == 2)][0]
    summary.loc[i, "ppl_after"] *= 1.01
    row = analysis.precision_table(summary).loc["quantization, precision matched: neither upcast"]
    # per seed (ranks averaged): 5%, 5%, 5.525% -> mean 5.175%, sd 0.3031%, half 4.303 x 0.3031 / sqrt(3)
    assert row["ratio"] == pytest.approx(1.05175)
    assert row["ci95"] == pytest.approx(4.303 * 0.0030311 / math.sqrt(3), rel=1e-3)

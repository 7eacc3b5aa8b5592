"""benchmarks/max_context.py: the bisection, and a CPU smoke run of the whole script on the tiny shape."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("max_context", ROOT / "benchmarks" / "max_context.py")
max_context = importlib.util.module_from_spec(spec)
spec.loader.exec_module(max_context)


@pytest.mark.parametrize("limit", [128, 129, 700, 896, 1000, 1023, 4095])
def test_bisection_finds_largest_multiple_that_fits(limit):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    best, fail = max_context.bisect(fits, 128, 4096, 128)
    assert best == limit // 128 * 128 and fail == best + 128
    assert all(n % 128 == 0 for n in tried) and len(tried) <= 7  # log2(4096 / 128) + 1 probes


def test_bisection_reports_a_capped_search():
    assert max_context.bisect(lambda n: True, 128, 4096, 128) == (4096, None)


@pytest.mark.slow
def test_script_runs_on_cpu_with_tiny_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mc.json"
    max_context.main(["--model", "tiny-llama-shape", "--device", "cpu", "--max-seq", "512", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["synthetic"] is True and r["results"][0]["budget_gib"] is None  # no budget on a CPU
    assert r["results"][0]["max_seq_len"] == 512 and r["results"][0]["search_capped"] is True
    assert all(p["ok"] and p["loss"] > 0 for p in r["probes"])
    assert out.with_suffix(".csv").read_text().startswith("budget_gib,max_seq_len")

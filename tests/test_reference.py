"""A user's run of a published sweep against the published reference (helpers/analysis/reference.py), and publishing."""
import io
import json
import shutil

import pytest

from helpers.records import paths
from helpers.sweeps import publish
from helpers.analysis import reference
from helpers.sweeps.sweep import load_sweep

PUBLISHED_DEFAULT = paths.PUBLISHED_REPORTS / "default" / "runs"


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """reports/default (the published reference) and reports/local/default (this machine's copy of it)."""
    published = tmp_path / "reports"
    monkeypatch.setattr(reference, "PUBLISHED_REPORTS", published)
    monkeypatch.setattr(publish, "PUBLISHED_REPORTS", published)
    ref, mine = published / "default", published / "local" / "default"
    for folder in (ref, mine):
        shutil.copytree(PUBLISHED_DEFAULT, folder / "runs")
    return ref, mine


def _edit(sidecar, fn):
    record = json.loads(sidecar.read_text())
    fn(record)
    sidecar.write_text(json.dumps(record))


def test_the_same_runs_agree_and_speed_is_a_ratio(folders):
    ref, mine = folders
    words, table = reference.compare(mine)
    assert len(table) == 4 and not table["flagged"].any()
    assert (table["tokens_per_s_ratio"] == 1).all()
    assert words.startswith("**Same answer as the published reference**") and "all 4 configurations" in words


def test_a_perturbed_reference_value_is_flagged_naming_config_values_and_environment(folders):
    ref, mine = folders
    [nf4_r8] = ref.glob("runs/*-nf4-r8-*.json")
    original = json.loads(nf4_r8.read_text())["metrics"]["ppl_after"]
    _edit(nf4_r8, lambda r: r["metrics"].update(ppl_after=original * 1.03))
    _edit(nf4_r8, lambda r: r["environment"].update(cpu_flags=["avx2"], bitsandbytes="0.49.0"))
    words, table = reference.compare(mine)
    assert table["flagged"].sum() == 1
    row = table[table["flagged"]].iloc[0]
    assert row["run_id"] == nf4_r8.stem and row["out_of_bounds"] == "ppl_after"
    assert row["ppl_after_diff_pct"] == pytest.approx(100 * (1 / 1.03 - 1))
    assert words.startswith("**⚠ Different answer from the published reference**")
    assert f"{original:.4f} here against {original * 1.03:.4f}" in words
    assert f"`{row['config']}` ({nf4_r8.stem})" in words  # the configuration, by label and run id
    assert "bitsandbytes: 0.50.2 here, 0.49.0, 0.50.2 in the reference" in words


def test_gpu_memory_must_agree_but_cpu_memory_need_not(folders):
    ref, mine = folders
    for folder, mem in ((ref, 10.0), (mine, 12.0)):
        for sidecar in folder.glob("runs/*.json"):
            _edit(sidecar, lambda r: (r["environment"].update(device="cuda"),
                                      r["metrics"].update(peak_reserved_gib=mem)))
    _, table = reference.compare(mine)
    assert table["flagged"].all() and set(table["out_of_bounds"]) == {"peak_reserved_gib"}


def test_a_published_folder_has_no_reference_but_itself(folders):
    ref, mine = folders
    assert reference.compare(ref) is None
    assert reference.reference_dir(mine) == ref


def test_sweeps_run_into_the_local_folder_by_default():
    sweep = load_sweep(paths.PROJECT_ROOT / "parameters" / "default.yaml")
    assert sweep["folder"] == paths.LOCAL_REPORTS / "default"


def test_publish_copies_readable_runs_and_lists_the_rest(folders):
    ref, mine = folders
    shutil.rmtree(ref)
    (mine / "runs" / "cut-short.ipynb").write_text("{}")  # a notebook whose run never wrote its sidecar
    [broken] = list(mine.glob("runs/*-none-r8-*.json"))
    broken.write_text("{not json")
    out = io.StringIO()
    target = publish.publish_sweep(mine, report=False, out=out)
    assert target == ref
    assert sorted(p.name for p in ref.glob("runs/*.json")) == sorted(
        p.name for p in mine.glob("runs/*.json") if p != broken)
    assert len(list(ref.glob("runs/*.ipynb"))) == 3 and not list(ref.glob("runs/*.tmp"))
    text = out.getvalue()
    assert "publish 3 run(s)" in text and "ok, new" in text
    assert f"not published: {broken.stem}" in text and "cut-short (no sidecar" in text


def test_publish_refuses_the_published_folder_itself(folders):
    ref, _ = folders
    with pytest.raises(ValueError, match="already the published folder"):
        publish.publish_sweep(ref, report=False, out=io.StringIO())


def test_publish_leaves_out_an_interrupted_run(folders):
    # a run cut off by Ctrl-C or a timeout is recorded `unfinished`: the sweep redoes it, so it is no reference
    ref, mine = folders
    shutil.rmtree(ref)
    [cut] = list(mine.glob("runs/*-none-r8-*.json"))
    _edit(cut, lambda r: r.update(status="unfinished", error="interrupted (Ctrl-C) at step 182/200"))
    out = io.StringIO()
    publish.publish_sweep(mine, report=False, out=out)
    assert not (ref / "runs" / cut.name).exists() and len(list(ref.glob("runs/*.json"))) == 3
    assert f"not published: {cut.stem} (status unfinished" in out.getvalue()

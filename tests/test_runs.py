import json
import os

import pytest

from helpers.training import runs
from tests.conftest import base_config


@pytest.mark.parametrize(
    "override, bad",
    [
        ({"quant": "q3"}, "quant='q3'"),
        ({"dtype": "half"}, "dtype='half'"),
        ({"optimizer": "adam"}, "optimizer='adam'"),
        ({"model": "no-such-model"}, "model='no-such-model'"),
        ({"corpus": "shakespeare"}, "corpus='shakespeare'"),
        ({"corpus": "missing.txt"}, "corpus='missing.txt'"),
        ({"lora_r": 0}, "lora_r=0"),
        ({"lora_r": -4}, "lora_r=-4"),
        ({"max_steps": 0}, "max_steps=0"),
        ({"seq_len": 8193}, "seq_len=8193"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"timing_warmup_steps": 30}, "timing_warmup_steps=30"),
        ({"device": "tpu"}, "device='tpu'"),
    ],
)
def test_validation_names_bad_value_and_allowed(override, bad):
    with pytest.raises(ValueError) as e:
        runs.validate(base_config(**override))
    msg = str(e.value)
    assert bad in msg
    assert any(w in msg for w in ("use one of", "use ", "at most", ">=", "in [", "..", "auto")), msg


def test_validation_lists_allowed_quants():
    with pytest.raises(ValueError, match=r"\['none', 'nf4', 'fp4', 'int8'\]"):
        runs.validate(base_config(quant="int4"))


def test_defaults_are_valid():
    runs.validate(base_config())


def test_seq_len_checked_against_local_model_context(tiny_model_dir):
    with pytest.raises(ValueError, match="context of 256"):
        runs.validate(base_config(model=str(tiny_model_dir), seq_len=512))
    runs.validate(base_config(model=str(tiny_model_dir), seq_len=256))


def test_missing_bitsandbytes_says_how_to_fix(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        runs.validate(base_config(quant="nf4"))
    runs.validate(base_config(quant="none"))  # the 16-bit arm does not need it


def test_run_id_is_derived_from_parameters():
    a = runs.run_id(base_config())
    assert a == runs.run_id(base_config(output_dir="elsewhere"))
    assert a != runs.run_id(base_config(lora_r=16))
    assert a.startswith("smollm2-135m-nf4-r8-")


def test_sidecar_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    runs.write_sidecar(path, {"status": "ok", "config": {"a": 1}, "metrics": {"x": float("nan")}})
    first = runs.read_sidecar(path)
    assert first["status"] == "ok" and first["metrics"]["x"] is None  # NaN written as null
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes, not mkstemp's 0600

    real_dump = json.dump

    def crash(obj, f, **kw):
        f.write('{"status": "ok", "config": {')  # a partial write, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.write_sidecar(path, {"status": "error", "config": {}})
    monkeypatch.setattr(json, "dump", real_dump)
    assert runs.read_sidecar(path) == first  # the old sidecar is intact
    assert os.listdir(tmp_path) == ["run.json"]  # no temp file left behind


def test_partial_sidecar_is_never_read_as_result(tmp_path):
    (tmp_path / "a.json").write_text('{"status": "ok", "config": {"quant"')
    (tmp_path / "b.json").write_text('{"other": 1}')
    runs.write_sidecar(tmp_path / "c.json", {"status": "ok", "config": {}})
    got = {r["run_id"] if "run_id" in r else "c": r["status"] for r in runs.read_all(tmp_path)}
    assert got == {"a": "corrupt", "b": "corrupt", "c": "ok"}

import pytest
import torch

from helpers.training import models


def test_embedded_model_needs_no_hub():
    models.check_model_name("smollm2-135m")
    assert models.context_length("smollm2-135m") == 8192


def test_missing_model_folder_is_named(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        models.resolve_model(str(empty))


def test_corrupt_model_folder_is_named(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(Exception, match=str(d)):
        models.load_model(str(d), quant="none")


def test_corrupt_gguf_is_named(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    dest = tmp_path / "converted"
    with pytest.raises(RuntimeError, match=str(bad)):
        models._gguf_to_safetensors(bad, dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == [bad]  # nothing half-converted left


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_quantized_load_counts_parameters_honestly(tiny_model_dir, quant):
    full, _, info16 = models.load_model(str(tiny_model_dir), quant="none", dtype="float32")
    _, n_full = models.count_parameters(full)
    assert n_full == sum(p.numel() for p in full.parameters())
    q, _, info = models.load_model(str(tiny_model_dir), quant=quant, dtype="float32")
    assert info["params_total"] == n_full  # 4-bit weights are packed two per byte, counted once each
    assert info["weights_gib"] < info16["weights_gib"]
    assert info["dtype_resolved"] == "float32"


def test_auto_dtype():
    assert models.resolve_dtype("auto", "cpu") == "float32"
    assert models.resolve_dtype("auto", "cuda") == "bfloat16"
    assert models.resolve_dtype("float16", "cpu") == "float16"


def test_nf4_weights_well_under_half_of_16bit_for_linear_heavy_model(tmp_path):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_config, tiny_tokenizer

    # Linear layers dominate (as in any real LLM): NF4 must take well under half the 16-bit bytes
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    _, _, bf16 = models.load_model(str(tmp_path), quant="none", dtype="bfloat16")
    _, _, nf4 = models.load_model(str(tmp_path), quant="nf4", dtype="bfloat16")
    assert nf4["weights_gib"] < 0.4 * bf16["weights_gib"]


def test_bnb_cast_message_is_logged_once(caplog):
    import logging

    models._say_bnb_casts_once()
    models._say_bnb_casts_once()  # idempotent: one filter, not two
    log = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        log.warning("another message")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization") == 1
    assert "another message" in msgs

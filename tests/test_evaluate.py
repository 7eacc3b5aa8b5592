import math

import torch

from helpers.training.evaluate import perplexity


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


def test_perplexity_of_blocks_of_unequal_length_weighs_tokens(tiny_model):
    torch.manual_seed(3)
    blocks = [torch.randint(0, 128, (n,)) for n in (12, 12, 5, 30, 30, 30)]
    got = perplexity(tiny_model, blocks, batch_size=2)  # batches: 2 x 12, 1 x 5, 2 x 30, 1 x 30
    parts = [perplexity(tiny_model, torch.stack(blocks[i:j]), batch_size=8) for i, j in ((0, 2), (2, 3), (3, 6))]
    assert got["tokens"] == 11 + 11 + 4 + 3 * 29 == sum(p["tokens"] for p in parts)
    assert math.isclose(got["nll_sum"], sum(p["nll_sum"] for p in parts), rel_tol=1e-5)
    mean_of_blocks = math.exp(sum(math.log(perplexity(tiny_model, b[None])["ppl"]) for b in blocks) / len(blocks))
    assert not math.isclose(got["ppl"], mean_of_blocks, rel_tol=1e-4)  # the short block does not weigh as much

"""Token-weighted perplexity: exp(sum of token NLL / number of tokens), not a mean of batch losses."""
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, device=None) -> dict:
    """Perplexity of `model` on token blocks [n, seq_len]; every position but the first is scored.

    Returns {"ppl", "nll_sum", "tokens"} so results can be pooled across calls exactly.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    nll_sum, tokens = 0.0, 0
    try:
        for i in range(0, len(blocks), batch_size):
            x = blocks[i : i + batch_size].to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            target = x[:, 1:]
            nll_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum").item()
            tokens += target.numel()
    finally:
        model.train(was_training)
    return {"ppl": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens}

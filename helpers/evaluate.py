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


def held_out_curve(model, blocks: torch.Tensor, every: int, steps, batch_size: int = 8):
    """A transformers TrainerCallback that scores `blocks` every `every` optimizer steps and writes eval_ppl
    into that step's telemetry row (`steps`: a helpers.telemetry.StepTelemetry, which must come first in the
    Trainer's callbacks). The time and energy of these evaluations are handed to `steps` to leave out of the
    training figures, so throughput and energy per token stay those of training alone."""
    from transformers import TrainerCallback

    class HeldOutCurve(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % every and state.global_step != state.max_steps:
                return
            with steps.outside_training():
                result = perplexity(model, blocks, batch_size=batch_size)
            steps.history[-1]["eval_ppl"] = result["ppl"]

    return HeldOutCurve()

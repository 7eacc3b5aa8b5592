"""Token-weighted perplexity: exp(sum of token NLL / number of tokens), not a mean of batch losses."""
import math

import torch
import torch.nn.functional as F


def _batches(blocks, batch_size: int):
    """[n, seq_len] tensor: slices of batch_size rows. A list of 1-D tensors of any lengths: consecutive blocks of
    one length stacked, at most batch_size at a time (no padding, so no position is scored that is not a token)."""
    if isinstance(blocks, torch.Tensor):
        for i in range(0, len(blocks), batch_size):
            yield blocks[i : i + batch_size]
        return
    run = []
    for b in blocks:
        if run and (len(b) != len(run[0]) or len(run) == batch_size):
            yield torch.stack(run)
            run = []
        run.append(b)
    if run:
        yield torch.stack(run)


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 8, device=None) -> dict:
    """Perplexity of `model` on token blocks: a [n, seq_len] tensor, or a list of 1-D tensors of unequal lengths
    (at least 2 tokens each); every position but each block's first is scored, so a longer block weighs more.

    Returns {"ppl", "nll_sum", "tokens"} so results can be pooled across calls exactly.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    nll_sum, tokens = 0.0, 0
    try:
        for x in _batches(blocks, batch_size):
            x = x.to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            target = x[:, 1:]
            nll_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum").item()
            tokens += target.numel()
    finally:
        model.train(was_training)
    return {"ppl": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens}


def held_out_curve(model, blocks: torch.Tensor, every: int, steps, batch_size: int = 8):
    """A transformers TrainerCallback that scores `blocks` every `every` optimizer steps and writes eval_ppl
    into that step's telemetry row (`steps`: a helpers.training.telemetry.StepTelemetry, which must come first in the
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

"""Per-step time of the default configuration on this machine, and the telemetry callback's overhead.

    python benchmarks/cpu_step.py [--steps 6] [--pairs 60] [--overhead-seq-len 32]

1. The notebook's default configuration (smollm2-135m, NF4, r8, batch 2 x 256) trains --steps steps
   through the real Trainer with the telemetry callback: median step time and tokens/s.
2. Overhead, interleaved at the finest grain: one training loop alternates steps with and without
   the StepTelemetry hooks (A B, then B A, ...; both steps of a pair train on the same blocks), so
   machine-load drift hits both arms alike; overhead = median of the paired ratios - 1, with a
   bootstrap interval that says how finely this machine resolves it. Short steps (--overhead-seq-len)
   make it a stricter test, since the hooks' cost is per step. The time spent inside the hooks is
   also timed directly, which is the overhead without the noise of a shared machine.
"""
import argparse
import random
import statistics
import time
from types import SimpleNamespace

import torch

from helpers.training import data, models, telemetry
from helpers.training.train import attach_lora, make_trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="Trainer steps of the default configuration")
    ap.add_argument("--pairs", type=int, default=60, help="with/without step pairs for the overhead")
    ap.add_argument("--overhead-seq-len", type=int, default=32, help="short steps: a stricter test of a per-step cost")
    a = ap.parse_args()

    torch.manual_seed(0)
    net, tok, info = models.load_model("smollm2-135m", "nf4", "auto", True, device="cpu")
    net = attach_lora(net, "nf4", 8, 16, 0.05)
    train_docs = data.split_documents(data.load_documents("pydoc"))[0]
    print(f"smollm2-135m nf4 r8, dtype {info['dtype_resolved']}, {torch.get_num_threads()} threads", flush=True)

    # 1. the default configuration through the Trainer, as the notebook runs it
    blocks = data.tokenize_blocks(train_docs, tok, 256)
    steps = telemetry.StepTelemetry("cpu", tokens_per_step=2 * 255)
    make_trainer(net, blocks, device="cpu", dtype=info["dtype_resolved"], quant="nf4", max_steps=a.steps, batch_size=2,
                 grad_accum=1, learning_rate=2e-4, warmup_steps=0, optimizer="adamw_torch", seed=0,
                 callbacks=[steps], progress=False).train()
    s = steps.summary(warmup_steps=1)
    print(f"default configuration (batch 2 x 256): median step {s['step_time_median_s']:.2f} s, "
          f"{s['tokens_per_s']:.0f} tokens/s steady ({s['steps']} steps, first left out)", flush=True)

    # 2. overhead: the same loop, hooks on every other step
    seq = a.overhead_seq_len
    blocks = data.tokenize_blocks(train_docs, tok, seq)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cb = telemetry.StepTelemetry("cpu", tokens_per_step=2 * (seq - 1))
    state = SimpleNamespace(global_step=0)
    in_hooks = []

    step_times = []

    def step(i, hooks):
        x = blocks[(2 * i) % (len(blocks) - 2):][:2]
        t0 = time.perf_counter()
        if hooks:
            h0 = time.perf_counter()
            cb.on_step_begin(None, state, None)
            h = time.perf_counter() - h0
        net(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.global_step += 1
        if hooks:
            h0 = time.perf_counter()
            cb.on_step_end(None, state, None)
            cb.on_log(None, state, None, logs={"loss": 0.0, "learning_rate": 1e-4})
            in_hooks.append(h + time.perf_counter() - h0)
        step_times.append(time.perf_counter() - t0)
        return step_times[-1]

    step(0, True), step(1, False)  # warm-up, counted in neither arm
    ratios = []  # each pair trains on the same two blocks, so its ratio cancels the data's effect
    for i in range(a.pairs):
        t = {}
        for hooks in ((True, False) if i % 2 == 0 else (False, True)):
            t[hooks] = step(i, hooks)
        ratios.append(t[True] / t[False])
    med = statistics.median(ratios)
    rng = random.Random(0)  # bootstrap the median of the paired ratios: how well this machine resolves it
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    lo, hi = boot[50], boot[1949]
    print(f"overhead, {a.pairs} interleaved pairs of steps (batch 2 x {seq}): median paired ratio {med:.4f} "
          f"({(med - 1) * 100:+.2f}%, 95% bootstrap interval {(lo - 1) * 100:+.2f}% .. {(hi - 1) * 100:+.2f}%)")
    hook = statistics.median(in_hooks)
    print(f"time inside the telemetry hooks: median {hook * 1e6:.0f} us per step = "
          f"{hook / statistics.median(step_times) * 100:.4f}% of a step")


if __name__ == "__main__":
    main()

"""Per-step time of the default configuration on this machine, and the telemetry callback's overhead.

    python benchmarks/cpu_step.py [--pairs 4] [--steps 3] [--seq-len 256]

The two arms (Trainer with and without the StepTelemetry callback) are interleaved A B A B ... in one
process on the same model, and the overhead is the median of the per-pair ratios of wall time,
so drift in machine load hits both arms alike.
"""
import argparse
import statistics
import time

import torch

from helpers import data, models, telemetry
from helpers.train import attach_lora, make_trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4, help="A/B pairs (each arm trains --steps steps per pair)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--quant", default="nf4")
    a = ap.parse_args()

    torch.manual_seed(0)
    net, tok, info = models.load_model("smollm2-135m", a.quant, "auto", True, device="cpu")
    net = attach_lora(net, a.quant, 8, 16, 0.05)
    blocks = data.tokenize_blocks(data.split_documents(data.load_documents("pydoc"))[0], tok, a.seq_len)
    tokens_per_step = a.batch_size * (a.seq_len - 1)
    print(f"smollm2-135m quant={a.quant} dtype={info['dtype_resolved']} batch {a.batch_size} x {a.seq_len} tokens, "
          f"{torch.get_num_threads()} threads; {a.pairs} pairs x {a.steps} steps per arm", flush=True)

    def arm(with_callback: bool):
        steps = telemetry.StepTelemetry("cpu", tokens_per_step)
        tr = make_trainer(net, blocks, device="cpu", dtype=info["dtype_resolved"], quant=a.quant, max_steps=a.steps,
                          batch_size=a.batch_size, grad_accum=1, learning_rate=1e-4, warmup_steps=0,
                          optimizer="adamw_torch", seed=0, callbacks=[steps] if with_callback else [], progress=False)
        t0 = time.perf_counter()
        tr.train()
        return time.perf_counter() - t0, steps.history

    arm(False)  # warm-up: first-call allocations and thread pools, counted in neither arm
    ratios, with_t, without_t, step_times = [], [], [], []
    for i in range(a.pairs):
        order = (True, False) if i % 2 == 0 else (False, True)  # alternate which arm goes first
        t = {}
        for cb in order:
            t[cb], hist = arm(cb)
            step_times += [r["step_time_s"] for r in hist]
        with_t.append(t[True]); without_t.append(t[False])
        ratios.append(t[True] / t[False])
        print(f"  pair {i + 1}: with callback {t[True]:.2f} s, without {t[False]:.2f} s, ratio {ratios[-1]:.4f}", flush=True)
    med = statistics.median(step_times)
    print(f"per-step time (median of {len(step_times)} steps): {med:.2f} s -> {tokens_per_step / med:.0f} tokens/s")
    print(f"telemetry overhead: median ratio {statistics.median(ratios):.4f} "
          f"({(statistics.median(ratios) - 1) * 100:+.2f}%), "
          f"median wall with {statistics.median(with_t):.2f} s vs without {statistics.median(without_t):.2f} s")


if __name__ == "__main__":
    main()

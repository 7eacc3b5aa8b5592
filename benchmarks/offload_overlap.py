"""offload_activations on a GPU, three ways in one process: off, torch's save_on_cpu, and HostOffload (its copies
overlapping compute, helpers/training/levers.py): the same numbers first, then each one's pass time and peak memory.

    python benchmarks/offload_overlap.py --out reports/fast-arm/offload_overlap.json        # GPU, 7B shape: ~1.5 min
    python benchmarks/offload_overlap.py --torch-compile --keep-16bit --out reports/fast-arm/offload_overlap-c.json
    python benchmarks/offload_overlap.py --model tiny-llama-shape --device cpu --out /tmp/oo.json   # CPU smoke run

The model is loaded once (default: the synthetic llama-2-7b-shape, NF4, LoRA r16 on all linear layers, gradient
checkpointing, dropout 0), batch --batch-size x --seq-len random tokens. Each mode runs --passes forward + backward
passes of the same batch with no optimizer step, so every pass sees the same weights; the modes go in rounds whose
order reverses each round (off, save_on_cpu, overlapped | overlapped, save_on_cpu, off | ...). The check: the loss and
every LoRA gradient of each offloading mode's passes against the first pass with offloading off; the same difference
between two passes with it off is printed beside it, since some GPU kernels (attention's backward) add in a varying
order, so "the same bits" can only be asked where off agrees with itself. Timing: device-synchronised wall time of a
pass, median over every pass but each mode's first in a round; memory: peak allocated and reserved per mode (the
allocator cache emptied before each). Synthetic shapes: cost figures only.
"""
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.training import levers, models, runs, telemetry  # noqa: E402
from helpers.training.data import random_blocks  # noqa: E402
from helpers.training.train import attach_lora  # noqa: E402

GIB = 2**30
MODES = ("off", "save_on_cpu", "overlapped")


def context(mode: str, on_gpu: bool, min_bytes: int):
    if mode == "off":
        return contextlib.nullcontext()
    if mode == "save_on_cpu":  # what offload_activations did before HostOffload
        return torch.autograd.graph.save_on_cpu(pin_memory=on_gpu)
    return levers.HostOffload(min_bytes)


def one_pass(net, batch, mode, on_gpu, device, min_bytes=levers.OFFLOAD_MIN_BYTES):
    """(loss, {name: grad}, seconds) of one forward + backward pass."""
    telemetry.sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_gpu), context(mode, on_gpu, min_bytes):
        loss = levers.training_loss(net, batch, {}, on_gpu)
    loss.backward()
    telemetry.sync(device)
    seconds = time.perf_counter() - t0
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad and p.grad is not None}
    net.zero_grad(set_to_none=True)
    return loss.detach().float(), grads, seconds


def max_diff(a: tuple, b: tuple) -> float:
    """Largest absolute difference between two passes' losses and gradients (0.0: the same bits)."""
    (la, ga), (lb, gb) = a, b
    if ga.keys() != gb.keys():
        return float("inf")
    diffs = [(la - lb).abs().item()] + [(ga[n].float() - gb[n].float()).abs().max().item() for n in ga]
    return max(diffs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--quant", default="nf4", choices=models.QUANTS)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--passes", type=int, default=6, help="passes per mode and round (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep-16bit", action="store_true", help="QLoRA without peft's float32 upcast (our frugal arm)")
    ap.add_argument("--torch-compile", action="store_true", help="each decoder layer compiled (our frugal arm)")
    ap.add_argument("--no-checkpointing", action="store_true", help="offload every saved tensor, not layer inputs")
    ap.add_argument("--min-bytes", type=int, default=levers.OFFLOAD_MIN_BYTES,
                    help="HostOffload keeps saved tensors smaller than this (the lever's value by default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.passes < 2 or a.rounds < 1:
        ap.error(f"--passes={a.passes} must be >= 2 (the first is not timed) and --rounds={a.rounds} >= 1")
    device = runs.resolve_device(a.device)
    on_gpu = device.startswith("cuda")
    lever_cfg = {**levers.config_of({}), "keep_16bit": a.keep_16bit, "torch_compile": a.torch_compile}
    for name, value, allowed in levers.problems({**lever_cfg, "quant": a.quant}, on_gpu):
        ap.error(f"--{name.replace('_', '-')}={value!r} is not allowed: {allowed}")
    t_start = time.perf_counter()
    telemetry.gpu_baseline(device)
    models.resolve_model(a.model)
    net, _, info = models.load_model(a.model, a.quant, "auto", True, device=device)
    net = attach_lora(net, a.quant, a.lora_r, 2 * a.lora_r, 0.0, gradient_checkpointing=not a.no_checkpointing,
                      keep_16bit=a.keep_16bit)
    net = levers.apply_to_peft(net, lever_cfg)
    x = random_blocks(a.batch_size, a.seq_len, net.config.vocab_size, seed=0).to(device)
    batch = {"input_ids": x, "labels": x}
    print(f"{a.model} {a.quant} r{a.lora_r} batch {a.batch_size} x {a.seq_len} on {device}, checkpointing "
          f"{not a.no_checkpointing}, levers {({k: v for k, v in lever_cfg.items() if v}) or 'none'}", flush=True)

    reference = None
    times = {m: [] for m in MODES}
    diffs = {m: [] for m in MODES}
    peaks = {m: {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0} for m in MODES}
    for r in range(a.rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for k in range(a.passes):
                loss, grads, seconds = one_pass(net, batch, mode, on_gpu, device, a.min_bytes)
                if reference is None:
                    reference = (loss, grads)  # the first pass with offloading off
                    continue
                diffs[mode].append(max_diff(reference, (loss, grads)))
                if k:
                    times[mode].append(seconds)
            if on_gpu:
                peaks[mode]["peak_allocated_gib"] = max(peaks[mode]["peak_allocated_gib"],
                                                        torch.cuda.max_memory_allocated() / GIB)
                peaks[mode]["peak_reserved_gib"] = max(peaks[mode]["peak_reserved_gib"],
                                                       torch.cuda.max_memory_reserved() / GIB)
            print(f"  round {r} {mode:11}: median pass {statistics.median(times[mode]):.3f} s, largest difference "
                  f"from off's first pass {max(diffs[mode], default=0.0):.3g}", flush=True)
    noise = max(diffs["off"], default=0.0)  # off against itself
    tokens = a.batch_size * a.seq_len
    results = {}
    for m in MODES:
        worst = max(diffs[m], default=0.0)
        results[m] = {"median_pass_s": statistics.median(times[m]), "tokens_per_s": tokens / statistics.median(times[m]),
                      "max_diff_from_off": worst, "same_bits": worst == 0.0, "within_off_noise": worst <= noise,
                      **(peaks[m] if on_gpu else {"peak_allocated_gib": None, "peak_reserved_gib": None})}
    record = {"what": "offload_activations: off, torch's save_on_cpu, HostOffload; one process, same batch, no "
                      "optimizer step", "model": a.model, "synthetic": info["synthetic"], "device": device,
              "config": vars(a), "off_noise": noise, "results": results,
              "environment": runs.environment(device), "wall_s": time.perf_counter() - t_start}
    runs.write_sidecar(Path(a.out), {"status": "ok", **record})
    print(f"\n{'mode':>11} {'pass s':>7} {'tokens/s':>9} {'x off':>6} {'alloc GiB':>9} {'reserved GiB':>12} "
          f"{'max diff':>9}  check (off against itself: {noise:.3g})")
    for m, x in results.items():
        verdict = "same bits" if x["same_bits"] else ("within off's noise" if x["within_off_noise"] else "DIFFERS")
        print(f"{m:>11} {x['median_pass_s']:7.3f} {x['tokens_per_s']:9.0f} "
              f"{x['tokens_per_s'] / results['off']['tokens_per_s']:6.2f} {runs.cell(x['peak_allocated_gib'], '.2f'):>9} "
              f"{runs.cell(x['peak_reserved_gib'], '.2f'):>12} {x['max_diff_from_off']:9.3g}  {verdict}")
    print(f"wrote {a.out} in {record['wall_s']:.0f} s", flush=True)
    return record


if __name__ == "__main__":
    main()

"""Largest sequence length that trains under each VRAM budget (bisection), one model load for all budgets.

    python benchmarks/max_context.py --out reports/gpu-7b/max_context.json
    python benchmarks/max_context.py --model tiny-llama-shape --device cpu --out /tmp/mc.json   # CPU smoke run
    python benchmarks/max_context.py --stack unsloth --budgets 6 --max-seq 16384 --step 512 --lora-dropout 0 \
        --out reports/fast-arm/max_context-unsloth.json     # the peer stack, set up the same way (GPU, .[peer])

For a model (default: the synthetic llama-2-7b-shape, NF4 QLoRA, LoRA r=16 on all linear layers, gradient
checkpointing, AdamW, batch 1), one probe = one forward + backward + optimizer step on random tokens of a
given seq_len; it passes if no out-of-memory is raised and the loss is finite. For each budget (ascending),
torch's allocator is capped with set_per_process_memory_fraction and seq_len is bisected in multiples of
--step between the largest length known to pass and the smallest known to fail. After each probe the
allocator cache is emptied, so the next probe starts from the weights + LoRA + optimizer state alone.

Labels, as everywhere in this study: a budget is an *emulation* (an allocator cap on a larger card: the
CUDA context and non-torch memory are outside it, and are reported beside it); a synthetic model's figures
are cost figures only. Lengths beyond the model's context (--max-seq above it) are memory figures only.
On a CPU there is no allocator cap: one bisection without a budget is run (a smoke test of the procedure).
--stack unsloth loads the model and attaches LoRA with Unsloth (helpers/training/peer.py: its own checkpointing, none of
our levers, max_seq_length = --max-seq); the cap, the probe, the optimizer and the dropout are the same as ours.
Unsloth must be imported before transformers, so this script imports helpers.telemetry (which imports
transformers) only after peer.import_first, inside main and probe.
fits_real_card says whether torch's peak plus the non-torch part (CUDA context, cuBLAS) measured after the
step stays within the budget: where it is false, a real card of that size holds a shorter sequence.

Writes the JSON to --out and the table as CSV beside it (same name, .csv).
"""
import argparse
import csv
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.training import levers, models, peer, runs  # noqa: E402 - none of these imports transformers at import time
from helpers.training.data import random_blocks  # noqa: E402

GIB = 2**30


def probe(net, opt, seq_len: int, vocab: int, device: str, nvml, lever_cfg=None) -> dict:
    """One training step at batch 1; returns pass/fail with memory and time. Never raises an OOM."""
    from helpers.training import telemetry  # after peer.import_first (see the module docstring)

    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    x = random_blocks(1, seq_len, vocab, seed=seq_len).to(device)
    row = {"seq_len": seq_len, "ok": False, "loss": None, "step_s": None, "error": None,
           "peak_allocated_gib": None, "peak_reserved_gib": None, "non_torch_gib": None, "process_peak_est_gib": None}
    t0 = time.perf_counter()
    try:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_gpu):
            loss = levers.training_loss(net, {"input_ids": x, "labels": x}, lever_cfg or {}, on_gpu)
        loss.backward()
        opt.step()
        telemetry.sync(device)
        row["step_s"] = time.perf_counter() - t0
        row["loss"] = loss.item()
        row["ok"] = math.isfinite(row["loss"])
        if not row["ok"]:
            row["error"] = f"loss is not finite ({row['loss']})"
    except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is re-raised below
        if not runs.is_oom(e):
            raise
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        opt.zero_grad(set_to_none=True)
        loss = None
    if on_gpu:
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        now = telemetry.memory_now(device, nvml)  # NVML process used - torch reserved, at one instant
        row["non_torch_gib"] = now["non_torch_gib"]
        if now["non_torch_gib"] is not None:  # what a real card would have to hold: torch's peak + the rest
            row["process_peak_est_gib"] = row["peak_reserved_gib"] + now["non_torch_gib"]
    del x
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return row


def bisect(test, lo_ok: int, hi: int, step: int) -> tuple[int, int | None]:
    """Largest multiple of `step` in [lo_ok, hi] for which test passes, given test(lo_ok) passed (0: nothing
    known). Returns (largest passing length or 0, smallest failing length or None)."""
    if test(hi):
        return hi, None
    fail = hi
    lo = lo_ok
    while fail - lo > step:
        mid = (lo + fail) // 2 // step * step
        if mid <= lo:
            mid = lo + step
        if test(mid):
            lo = mid
        else:
            fail = mid
    return lo, fail


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--quant", default="nf4", choices=models.QUANTS)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (Unsloth's fast path needs 0)")
    ap.add_argument("--stack", default="hf", choices=peer.STACKS,
                    help="hf: ours, with the levers below; unsloth: the peer (GPU, pip install -e .[peer]), no levers")
    ap.add_argument("--budgets", default="6,8,12,24", help="GiB, comma-separated (GPU only)")
    ap.add_argument("--step", type=int, default=128, help="resolution of the bisection (tokens)")
    ap.add_argument("--max-seq", type=int, default=0, help="upper end of the search (default: the model's context)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--time-limit", type=float, default=0, help="seconds; stop probing after this (0: none)")
    ap.add_argument("--out", required=True, help="JSON path; the CSV table goes beside it")
    g = ap.add_argument_group("levers (helpers/training/levers.py; all off: the plain stack)")
    g.add_argument("--fused-kernels", action="store_true", help="Liger's Triton kernels (CUDA only)")
    g.add_argument("--torch-compile", action="store_true", help="torch.compile each decoder layer")
    g.add_argument("--offload-activations", action="store_true", help="saved activations to pinned host memory")
    g.add_argument("--keep-16bit", action="store_true", help="QLoRA: no float32 upcast of norms, embeddings, head")
    g.add_argument("--chunked-loss", type=int, default=0, help="head + loss over N token chunks (0: off)")
    g.add_argument("--tiled-mlp", type=int, default=0, help="each layer's MLP over N checkpointed sequence slices (0: off)")
    a = ap.parse_args(argv)
    lever_cfg = {k: getattr(a, k) for k in levers.LEVERS}

    device = runs.resolve_device(a.device)
    peer.import_first(a.stack, device)  # first: Unsloth patches transformers only if imported before it
    from helpers.training import telemetry

    on_gpu = device.startswith("cuda")
    for name, value, allowed in peer.problems({**lever_cfg, "quant": a.quant, "stack": a.stack}):
        ap.error(f"--{name.replace('_', '-')}={value!r} is not allowed: {allowed}")
    for name, value, allowed in levers.problems({**lever_cfg, "quant": a.quant}, on_gpu):
        ap.error(f"--{name.replace('_', '-')}={value!r} is not allowed: {allowed}")
    context = models.context_length(a.model)
    max_seq = a.max_seq or context
    if not max_seq or max_seq < a.step:
        ap.error(f"--max-seq={a.max_seq} with the model's context {context}: need an upper end >= --step ({a.step})")
    budgets = [float(b) for b in a.budgets.split(",")] if on_gpu else [None]
    t_start = time.perf_counter()
    baseline = telemetry.gpu_baseline(device)  # first touch of CUDA: reads the device before our context
    if on_gpu:
        total_gib = torch.cuda.get_device_properties(0).total_memory / GIB
        bad = [b for b in budgets if not 0 < b <= total_gib]
        if bad:
            ap.error(f"--budgets {bad}: each must be in (0, {total_gib:.1f}] GiB on this card")
        budgets.sort()
    models.resolve_model(a.model)  # write a synthetic checkpoint once, outside the timed load
    t0 = time.perf_counter()
    try:
        net, _, info = peer.load_model(a.stack, a.model, a.quant, "auto", True, device, max_seq)
    except RuntimeError as e:  # the peer cannot load here (no GPU, the extra missing): say so in one line
        sys.exit(f"--stack {a.stack}: {e}")
    load_s = time.perf_counter() - t0
    net = levers.apply_to_base(net, lever_cfg)
    net = peer.attach_lora(a.stack, net, a.quant, a.lora_r, 2 * a.lora_r, a.lora_dropout, keep_16bit=a.keep_16bit)
    net = levers.apply_to_peft(net, lever_cfg)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    vocab = net.config.vocab_size
    nvml = telemetry.Nvml(device)
    first = {**probe(net, opt, a.step, vocab, device, nvml, lever_cfg), "budget_gib": None}  # makes the optimizer state, uncapped
    if not first["ok"]:
        sys.exit(f"a {a.step}-token step fails even without a budget: {first['error']}")
    resident = torch.cuda.memory_allocated() / GIB if on_gpu else None  # weights + LoRA + optimizer state
    on = {k: v for k, v in lever_cfg.items() if v}
    print(f"stack {a.stack}, levers: {on or ('none (the plain stack)' if a.stack == 'hf' else 'none')}", flush=True)
    print(f"{a.model} quant={a.quant} r={a.lora_r} on {device}: load {load_s:.1f} s, weights {info['weights_gib']:.2f} GiB, "
          f"resident with LoRA + AdamW state {resident or float('nan'):.2f} GiB, CUDA context "
          f"{baseline['cuda_context_gib'] or float('nan'):.2f} GiB; search {a.step}..{max_seq} step {a.step}", flush=True)

    probes, results, known_ok = [first], [], a.step
    for budget in budgets:
        if a.time_limit and time.perf_counter() - t_start > a.time_limit:
            results.append({"budget_gib": budget, "max_seq_len": None, "note": "not measured: time limit reached"})
            continue
        if budget is not None:
            torch.cuda.set_per_process_memory_fraction(budget * GIB / (total_gib * GIB))
        rows = {}

        def test(n, budget=budget):
            r = probe(net, opt, n, vocab, device, nvml, lever_cfg)
            r["budget_gib"] = budget
            probes.append(r)
            rows[n] = r
            print(f"  budget {budget} GiB seq_len {n}: {'ok' if r['ok'] else 'fail'}"
                  + (f" step {r['step_s']:.2f} s, reserved {r['peak_reserved_gib'] or float('nan'):.2f} GiB" if r["ok"]
                     else f" ({r['error']})"), flush=True)
            return r["ok"]

        if not test(known_ok):  # the last budget's answer is this one's lower bound; check it holds here
            best, fail = (0, known_ok) if known_ok == a.step or not test(a.step) else bisect(test, a.step, known_ok, a.step)
        elif known_ok >= max_seq:
            best, fail = known_ok, None
        else:
            best, fail = bisect(test, known_ok, max_seq, a.step)
        known_ok = max(best, a.step)
        at = rows.get(best, {})
        results.append({
            "budget_gib": budget, "max_seq_len": best or None, "first_failing_seq_len": fail,
            "search_capped": fail is None, "beyond_context": bool(best and context and best > context),
            "peak_reserved_gib": at.get("peak_reserved_gib"), "peak_allocated_gib": at.get("peak_allocated_gib"),
            "non_torch_gib": at.get("non_torch_gib"), "process_peak_est_gib": at.get("process_peak_est_gib"),
            "fits_real_card": (None if at.get("process_peak_est_gib") is None or budget is None
                               else at["process_peak_est_gib"] <= budget),
            "step_s": at.get("step_s"),
            "probes": len(rows),
            "note": ("search reached --max-seq: the true limit is higher" if fail is None else "")
                    + (" (no fit even at the smallest length)" if not best else ""),
        })
    if on_gpu:
        torch.cuda.set_per_process_memory_fraction(1.0)

    record = {
        "what": "largest seq_len for one training step at batch 1 under each VRAM budget (bisection)",
        "model": a.model, "synthetic": info["synthetic"], "quant": a.quant, "lora_r": a.lora_r, "batch_size": 1,
        "optimizer": "torch AdamW", "gradient_checkpointing": True, "stack": a.stack, "lora_dropout": a.lora_dropout,
        **{k: v for k, v in info.items() if k.startswith("unsloth")}, "levers": lever_cfg, "step": a.step, "max_seq": max_seq,
        "model_context": context, "device": device, "load_s": load_s, "weights_gib": info["weights_gib"],
        "resident_gib": resident, **baseline,
        "budget_note": runs.BUDGET_NOTE if on_gpu else "CPU: no allocator cap, one search without a budget",
        "environment": runs.environment(device), "results": results, "probes": probes,
        "wall_s": time.perf_counter() - t_start,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs.write_sidecar(out, {"status": "ok", "config": vars(a), **record})
    cols = ["budget_gib", "max_seq_len", "first_failing_seq_len", "search_capped", "beyond_context",
            "peak_reserved_gib", "peak_allocated_gib", "non_torch_gib", "process_peak_est_gib", "fits_real_card",
            "step_s", "probes", "note"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    print(f"\n{a.model} {a.quant} r={a.lora_r} batch 1 ({'synthetic: cost only; ' if info['synthetic'] else ''}"
          f"{'budgets emulated by an allocator cap' if on_gpu else 'CPU, no budget'})")
    print(f"{'budget GiB':>10} {'max seq_len':>11} {'fails at':>9} {'reserved GiB':>12} {'+non-torch GiB':>14} "
          f"{'step s':>7}")
    for r in results:
        print(f"{runs.cell(r['budget_gib'], 'g'):>10} {runs.cell(r['max_seq_len'], 'd'):>11} "
              f"{runs.cell(r.get('first_failing_seq_len'), 'd'):>9} {runs.cell(r.get('peak_reserved_gib'), '.2f'):>12} "
              f"{runs.cell(r.get('non_torch_gib'), '.2f'):>14} {runs.cell(r.get('step_s'), '.2f'):>7}  {r['note']}")
    print(f"wrote {out} and {out.with_suffix('.csv')} in {record['wall_s']:.0f} s", flush=True)
    return record


if __name__ == "__main__":
    main()

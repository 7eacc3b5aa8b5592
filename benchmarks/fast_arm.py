"""Plain against optimised training, interleaved in one command, with the ratios printed.

    python benchmarks/fast_arm.py --out reports/fast-arm/bench.json                 # on a GPU: 7B shape, NF4 + 16-bit
    python benchmarks/fast_arm.py --levers torch_compile,keep_16bit,optimizer=adamw_torch_fused \\
        --quants nf4 --out reports/fast-arm/bench-gc.json   # the default arm keeps no checkpoints (7B NF4: ~15 GiB);
                                                            # with them, for a card of 8-12 GB
    python benchmarks/fast_arm.py --model tiny-llama-shape --device cpu --quants nf4 \\
        --levers chunked_loss=4,keep_16bit --pairs 1 --steps 4 --warmup 1 --out /tmp/fa.json   # CPU smoke run

For each quantization, the plain configuration (every lever off) and the optimised one (the --levers given)
run as the training notebook, each in a fresh kernel, in pairs whose order alternates (A B, B A, ...), so a
drift of the shared machine falls on both arms. Every run uses the same seed and data. Printed per
quantization: the median over pairs of optimised / plain tokens/s, peak reserved memory and energy per 1k
tokens (over the whole training window, compilation included, and over the steady steps tokens/s counts), and
the equivalence check: the largest relative difference of the loss at any logged step between the two arms of a
pair (the study asks for < 1%). Each command's runs (notebook and sidecar) go to runs/<--out's stem>/.

LoRA dropout is 0 in both arms: compiled and fused code draw random numbers differently from eager code,
and the question here is the levers' numerics, not dropout masks. Synthetic shapes train on random tokens:
cost figures only.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import levers, models, runs, sweep  # noqa: E402
from helpers.analysis import loss_gap  # noqa: E402

# The default optimised arm, measured on the H200 (7B shape, batch 4 x 512, r16; reports/fast-arm/):
# - torch_compile + keep_16bit + fused AdamW with checkpointing off: NF4 2.69x and 2.24x the plain stack's
#   tokens/s in two commands of 2 interleaved pairs each (16-bit LoRA 2.93x and 2.52x), at 1.87x the peak
#   reserved memory (7.74 -> 14.4 GiB): not recomputing the forward pass in backward is bought with memory.
# - the same with checkpointing on: 1.63x (2 pairs), 0.81x the memory.
# - with Liger's kernels added as well: 1.00x (2 pairs): Liger's Triton kernels inside the compiled layers undo
#   what compiling gains (torch_compile alone 1.64x, fused_kernels alone 0.88x, one run each in reports/levers).
OPTIMISED = "torch_compile,keep_16bit,optimizer=adamw_torch_fused,gradient_checkpointing=false"


EXTRA = ("batch_size", "grad_accum", "gradient_checkpointing", "optimizer")  # notebook knobs usable as levers


def parse_levers(text: str) -> dict:
    """'fused_kernels,chunked_loss=8' -> {'fused_kernels': True, 'chunked_loss': 8}; names are checked."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in levers.LEVERS and name not in EXTRA:
            raise SystemExit(f"--levers: unknown lever {name!r}; allowed: {list(levers.LEVERS) + list(EXTRA)}")
        if name in levers.COUNT_LEVERS or name in ("batch_size", "grad_accum"):
            out[name] = int(value or 8)
        elif name == "optimizer":
            out[name] = value
        else:
            out[name] = value.lower() not in ("false", "0", "off") if value else True
    return out


# optimised / plain per pair: the name in the results JSON -> the sidecar metric it divides
RATIOS = {"tokens_per_s_ratio": "tokens_per_s", "peak_reserved_ratio": "peak_reserved_gib",
          "energy_per_token_ratio": "energy_j_per_1k_tokens", "energy_steady_ratio": "energy_steady_j_per_1k_tokens"}


def ratio(opt: dict, plain: dict, key: str) -> float | None:
    a, b = (opt.get("metrics") or {}).get(key), (plain.get("metrics") or {}).get(key)
    return a / b if a and b else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--quants", default="nf4,none", help="comma-separated; each gets its own plain/optimised pairs")
    ap.add_argument("--levers", default=OPTIMISED, help=f"the optimised arm, e.g. {OPTIMISED} or chunked_loss=8 "
                    "(gradient_checkpointing=false, optimizer=..., batch_size=N, grad_accum=N are allowed too)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=15, help="optimizer steps per run (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s (compilation happens here)")
    ap.add_argument("--budget", type=float, default=0.0, help="vram_budget_gib for both arms (0: whole card)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True, help="JSON path; every run's notebook and sidecar go beside it in runs/<its stem>/")
    a = ap.parse_args(argv)
    if a.pairs < 1 or a.steps <= a.warmup:
        ap.error(f"--pairs={a.pairs} must be >= 1 and --steps={a.steps} above --warmup={a.warmup}")
    optimised = parse_levers(a.levers)
    if not any(optimised.values()):
        ap.error(f"--levers={a.levers!r} turns nothing on: the optimised arm would be the plain one")

    out = Path(a.out)
    folder = out.parent / "runs" / out.stem  # one folder per command: the plain arms of two commands share run ids
    params = sweep.notebook_parameters()
    spec = {"notebook": sweep.TRAIN_NOTEBOOK, "params": params}
    defaults = {k: p["default"] for k, p in params.items()}
    synthetic = models.is_synthetic(a.model)
    corpus = "random-tokens" if synthetic else defaults["corpus"]
    base = {**defaults, "model": a.model, "corpus": corpus, "seq_len": a.seq_len, "batch_size": a.batch_size,
            "lora_r": a.lora_r, "lora_alpha": 2 * a.lora_r, "lora_dropout": 0.0, "max_steps": a.steps,
            "timing_warmup_steps": a.warmup, "warmup_steps": 1, "eval_blocks": 2, "vram_budget_gib": a.budget,
            "device": a.device, "seed": 0, "output_dir": str(folder)}
    quants = [q.strip() for q in a.quants.split(",") if q.strip()]
    plan = []  # (quant, pair, arm, cfg) in run order: A B, B A, ...
    for q in quants:
        arms = {"plain": {**base, "quant": q},
                "optimised": {**base, "quant": q, **optimised}}
        if q == "none":
            arms["optimised"]["keep_16bit"] = False  # QLoRA only: the 16-bit arm has nothing to upcast
        for arm, cfg in arms.items():
            try:
                runs.validate(cfg)
            except ValueError as e:
                raise SystemExit(f"{arm} arm for quant {q}: {e}")
        for i in range(a.pairs):
            order = ["plain", "optimised"] if i % 2 == 0 else ["optimised", "plain"]
            for arm in order:
                cfg = dict(arms[arm], run_id="")
                cfg["run_id"] = f"{runs.run_id(cfg)}-pair{i}-{arm}"
                plan.append((q, i, arm, cfg))

    print(f"{len(plan)} runs of {a.model} ({', '.join(quants)}), batch {a.batch_size} x {a.seq_len}, "
          f"optimised = {optimised}", flush=True)
    t0, results = time.perf_counter(), []
    for n, (q, i, arm, cfg) in enumerate(plan, 1):
        t = time.perf_counter()
        status = sweep.execute(spec, cfg)
        rec = runs.read_sidecar(folder / f"{cfg['run_id']}.json")
        m = rec.get("metrics") or {}
        print(f"[{n}/{len(plan)}] {q} pair {i} {arm:9}: {status}, {m.get('tokens_per_s') or float('nan'):.0f} tokens/s, "
              f"reserved {m.get('peak_reserved_gib') or float('nan'):.2f} GiB ({time.perf_counter() - t:.0f} s, "
              f"elapsed {time.perf_counter() - t0:.0f} s)", flush=True)
        results.append({"quant": q, "pair": i, "arm": arm, "run_id": cfg["run_id"], "status": status, "record": rec})

    table = []
    for q in quants:
        pairs = []
        for i in range(a.pairs):
            p, o = ({r["arm"]: r["record"] for r in results if r["quant"] == q and r["pair"] == i}[k]
                    for k in ("plain", "optimised"))
            pairs.append({"pair": i, **{name: ratio(o, p, metric) for name, metric in RATIOS.items()},
                          "plain_tokens_per_s": (p.get("metrics") or {}).get("tokens_per_s"),
                          "optimised_tokens_per_s": (o.get("metrics") or {}).get("tokens_per_s"),
                          "loss_gap_max": loss_gap(p.get("history") or [], o.get("history") or []),
                          "statuses": [p.get("status"), o.get("status")]})
        table.append({"quant": q, "pairs": pairs,
                      **{f"median_{k}": median([x[k] for x in pairs]) for k in
                         (*RATIOS, "plain_tokens_per_s", "optimised_tokens_per_s")},
                      "loss_gap_max": max((x["loss_gap_max"] for x in pairs if x["loss_gap_max"] is not None),
                                          default=None)})
    record = {"what": "optimised / plain, interleaved pairs in one command", "model": a.model,
              "synthetic": synthetic, "optimised": optimised, "config": vars(a),
              "environment": results[0]["record"].get("environment"), "table": table,
              "runs": [{k: v for k, v in r.items() if k != "record"} for r in results],
              "wall_s": time.perf_counter() - t0}
    runs.write_sidecar(out, {"status": "ok", **record})

    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"\n{a.model} batch {a.batch_size} x {a.seq_len}, r{a.lora_r}, optimised = {optimised} "
          f"({'synthetic: cost only; ' if record['synthetic'] else ''}median of {a.pairs} interleaved pair(s))")
    print(f"{'quant':>6} {'plain tok/s':>11} {'opt tok/s':>10} {'speed x':>8} {'reserved x':>10} {'J/token x':>9} "
          f"{'steady J x':>10} {'max loss gap':>12}")
    for r in table:
        print(f"{r['quant']:>6} {fmt(r['median_plain_tokens_per_s'], '.0f'):>11} "
              f"{fmt(r['median_optimised_tokens_per_s'], '.0f'):>10} {fmt(r['median_tokens_per_s_ratio'], '.2f'):>8} "
              f"{fmt(r['median_peak_reserved_ratio'], '.2f'):>10} {fmt(r['median_energy_per_token_ratio'], '.2f'):>9} "
              f"{fmt(r['median_energy_steady_ratio'], '.2f'):>10} "
              f"{fmt(r['loss_gap_max'] and 100 * r['loss_gap_max'], '.3f'):>11}%")
    print(f"wrote {out} in {record['wall_s']:.0f} s", flush=True)
    return record


if __name__ == "__main__":
    main()

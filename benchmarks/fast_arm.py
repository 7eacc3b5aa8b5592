"""Plain against ours (and, with --peer, against the peer stack), interleaved in one command, with the ratios printed.

    python benchmarks/fast_arm.py --out reports/fast-arm/bench.json                 # on a GPU: 7B shape, NF4 + 16-bit
    python benchmarks/fast_arm.py --levers torch_compile,keep_16bit,optimizer=adamw_torch_fused \\
        --quants nf4 --out reports/fast-arm/bench-gc.json   # the default arm keeps no checkpoints (7B NF4: ~15 GiB);
                                                            # with them, for a card of 8-12 GB
    python benchmarks/fast_arm.py --peer unsloth --quants nf4 --rounds 3 --steps 20 --warmup 5 \\
        --levers torch_compile,keep_16bit,optimizer=adamw_torch_fused --out reports/fast-arm/peer-gc.json
                                                            # three arms: plain, ours, Unsloth (GPU, pip install -e .[peer])
    python benchmarks/fast_arm.py --model tiny-llama-shape --device cpu --quants nf4 \\
        --levers chunked_loss=4,keep_16bit --rounds 1 --steps 4 --warmup 1 --out /tmp/fa.json   # CPU smoke run

For each quantization, the plain configuration (every lever off), ours (the --levers given) and, with --peer, the
peer stack (notebook parameter `stack`, helpers/training/peer.py: none of our levers, but the same optimizer, batch,
accumulation and gradient checkpointing as our arm) run as the training notebook, each in a fresh kernel, in
rounds whose order reverses each round (A B C, C B A, A B C, ...), so a drift of the shared machine falls on
every arm. Every run uses the same seed and data. Printed per quantization: each arm's median tokens/s (steady
steps), peak reserved memory and energy per 1k tokens (whole training window, compilation included), and the
median over rounds of each round's ratios: ours / plain, peer / plain and ours / peer, for tokens/s, peak
reserved memory and energy per token; and the equivalence check: the largest relative difference of the loss at
any logged step between ours and plain in a round (the study asks for < 1%; peer / plain is shown too, for
information only: its kernels and LoRA initialisation are its own). Each command's runs (notebook and sidecar)
go to runs/<--out's stem>/; the JSON is rewritten after every run (status "partial" until the last), so a
command stopped early keeps what it measured; --time-limit starts no round that would not end in time.
A run that fails (the peer without a GPU or the extra, an out-of-memory) is a result: its ratios are empty.

LoRA dropout is 0 in every arm: compiled and fused code draw random numbers differently from eager code, and
Unsloth's fused LoRA kernels are its fast path at dropout 0; the question here is speed, not dropout masks.
Synthetic shapes train on random tokens: cost figures only.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.training import levers, models, peer, runs  # noqa: E402
from helpers.sweeps import sweep
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


# one arm / another per round: the name in the results JSON -> the sidecar metric it divides
RATIOS = {"tokens_per_s_ratio": "tokens_per_s", "peak_reserved_ratio": "peak_reserved_gib",
          "energy_per_token_ratio": "energy_j_per_1k_tokens", "energy_steady_ratio": "energy_steady_j_per_1k_tokens"}
# each arm's own figures, medians over its runs
FIGURES = {"tokens_per_s": "tokens/s", "peak_reserved_gib": "reserved GiB", "energy_j_per_1k_tokens": "J / 1k tok"}
# the comparisons of a round: (name, numerator arm, denominator arm); ours is "optimised" in the JSON, as before
PAIRS = (("ours/plain", "optimised", "plain"), ("peer/plain", "peer", "plain"), ("ours/peer", "optimised", "peer"))


def ratio(opt: dict, plain: dict, key: str) -> float | None:
    a, b = (opt.get("metrics") or {}).get(key), (plain.get("metrics") or {}).get(key)
    return a / b if a and b else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def round_order(arms: list[str], i: int) -> list[str]:
    """Round i's order: as given in even rounds, reversed in odd ones (A B C, C B A, ...)."""
    return list(arms) if i % 2 == 0 else list(reversed(arms))


def tabulate(results: list[dict], quants: list[str], arms: list[str]) -> list[dict]:
    """Per quantization: each round's ratios (complete rounds only) and their medians, each arm's medians. The
    two-arm keys of earlier versions (pairs, median_tokens_per_s_ratio, ...: ours / plain) are kept."""
    table = []
    for q in quants:
        rounds = sorted({r["pair"] for r in results if r["quant"] == q})
        by_round = {i: {r["arm"]: r["record"] for r in results if r["quant"] == q and r["pair"] == i} for i in rounds}
        by_round = {i: recs for i, recs in by_round.items() if set(recs) == set(arms)}
        rows = []
        for i, rec in by_round.items():
            p, o = rec["plain"], rec["optimised"]
            row = {"pair": i, **{name: ratio(o, p, metric) for name, metric in RATIOS.items()},
                   "plain_tokens_per_s": (p.get("metrics") or {}).get("tokens_per_s"),
                   "optimised_tokens_per_s": (o.get("metrics") or {}).get("tokens_per_s"),
                   "loss_gap_max": loss_gap(p.get("history") or [], o.get("history") or []),
                   "statuses": [rec[a].get("status") for a in arms]}
            if "peer" in rec:
                row["peer_tokens_per_s"] = (rec["peer"].get("metrics") or {}).get("tokens_per_s")
                row["peer_loss_gap_max"] = loss_gap(p.get("history") or [], rec["peer"].get("history") or [])
                row["ratios"] = {name: {k: ratio(rec[a], rec[b], m) for k, m in RATIOS.items()} for name, a, b in PAIRS}
            rows.append(row)
        entry = {"quant": q, "pairs": rows,
                 **{f"median_{k}": median([x[k] for x in rows]) for k in
                    (*RATIOS, "plain_tokens_per_s", "optimised_tokens_per_s")},
                 "loss_gap_max": max((x["loss_gap_max"] for x in rows if x["loss_gap_max"] is not None), default=None),
                 "arms": {a: {"runs_ok": sum(r["record"].get("status") == "ok" for r in results
                                             if r["quant"] == q and r["arm"] == a),
                              **{f"median_{k}": median([(r["record"].get("metrics") or {}).get(k) for r in results
                                                        if r["quant"] == q and r["arm"] == a]) for k in FIGURES}}
                          for a in arms}}
        if "peer" in arms:
            entry["median_ratios"] = {name: {k: median([x["ratios"][name][k] for x in rows]) for k in RATIOS}
                                      for name, _, _ in PAIRS}
            entry["peer_loss_gap_max"] = max((x["peer_loss_gap_max"] for x in rows
                                              if x["peer_loss_gap_max"] is not None), default=None)
        table.append(entry)
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--quants", default="nf4,none", help="comma-separated; each gets its own rounds of every arm")
    ap.add_argument("--levers", default=OPTIMISED, help=f"our arm, e.g. {OPTIMISED} or chunked_loss=8 "
                    "(gradient_checkpointing=false, optimizer=..., batch_size=N, grad_accum=N are allowed too)")
    ap.add_argument("--peer", default=None, choices=[s for s in peer.STACKS if s != "hf"],
                    help="a third arm: this stack, with our arm's optimizer, batch and checkpointing (GPU; nf4 only)")
    ap.add_argument("--rounds", "--pairs", dest="rounds", type=int, default=2,
                    help="runs of each arm, interleaved (--pairs: its name when there were two arms)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=15, help="optimizer steps per run (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s (compilation happens here)")
    ap.add_argument("--budget", type=float, default=0.0, help="vram_budget_gib for every arm (0: whole card)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds: start no round that the last round's duration says would end after this (0: none)")
    ap.add_argument("--out", required=True, help="JSON path; every run's notebook and sidecar go beside it in runs/<its stem>/")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.steps <= a.warmup:
        ap.error(f"--rounds={a.rounds} must be >= 1 and --steps={a.steps} above --warmup={a.warmup}")
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
    shared = {k: v for k, v in optimised.items() if k in EXTRA}  # optimizer, batch, checkpointing: the peer's too
    names = ["plain", "optimised"] + (["peer"] if a.peer else [])
    plan = []  # rounds of (quant, round, arm, cfg), each round's order reversed from the last
    for q in quants:
        arms = {"plain": {**base, "quant": q},
                "optimised": {**base, "quant": q, **optimised}}
        if q == "none":
            arms["optimised"]["keep_16bit"] = False  # QLoRA only: the 16-bit arm has nothing to upcast
        if a.peer:
            arms["peer"] = {**base, "quant": q, **shared, "stack": a.peer}
        for arm, cfg in arms.items():
            try:
                runs.validate(cfg)  # whether the peer loads on this machine is its runs' result, not checked here
            except (ValueError, RuntimeError) as e:  # RuntimeError: bitsandbytes missing
                raise SystemExit(f"{arm} arm for quant {q}: {e}")
        for i in range(a.rounds):
            for arm in round_order(names, i):
                cfg = dict(arms[arm], run_id="")
                cfg["run_id"] = f"{runs.run_id(cfg)}-pair{i}-{arm}"
                plan.append((q, i, arm, cfg))

    print(f"{len(plan)} runs of {a.model} ({', '.join(quants)}), batch {a.batch_size} x {a.seq_len}, "
          f"optimised = {optimised}" + (f", peer = stack {a.peer} with {shared or 'the defaults'}" if a.peer else ""),
          flush=True)
    t0, results = time.perf_counter(), []
    record = {"what": f"{' / '.join(names)}, interleaved rounds in one command", "model": a.model,
              "synthetic": synthetic, "optimised": optimised, "peer": a.peer and {"stack": a.peer, **shared},
              "config": vars(a)}

    def write(status: str, note: str = "") -> None:
        record.update(environment=next((r["record"].get("environment") for r in results
                                        if r["record"].get("environment")), None),
                      table=tabulate(results, quants, names),
                      runs=[{k: v for k, v in r.items() if k != "record"} for r in results],
                      wall_s=time.perf_counter() - t0, note=note)
        runs.write_sidecar(out, {"status": status, **record})

    note, round_started, last_round_s = "", {}, 0.0
    for n, (q, i, arm, cfg) in enumerate(plan, 1):
        if (q, i) not in round_started:
            if a.time_limit and last_round_s and time.perf_counter() - t0 + last_round_s > a.time_limit:
                note = (f"stopped before {q} round {i}: the last round took {last_round_s:.0f} s and --time-limit "
                        f"{a.time_limit:.0f} s would have been passed")
                print(note, flush=True)
                break
            round_started[(q, i)] = time.perf_counter()
        t = time.perf_counter()
        status = sweep.execute(spec, cfg)
        rec = runs.read_sidecar(folder / f"{cfg['run_id']}.json")
        m = rec.get("metrics") or {}
        print(f"[{n}/{len(plan)}] {q} round {i} {arm:9}: {status}, {m.get('tokens_per_s') or float('nan'):.0f} tokens/s, "
              f"reserved {m.get('peak_reserved_gib') or float('nan'):.2f} GiB ({time.perf_counter() - t:.0f} s, "
              f"elapsed {time.perf_counter() - t0:.0f} s)" + (f"\n    {str(rec.get('error'))[:300]}" if status != "ok" else ""),
              flush=True)
        results.append({"quant": q, "pair": i, "arm": arm, "run_id": cfg["run_id"], "status": status, "record": rec})
        if arm == round_order(names, i)[-1]:
            last_round_s = time.perf_counter() - round_started[(q, i)]
        write("partial")
    write("ok", note)
    table = record["table"]

    print(f"\n{a.model} batch {a.batch_size} x {a.seq_len}, r{a.lora_r}, optimised = {optimised}"
          + (f", peer = {record['peer']}" if a.peer else "")
          + f" ({'synthetic: cost only; ' if record['synthetic'] else ''}medians of {a.rounds} interleaved round(s))")
    label = {"plain": "plain", "optimised": "ours", "peer": a.peer}
    for r in table:
        print(f"{r['quant']}: {'arm':>10} {'runs ok':>7} " + " ".join(f"{h:>12}" for h in FIGURES.values()))
        for arm, x in r["arms"].items():
            print(f"{'':{len(r['quant']) + 1}} {label[arm]:>10} {x['runs_ok']:>7} "
                  + " ".join(f"{runs.cell(x[f'median_{k}'], '.2f' if k == 'peak_reserved_gib' else '.0f'):>12}"
                             for k in FIGURES))
        ratios = r.get("median_ratios") or {"ours/plain": {k: r[f"median_{k}"] for k in RATIOS}}
        per_round = {name: [(x.get("ratios") or {"ours/plain": x}).get(name, {}) for x in r["pairs"]] for name in ratios}
        print(f"{'':{len(r['quant']) + 1}} {'median of':>10} {'speed x':>8} {'reserved x':>10} {'J/token x':>9} "
              f"{'steady J x':>10}  speed x, reserved x of each round")
        for name, x in ratios.items():
            each = " ".join(f"{runs.cell(y.get('tokens_per_s_ratio'), '.2f')}/{runs.cell(y.get('peak_reserved_ratio'), '.2f')}"
                            for y in per_round[name])
            print(f"{'':{len(r['quant']) + 1}} {name:>10} {runs.cell(x['tokens_per_s_ratio'], '.2f'):>8} "
                  f"{runs.cell(x['peak_reserved_ratio'], '.2f'):>10} {runs.cell(x['energy_per_token_ratio'], '.2f'):>9} "
                  f"{runs.cell(x['energy_steady_ratio'], '.2f'):>10}  {each}")
        print(f"{'':{len(r['quant']) + 1}} max loss gap ours vs plain {runs.cell(r['loss_gap_max'] and 100 * r['loss_gap_max'], '.3f')}%"
              + (f"; peer vs plain {runs.cell(r['peer_loss_gap_max'] and 100 * r['peer_loss_gap_max'], '.3f')}% (information)"
                 if a.peer else ""))
    print(f"wrote {out} in {record['wall_s']:.0f} s" + (f" ({note})" if note else ""), flush=True)
    return record


if __name__ == "__main__":
    main()

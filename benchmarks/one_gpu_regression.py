"""Issue 19 on one GPU: num_gpus 1 gives the figures of before, and the 70B shape writes and loads.

    python benchmarks/one_gpu_regression.py --reports /tmp/regress      # ~2 min on an H200 (+ the 7B checkpoint once)
    python benchmarks/one_gpu_regression.py --write-70b                 # writes llama-3.1-70b-shape (~39 GB), loads it
                                                                        # on the GPU, one forward; a few minutes

The first re-runs two published runs of reports/gpu-7b (llama-2-7b-shape, batch 4 x 512: NF4 on the whole card and
16-bit LoRA under a 24 GiB budget) through today's notebook, num_gpus and fsdp_cpu_offload at their defaults, and
prints each figure beside the published one. The run id must be the same (the new parameters stay out of the id at
their defaults) and so must the memory figures (the same allocations); tokens/s and energy move with the machine
(published: one H200 lease of 2026-11-28). The second needs ~39 GB of disk beside the cache's other checkpoints
(the 7B is 13 GB; the lent machine has 64 GB): it prints the writer's progress, its time, and the loaded model's GPU
memory.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBLISHED = ROOT / "reports" / "gpu-7b" / "runs"
RUN_IDS = ("llama-2-7b-shape-nf4-r16-s512-seed0-00652c6f", "llama-2-7b-shape-none-r16-s512-seed0-efd3591a")
FIGURES = ("status", "params_trainable", "weights_gib", "peak_allocated_gib", "peak_reserved_gib",
           "non_torch_peak_gib", "tokens_per_s", "energy_j_per_1k_tokens")


def regression(reports: Path) -> None:
    import papermill

    from helpers.sweeps.sweep import TRAIN_NOTEBOOK

    for rid in RUN_IDS:
        before = json.loads((PUBLISHED / f"{rid}.json").read_text())
        params = {k: v for k, v in before["config"].items() if k not in ("output_dir", "run_id")}
        out = reports / "runs"
        t0 = time.perf_counter()
        papermill.execute_notebook(str(TRAIN_NOTEBOOK), str(reports / f"{rid}.ipynb"), progress_bar=False,
                                   parameters={**params, "output_dir": str(out)}, cwd=str(ROOT))
        now_path = out / f"{rid}.json"
        print(f"\n{rid}: {time.perf_counter() - t0:.0f} s; same run id: {now_path.exists()}")
        if not now_path.exists():
            print(f"  new sidecars: {[p.name for p in out.glob('*.json')]}")
            continue
        now = json.loads(now_path.read_text())
        for key in FIGURES:
            a = before["status"] if key == "status" else before["metrics"].get(key)
            b = now["status"] if key == "status" else now["metrics"].get(key)
            same = "same" if a == b else (f"{(b - a) / a:+.1%}" if isinstance(a, float) and isinstance(b, float) and a
                                          else "DIFFERENT")
            print(f"  {key:24s} published {a!s:>22s}   now {b!s:>22s}   {same}")


def write_70b() -> None:
    import torch

    from helpers.training import models

    name = "llama-3.1-70b-shape"
    t0 = time.perf_counter()
    path = models.resolve_model(name)  # prints a line per shard with the time left
    source = json.loads((Path(path) / "qlora_study_source.json").read_text())
    print(f"{name}: {source['bytes'] / 1e9:.1f} GB written in {source['write_s']:.0f} s "
          f"({time.perf_counter() - t0:.0f} s with the check for a cached copy) into {path}")
    t0 = time.perf_counter()
    net, _, info = models.load_model(name, "nf4", "bfloat16", True, device="cuda")
    print(f"loaded on the GPU in {time.perf_counter() - t0:.0f} s: weights {info['weights_gib']:.1f} GiB, "
          f"torch allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB, {info['params_total'] / 1e9:.1f} B params")
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = net(input_ids=torch.randint(0, 128256, (1, 128), device="cuda")).logits
        torch.cuda.synchronize()
    print(f"forward of 128 tokens: {time.perf_counter() - t0:.1f} s, logits finite: {bool(torch.isfinite(logits).all())}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", type=Path, default=Path("/tmp/regress"), help="where the re-runs go")
    ap.add_argument("--write-70b", action="store_true", help="write, load and run the 70B shape instead")
    a = ap.parse_args()
    if a.write_70b:
        write_70b()
    else:
        a.reports.mkdir(parents=True, exist_ok=True)
        regression(a.reports)

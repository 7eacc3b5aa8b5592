"""Two runs of one sweep side by side: the one-at-a-time runner against the GPU queue (helpers.sweep --devices).

    python benchmarks/devices_check.py /tmp/r-none/devices-check /tmp/r-dev0/devices-check

For each run id in both folders: status, peak allocated and reserved memory (torch), the process's NVML peak,
tokens/s and energy per 1k tokens, and the pinning each run recorded (cuda_visible_devices, gpu_index, gpu_uuid,
side_by_side). Memory must agree within MEMORY_TOLERANCE (it is deterministic); speed and energy are printed with
their ratio, to be read against run-to-run noise (28% between identical 7B runs in reports/gpu-7b). Exit 1 when a
run is missing, not ok, or its memory differs, or the queued runs do not record their GPU.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.records.sidecars import read_all  # noqa: E402

MEMORY_TOLERANCE = 0.01
MEMORY = ("peak_allocated_gib", "peak_reserved_gib", "peak_nvml_process_used_gib")
NOISY = ("tokens_per_s", "energy_j_per_1k_tokens")
PINNING = ("cuda_visible_devices", "gpu_index", "gpu_uuid", "side_by_side")


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    before, queued = ({r["run_id"]: r for r in read_all(Path(a) / "runs")} for a in argv)
    problems = []
    for rid in sorted(set(before) | set(queued)):
        a, b = before.get(rid), queued.get(rid)
        if a is None or b is None:
            problems.append(f"{rid}: only in {'the second' if a is None else 'the first'} folder")
            continue
        print(f"{rid}: {a['status']} / {b['status']}")
        if a["status"] != "ok" or b["status"] != "ok":
            problems.append(f"{rid}: not ok ({a['status']} / {b['status']}): {a.get('error') or b.get('error')}")
            continue
        for key in MEMORY + NOISY:
            x, y = a["metrics"].get(key), b["metrics"].get(key)
            ratio = f"{y / x:.3f}" if x and y is not None else "-"
            print(f"    {key:28} {_num(x):>14} {_num(y):>14}  ratio {ratio}")
            if key in MEMORY and x and y is not None and abs(y / x - 1) > MEMORY_TOLERANCE:
                problems.append(f"{rid}: {key} {x} vs {y}")
        for key in PINNING:
            print(f"    {key:28} {a['environment'].get(key)!s:>14} {b['environment'].get(key)!s:>14}")
        if b["environment"].get("gpu_uuid") is None or b["environment"].get("cuda_visible_devices") is None:
            problems.append(f"{rid}: the queued run does not record its GPU")
    for p in problems:
        print(f"PROBLEM {p}")
    print("same figures" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

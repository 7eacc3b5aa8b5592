"""Commit the memory predictor's predictions for a sweep before it runs; later, set them beside the measurements.

    python tools/preregister_fit.py                 # writes reports/fit/preregistered.csv from parameters/fit-check.yaml
    python tools/preregister_fit.py --compare       # after the sweep ran: predicted (as committed) vs measured

Writing refuses to replace an existing file: predictions are made once, before anything is measured, and are
not regenerated after (issue 17). --compare prints each run and the summary the issue's bars are judged by
(median and largest absolute error of the whole-process peak, ok/OOM right for budgeted runs).
"""
import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers import fit  # noqa: E402
from helpers.sweeps import sweep
from helpers.records.files import atomic_write  # noqa: E402


def write(sweep_file: Path, out: Path) -> None:
    if out.exists():
        sys.exit(f"{out} exists: pre-registered predictions are not rewritten (delete it only if nothing was measured)")
    configs = sweep.expand(sweep.load_sweep(sweep_file))
    rows = fit.preregistration_rows(configs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out.parent.mkdir(parents=True, exist_ok=True)

    def table(f):
        w = csv.DictWriter(f, fieldnames=[*fit.PREREG_COLUMNS, "predictor_commit"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "predictor_commit": commit})
    atomic_write(out, table)
    oom = sum(r["predicted_status"] == "oom" for r in rows)
    print(f"{out}: {len(rows)} runs of {sweep_file} predicted ({oom} to run out of memory under their cap), "
          f"helpers/fit/ at {commit}")


def compare(path: Path) -> None:
    rows = fit.preregistered_vs_measured(path)
    pct = lambda x: "    -" if x is None else f"{x * 100:+5.1f}%"  # noqa: E731
    for r in rows:
        got = r["measured_process_gib"]
        got = "" if got is None else f"{got:6.2f} GiB"
        now = "" if r["measured_status"] is None else f"  today {r['now_status']:3} {pct(r['now_error_process'])}"
        print(f"{r['run_id'][:58]:58} predicted {r['predicted_status']:3} {float(r['predicted_process_gib']):6.2f} GiB"
              f"  measured {r['measured_status'] or 'not run':7} {got}  error {pct(r['error_process'])}{now}")
    for who, pre in (("as pre-registered", ""), ("today's predictor", "now_")):
        errs = [abs(r[f"{pre}error_process"]) for r in rows if r.get(f"{pre}error_process") is not None]
        right = [r[f"{pre}status_right"] for r in rows if r.get(f"{pre}status_right") is not None]
        if errs:
            print(f"{who}: whole-process peak median |error| {statistics.median(errs) * 100:.1f}%, largest "
                  f"{max(errs) * 100:.1f}% over {len(errs)} finished runs (bars: 5% and 15%)")
        if right:
            print(f"{who}: ok/OOM right for {sum(right)}/{len(right)} budgeted runs (bar: 95%)")
    if any(r["measured_status"] for r in rows):
        print(f"today's predictor changed {fit.PREDICTOR_CHANGES}")
    else:
        print("nothing measured yet: run parameters/fit-check.yaml on a GPU first")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=str(ROOT / "parameters/fit-check.yaml"))
    ap.add_argument("--out", default=str(ROOT / fit.PREREGISTERED))
    ap.add_argument("--compare", action="store_true", help="predicted (as committed) vs measured")
    a = ap.parse_args(argv)
    compare(Path(a.out)) if a.compare else write(Path(a.sweep), Path(a.out))


if __name__ == "__main__":
    main()

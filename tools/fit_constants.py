"""Fit the predictor's few free constants (helpers/fit/) on the committed GPU measurements, and print them.

    python tools/fit_constants.py            # prints the fitted values; paste them into helpers/fit/

What is fitted, on what (every other byte in helpers/fit/ is derived from shapes and library behaviour):
  stage 1, peak allocated of runs that finished (one row per distinct configuration, so repeated seeds do not
  weigh more): LOGITS_BYTES, EVAL_LOGITS_BYTES, ACT_SCALE, COMPILE_SCALE, INT8_EXTRA; least squares of the log
  ratio predicted / measured, by coordinate search over a grid (no scipy needed);
  stage 2, peak reserved of uncapped runs that finished: RESERVE_TRANSIENT and RESERVE_KEPT on runs without
  eval_every, then EVAL_EVERY_RESERVE on those with it (the quality sweep);
  stage 3, ok/OOM of every budgeted run: CAP_HEADROOM (loss moment) and CAP_HEADROOM_LAYER (the others), the
  largest (most cautious) pair among those that classify the most right.
Rows of the pre-registered check (reports/fit-check) are left out: they test the predictor, they do not tune it.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import fit  # noqa: E402


def rows():
    return [r for r in fit.measured_runs() if not r["source"].startswith(fit.MEASURED_AFTER_FIT)]  # never fitted on


def distinct(rs):
    seen, out = set(), []
    for r in rs:
        key = (repr(sorted(r["cfg"].items())), r["evaluation"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def loss(rs, key, pkey):
    return sum(math.log(fit.predict(r["cfg"], evaluation=r["evaluation"])[pkey] / r[key]) ** 2 for r in rs)


def search(names_grids, rs, key, pkey, rounds=3):
    for _ in range(rounds):
        for name, grid in names_grids:
            best = min(grid, key=lambda v: (setattr(fit, name, v), loss(rs, key, pkey))[1])
            setattr(fit, name, best)


NAMES = ("LOGITS_BYTES", "EVAL_LOGITS_BYTES", "ACT_SCALE", "COMPILE_SCALE", "INT8_EXTRA", "RESERVE_TRANSIENT",
         "RESERVE_KEPT", "EVAL_EVERY_RESERVE", "CAP_HEADROOM", "CAP_HEADROOM_LAYER")


def fitted() -> dict:
    """Run the three stages from the values in helpers/fit/; return the fitted values (and leave them set)."""
    rs = distinct(rows())
    done = [r for r in rs if r["status"] == "ok" and r["allocated_gib"]]
    search([("LOGITS_BYTES", [x / 2 for x in range(20, 41)]),
            ("EVAL_LOGITS_BYTES", [x / 2 for x in range(12, 29)]),
            ("ACT_SCALE", [x / 100 for x in range(70, 131, 2)]),
            ("COMPILE_SCALE", [x / 100 for x in range(30, 101, 2)]),
            ("INT8_EXTRA", list(range(0, 61, 2)))], done, "allocated_gib", "peak_allocated_gib")
    free = [r for r in done if not r["budget_gib"] and r["reserved_gib"]]
    plain = [r for r in free if not r["cfg"].get("eval_every")]
    search([("RESERVE_TRANSIENT", [x / 100 for x in range(0, 301, 5)]),
            ("RESERVE_KEPT", [x / 100 for x in range(0, 51, 1)])], plain, "reserved_gib", "peak_reserved_gib")
    search([("EVAL_EVERY_RESERVE", [x / 20 for x in range(0, 81)])],
           [r for r in free if r["cfg"].get("eval_every")], "reserved_gib", "peak_reserved_gib", 1)
    budgeted = [r for r in rs if r["budget_gib"] and r["status"] in ("ok", "oom")]
    grid = [x / 100 for x in range(0, 101, 2)]
    score = {}
    for v in grid:
        for w in grid:
            fit.CAP_HEADROOM, fit.CAP_HEADROOM_LAYER = v, w
            score[v, w] = sum(fit.predict(r["cfg"], evaluation=r["evaluation"])["fits_budget"] == (r["status"] == "ok")
                              for r in budgeted)
    top = max(score.values())
    best = sorted(k for k, s in score.items() if s == top)  # the most conservative of the best: largest headroom
    fit.CAP_HEADROOM, fit.CAP_HEADROOM_LAYER = max(best, key=lambda k: (k[0] + k[1], k))
    print(f"fitted on {len(done)} distinct finished runs, {len(free)} uncapped, {len(budgeted)} budgeted "
          f"(ok/OOM right for {top}/{len(budgeted)}; {len(best)} headroom pairs do as well):")
    return {name: getattr(fit, name) for name in NAMES}


def main():
    for name, value in fitted().items():
        print(f"  {name} = {value}")


if __name__ == "__main__":
    main()

"""Publish this machine's runs of a sweep as the reference: the one explicit step that writes reports/<name>/.

    python -m helpers.publish reports/local/<name> [--dry-run] [--no-report]

Copies every run whose sidecar is readable (ok, oom and error runs alike: failures are results) with its
executed notebook from `reports/local/<name>/runs/` into `reports/<name>/runs/`, each file atomically (a
temporary file beside it, then a rename), replacing a published run of the same id; then rebuilds that
folder's report. Runs without a readable sidecar (unfinished, corrupt) are not published and are listed.
Commit the published folder to make it the reference others compare with.
"""
import argparse
import sys
from pathlib import Path

from helpers.records.files import atomic_write
from helpers.records.paths import PUBLISHED_REPORTS, resolve_sweep_dir, shown
from helpers.sweeps.report import build_report
from helpers.records.sidecars import PLAN_FILE, read_sidecar

PUBLISHABLE = ("ok", "oom", "error")  # results, failures included; 'unfinished' (interrupted) is not one


def plan(folder) -> tuple[Path, list[tuple[str, str]], list[str]]:
    """(target folder, [(run_id, 'new' | 'replaces <old status>')], [run ids left out and why])."""
    folder = resolve_sweep_dir(folder)
    target = PUBLISHED_REPORTS / folder.name
    if folder.resolve() == target.resolve():
        raise ValueError(f"{folder} is already the published folder; publish from reports/local/{folder.name}")
    todo, left_out = [], []
    for sidecar in sorted((folder / "runs").glob("*.json")):
        try:
            status = read_sidecar(sidecar)["status"]
        except ValueError as e:
            left_out.append(f"{sidecar.stem} ({e})")
            continue
        if status not in PUBLISHABLE:  # interrupted: not a result (the sweep redoes it), so not a reference either
            left_out.append(f"{sidecar.stem} (status {status}: the run did not finish; re-run the sweep to redo it)")
            continue
        if not sidecar.with_suffix(".ipynb").is_file():
            left_out.append(f"{sidecar.stem} (status {status}, but its executed notebook is missing)")
            continue
        old = target / "runs" / sidecar.name
        if old.exists():
            try:
                what = f"replaces a published {read_sidecar(old)['status']} run"
            except ValueError:
                what = "replaces an unreadable published run"
        else:
            what = "new"
        todo.append((sidecar.stem, f"{status}, {what}"))
    for nb in sorted((folder / "runs").glob("*.ipynb")):
        if not nb.with_suffix(".json").exists():
            left_out.append(f"{nb.stem} (no sidecar: the run did not finish)")
    return target, todo, left_out


def publish_sweep(folder, dry_run: bool = False, report: bool = True, out=None) -> Path:
    out = out or sys.stdout
    folder = resolve_sweep_dir(folder)
    target, todo, left_out = plan(folder)
    print(f"publish {len(todo)} run(s) of {folder} -> {target}" + (" (dry run)" if dry_run else ""), file=out)
    for rid, what in todo:
        print(f"  {rid}: {what}", file=out)
    for why in left_out:
        print(f"  not published: {why}", file=out)
    if dry_run or not todo:
        return target
    (target / "runs").mkdir(parents=True, exist_ok=True)
    for rid, _ in todo:  # the notebook first: a sidecar in place means its run is complete
        for name in (f"{rid}.ipynb", f"{rid}.json"):
            atomic_write(target / "runs" / name, (folder / "runs" / name).read_bytes())
    if (folder / PLAN_FILE).is_file():  # the plan these runs were made from: the report says what is missing
        atomic_write(target / PLAN_FILE, (folder / PLAN_FILE).read_bytes())
    if report:
        print(f"report: {build_report(target)}", file=out)
    print(f"published; commit {shown(target)} to make it the reference", file=out)
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.publish", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="this machine's sweep folder, e.g. reports/local/default")
    ap.add_argument("--dry-run", action="store_true", help="list what would be published")
    ap.add_argument("--no-report", action="store_true", help="copy the runs but do not rebuild the report")
    a = ap.parse_args(argv)
    try:
        publish_sweep(a.folder, dry_run=a.dry_run, report=not a.no_report)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

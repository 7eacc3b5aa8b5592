"""Run a sweep: a grid of configurations, each executed as the training notebook by papermill.

    python -m helpers.sweep parameters/default.yaml [--dry-run] [--force] [--no-report] [--jobs N]

Every configuration runs in a fresh kernel (clean memory figures) into
reports/local/<name>/runs/<run_id>.ipynb (this machine's runs; git ignores reports/local/); the notebook writes
<run_id>.json last. The report then sets each configuration beside the published reference reports/<name>/
(helpers/reference.py); `python -m helpers.publish reports/local/<name>` makes these runs the reference. A run with a sidecar
of status ok or oom is finished and skipped on a re-run; anything else is redone.

--jobs N runs N configurations side by side (one kernel each) on the same device. That is for quality
sweeps of small models: perplexity stays valid, but time, throughput, energy and device memory are then
shared by N processes and are not figures of one run. Every sidecar records side_by_side (its N), and the
analysis says so beside every cost chart of such a sweep. Each kernel gets cores // N CPU threads
(OMP_NUM_THREADS, unless already set), recorded as cpu_threads.
"""
import argparse
import ast
import concurrent.futures
import itertools
import multiprocessing
import os
import sys
import time
from pathlib import Path

from .kernels import papermill_options
from .paths import LOCAL_REPORTS, PROJECT_ROOT

TRAIN_NOTEBOOK = PROJECT_ROOT / "notebooks" / "01_train.ipynb"
SWEEP_KEYS = {"name", "description", "notebook", "base", "grid", "repeats"}
FINISHED = ("ok", "oom")  # outcomes that are results; error / corrupt / missing are redone
SIDE_BY_SIDE_ENV = "QLORA_STUDY_SIDE_BY_SIDE"  # how many runs share the device; recorded in every sidecar


class SweepError(ValueError):
    """A sweep file that cannot run; raised before any run starts."""


def notebook_parameters(notebook=TRAIN_NOTEBOOK) -> dict:
    """{name: {"type": str|int|float|bool, "default": value, "help": comment}} from the parameters cell."""
    import papermill

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} not found")
    types = {"str": str, "int": int, "float": float, "bool": bool}
    out = {}
    for name, p in papermill.inspect_notebook(str(notebook)).items():
        out[name] = {"type": types[p["inferred_type_name"]], "default": ast.literal_eval(p["default"]), "help": p["help"]}
    return out


def _check_value(where: str, key: str, value, params: dict) -> None:
    if key not in params:
        raise SweepError(f"{where}: unknown parameter {key!r}; the notebook's parameters are {sorted(params)}")
    want = params[key]["type"]
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True  # 16 is a fine float
    if not ok:
        raise SweepError(f"{where}: {key}={value!r} is a {type(value).__name__}, the notebook expects {want.__name__}")


def load_sweep(path, reports_root=None) -> dict:
    """Read and check a sweep file; every problem is raised here, before anything runs."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: expected a mapping with keys {sorted(SWEEP_KEYS)}")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    name = spec.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name == LOCAL_REPORTS.name:
        raise SweepError(f"{path}: name={name!r} must be a folder name (reports/<name>/), not "
                         f"{LOCAL_REPORTS.name!r} (the folder of this machine's runs)")
    notebook = Path(spec.get("notebook") or TRAIN_NOTEBOOK)
    notebook = notebook if notebook.is_absolute() else PROJECT_ROOT / notebook
    if not notebook.is_file():
        raise SweepError(f"{path}: notebook {notebook} not found")
    params = notebook_parameters(notebook)
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"{path}: base must be a mapping of parameter: value")
    for k, v in base.items():
        _check_value(f"{path} base", k, v, params)
    grid = spec.get("grid")
    grids = grid if isinstance(grid, list) else [grid]
    if not grid or not all(isinstance(g, dict) and g for g in grids):
        raise SweepError(f"{path}: grid is empty; give parameter: [values] (or a list of such mappings)")
    for g in grids:
        for k, values in g.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{path} grid: {k} must be a non-empty list of values, got {values!r}")
            for v in values:
                _check_value(f"{path} grid", k, v, params)
            if k in ("seed", "output_dir", "run_id"):
                raise SweepError(f"{path} grid: {k} is set by the runner (use repeats for seeds)")
    repeats = spec.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise SweepError(f"{path}: repeats={repeats!r} must be a whole number >= 1")
    return {"name": name, "notebook": notebook, "params": params, "base": base, "grids": grids, "repeats": repeats,
            "folder": Path(reports_root or LOCAL_REPORTS) / name}


def expand(sweep: dict) -> list[dict]:
    """Union of the cartesian products of the grid(s), times seeds 0..repeats-1; duplicates dropped."""
    from .runs import run_id

    defaults = {k: p["default"] for k, p in sweep["params"].items()}
    out, seen = [], set()
    for g in sweep["grids"]:
        keys = list(g)
        for values in itertools.product(*(g[k] for k in keys)):
            for seed in range(sweep["repeats"]):
                cfg = {**defaults, **sweep["base"], **dict(zip(keys, values)), "seed": seed,
                       "output_dir": str(sweep["folder"] / "runs"), "run_id": ""}
                rid = run_id(cfg)
                if rid not in seen:
                    seen.add(rid)
                    out.append({**cfg, "run_id": rid})
    return out


def varying(configs: list[dict]) -> list[str]:
    """Parameters whose value differs between runs (what progress lines show)."""
    keys = [k for k in configs[0] if k not in ("run_id", "output_dir")]
    return [k for k in keys if len({repr(c[k]) for c in configs}) > 1]


def run_state(cfg: dict) -> str:
    """ok | oom | error | corrupt | missing, from the run's sidecar."""
    from .runs import read_sidecar

    path = Path(cfg["output_dir"]) / f"{cfg['run_id']}.json"
    if not path.exists():
        return "missing"
    try:
        return read_sidecar(path)["status"]
    except ValueError:
        return "corrupt"


def _record_failure(cfg: dict, e: Exception) -> str:
    """The notebook failed without writing its own sidecar (e.g. a crash outside a guarded step)."""
    from .runs import is_oom, write_sidecar

    text = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
    status = "oom" if is_oom(e) or "OutOfMemory" in text else "error"
    write_sidecar(Path(cfg["output_dir"]) / f"{cfg['run_id']}.json",
                  {"run_id": cfg["run_id"], "status": status, "error": text[:4000], "config": cfg,
                   "environment": {}, "metrics": {}, "history": []})
    return status


def execute(sweep: dict, cfg: dict) -> str:
    """Run one configuration in a fresh kernel; return its status. Failures are results, not crashes."""
    import papermill

    from .runs import read_sidecar

    folder = Path(cfg["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    sidecar = folder / f"{cfg['run_id']}.json"
    sidecar.unlink(missing_ok=True)  # an old result must not survive a redo that is killed midway
    params = {k: v for k, v in cfg.items() if k in sweep["params"]}
    try:
        papermill.execute_notebook(str(sweep["notebook"]), str(folder / f"{cfg['run_id']}.ipynb"),
                                   parameters=params, cwd=str(PROJECT_ROOT), progress_bar=False,
                                   **papermill_options())
    except papermill.PapermillExecutionError as e:
        if not sidecar.exists():  # the notebook's own guard writes oom/error sidecars with measurements
            return _record_failure(cfg, e)
    except Exception as e:  # kernel died (e.g. host OOM killer), papermill I/O error, ...
        if not sidecar.exists():
            return _record_failure(cfg, e)
    try:
        return read_sidecar(sidecar)["status"]
    except ValueError as e:
        return _record_failure(cfg, e)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _side_by_side_worker(jobs: int) -> None:
    os.environ[SIDE_BY_SIDE_ENV] = str(jobs)  # the kernels papermill starts inherit it
    # Each kernel would otherwise start one CPU thread per core: N kernels x all cores threads on one machine.
    # Share the cores out as torchrun does for several processes a node (a value the user set is kept).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))


def _label(c: dict, show: list) -> str:
    return " ".join(f"{k}={c[k]}" for k in show)


def _run_one_at_a_time(sweep, configs, todo, states, show, out, t0) -> None:
    """Run `todo` in order, one fresh kernel at a time; print each start (with time left) and outcome."""
    done = 0
    for i, c in enumerate(configs, 1):
        if c not in todo:
            print(f"[{i}/{len(configs)}] skip {c['run_id']} ({states[c['run_id']]}) {_label(c, show)}", file=out,
                  flush=True)
            continue
        redo = f" (redo: was {states[c['run_id']]})" if states[c["run_id"]] not in ("missing",) else ""
        elapsed = time.perf_counter() - t0
        eta = f", ~{_fmt(elapsed / done * (len(todo) - done))} left" if done else ""
        print(f"[{i}/{len(configs)}] run {c['run_id']}{redo} {_label(c, show)} (elapsed {_fmt(elapsed)}{eta})",
              file=out, flush=True)
        t = time.perf_counter()
        states[c["run_id"]] = execute(sweep, c)
        done += 1
        print(f"    -> {states[c['run_id']]} in {_fmt(time.perf_counter() - t)}", file=out, flush=True)


def _run_side_by_side(sweep, configs, todo, states, show, jobs, out, t0) -> None:
    """Run `todo` in `jobs` worker processes; print each outcome as it comes, with i/N and time left."""
    index = {c["run_id"]: i for i, c in enumerate(configs, 1)}
    for c in configs:
        if c not in todo:
            print(f"[{index[c['run_id']]}/{len(configs)}] skip {c['run_id']} ({states[c['run_id']]})", file=out, flush=True)
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or CUDA state
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_side_by_side_worker,
                                                initargs=(jobs,)) as pool:
        futures = {pool.submit(execute, sweep, c): c for c in todo}
        done = 0
        for f in concurrent.futures.as_completed(futures):
            c = futures[f]
            try:
                states[c["run_id"]] = f.result()
            except Exception as e:  # the worker process itself died
                states[c["run_id"]] = _record_failure(c, e)
            done += 1
            elapsed = time.perf_counter() - t0
            left = f", ~{_fmt(elapsed / done * (len(todo) - done))} left" if done < len(todo) else ""
            print(f"[{index[c['run_id']]}/{len(configs)}] {states[c['run_id']]} {c['run_id']} {_label(c, show)} "
                  f"({done}/{len(todo)} done, elapsed {_fmt(elapsed)}{left})", file=out, flush=True)


def run_sweep(path, dry_run: bool = False, force: bool = False, report: bool = True, reports_root=None,
              out=None, jobs: int = 1) -> dict:
    """Check the sweep file, then run every configuration not yet finished; return {run_id: status}.

    jobs > 1 runs that many side by side (see the module docstring for what that does to cost figures)."""
    from filelock import FileLock, Timeout

    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise SweepError(f"jobs={jobs!r} must be a whole number >= 1 (1 = one run at a time)")
    out = out or sys.stdout
    sweep = load_sweep(path, reports_root)
    configs = expand(sweep)
    from .runs import validate

    for cfg in configs:  # every configuration is checked before the first one runs
        try:
            validate(cfg, here=not dry_run)
        except ValueError as e:
            raise SweepError(f"{path}: run {cfg['run_id']}: {e}") from e
    show = varying(configs)
    states = {c["run_id"]: run_state(c) for c in configs}
    todo = [c for c in configs if force or states[c["run_id"]] not in FINISHED]
    print(f"sweep {sweep['name']}: {len(configs)} runs, {len(configs) - len(todo)} finished, {len(todo)} to run "
          f"-> {sweep['folder']}", file=out, flush=True)
    if dry_run:
        for i, c in enumerate(configs, 1):
            what = "run" if c in todo else f"skip ({states[c['run_id']]})"
            print(f"  [{i}/{len(configs)}] {what:10} {c['run_id']}  {_label(c, show)}", file=out)
        return states
    sweep["folder"].mkdir(parents=True, exist_ok=True)
    lock = FileLock(sweep["folder"] / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SweepError(f"another sweep is already running on {sweep['folder']} (lock {lock.lock_file}); "
                         "wait for it to finish or stop it first") from None
    try:
        t0 = time.perf_counter()
        if jobs > 1:
            print(f"{jobs} runs side by side: perplexity is valid, time/throughput/energy/device memory are shared "
                  f"figures, not one run's", file=out, flush=True)
            _run_side_by_side(sweep, configs, todo, states, show, jobs, out, t0)
        else:
            _run_one_at_a_time(sweep, configs, todo, states, show, out, t0)
        from .runs import write_summary

        summary = write_summary(sweep["folder"])
        counts = {s: list(states.values()).count(s) for s in sorted(set(states.values()))}
        print(f"done in {_fmt(time.perf_counter() - t0)}: {counts}; summary {summary}", file=out, flush=True)
        if report:
            from .report import build_report

            html = build_report(sweep["folder"])
            print(f"report: {html}", file=out, flush=True)
    finally:
        lock.release()
    return states


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_file", help="e.g. parameters/default.yaml")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and whether each would run or be skipped")
    ap.add_argument("--force", action="store_true", help="redo every run, finished or not")
    ap.add_argument("--no-report", action="store_true", help="write summary.csv but skip the analysis and HTML")
    ap.add_argument("--reports", default=None, help="reports folder (default: reports/local/, this machine's runs; "
                    "reports/<name>/ is the published reference)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side on one device (quality sweeps only: "
                    "cost figures become shared ones); default 1")
    a = ap.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        run_sweep(a.sweep_file, dry_run=a.dry_run, force=a.force, report=not a.no_report, reports_root=a.reports,
                  jobs=a.jobs)
    except (SweepError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. --dry-run | head: the reader left; not an error of the sweep
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where things are: the project root, and the two kinds of report folder.

`reports/<name>/` holds published sweeps: committed, read-only references that results.md cites.
`reports/local/<name>/` holds this machine's runs of a sweep (git ignores it): `helpers.sweep` writes there
unless told otherwise, and its report sets each configuration beside the published one (helpers/analysis/reference.py).
Publishing is a separate, explicit step: `python -m helpers.publish reports/local/<name>`.
"""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PUBLISHED_REPORTS = PROJECT_ROOT / "reports"
LOCAL_REPORTS = PUBLISHED_REPORTS / "local"


def resolve_sweep_dir(sweep_dir) -> Path:
    """A sweep folder; a relative path is relative to the project root (the parent of helpers/)."""
    p = Path(sweep_dir).expanduser()
    p = p if p.is_absolute() else PROJECT_ROOT / p
    if not (p / "runs").is_dir():
        raise FileNotFoundError(f"{p} is not a sweep folder: it has no runs/ subfolder")
    return p


def shown(path) -> Path:
    """A path as a report or a message shows it: relative to the project when inside it, not this machine's."""
    path = Path(path)
    return path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path

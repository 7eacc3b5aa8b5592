"""Writing files a reader trusts: whole or not at all.

Every result file of the project (sidecars, summary.csv, the analysis HTML, the progress file the sweep
polls) goes through atomic_write; papermill's executed notebooks cannot (papermill writes them itself,
cell by cell), so the sweep checks they read back whole (helpers.training.runs.notebook_problem).
"""
import os
import tempfile
from pathlib import Path


def publish(tmp, path: Path) -> None:
    """Rename a finished temp file into place, readable like any file the user writes (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write(path, content, durable: bool = True) -> Path:
    """The one way this project writes a file a reader trusts: a temp file with a unique name in the same
    folder, flushed (and fsynced when durable), then renamed over `path`. A crash, a full disk or Ctrl-C
    leaves the old file (or none) and no temp file behind; the error is raised.

    content: str, bytes, or a function that writes into the open text file (e.g. lambda f: json.dump(x, f)).
    durable=False skips the fsync, for a file rewritten every step that only shows progress.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = isinstance(content, bytes)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

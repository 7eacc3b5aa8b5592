"""The package installs as a wheel: built from the tree, installed into a fresh virtualenv outside it, every module
of helpers imports from there (a Ray node or a user who runs `pip install .` gets this, not the editable tree)."""
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from helpers.records.paths import PROJECT_ROOT

HELPERS = PROJECT_ROOT / "helpers"


def _modules():
    out = []
    for f in sorted(HELPERS.rglob("*.py")):
        parts = list(f.relative_to(PROJECT_ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # running it is the command, not an import
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_the_wheel_holds_every_module_and_each_imports_from_a_fresh_virtualenv(tmp_path):
    # a copy of what the build reads: setuptools builds in the source folder, and a build/ left there by an
    # earlier build would hand the next one its files
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    shutil.copytree(HELPERS, src / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(src)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("qlora_study-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    in_tree = {str(f.relative_to(PROJECT_ROOT)) for f in HELPERS.rglob("*.py")}
    assert in_tree - names == set(), sorted(in_tree - names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as z:  # what pip would unpack, without pip in the new environment
        z.extractall(site)
    # The project's dependencies come from this environment's site-packages, added as a plain path: a path named in a
    # .pth file is not itself scanned for .pth files, so the editable install's finder (which maps `helpers` to the
    # tree) stays out, and `helpers` can come only from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import importlib, sys, helpers; print(helpers.__file__)\n"
            f"for m in {_modules()!r}:\n    importlib.import_module(m)\nprint('imported', len(sys.modules))")
    proc = subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(site)), proc.stdout

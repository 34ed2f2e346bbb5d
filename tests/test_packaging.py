"""A non-editable install (a built wheel in a fresh venv) holds every module and data file the
README uses: import every module, render every kernel template, find the backend's entry point
and run the evaluation command's --help."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import importlib, importlib.metadata, pkgutil, sys
import tidal_compile
from tidal_compile import codegen
site = sys.argv[1]
assert tidal_compile.__file__.startswith(site), f"imported {tidal_compile.__file__}, not the wheel in {site}"
modules = [m.name for m in pkgutil.walk_packages(tidal_compile.__path__, "tidal_compile.")]
for name in modules:
    importlib.import_module(name)
for name in ("tidal_compile.eval.needle", "tidal_compile.eval.recall", "tidal_compile.passes.rewrite_attention"):
    assert name in modules, name
templates = sorted(p.name for p in codegen.TEMPLATE_DIR.glob("*.jinja"))
assert "flash_decode.py.jinja" in templates and "radix_topk.py.jinja" in templates, templates
backends = [e for e in importlib.metadata.entry_points(group="torch_dynamo_backends") if e.name == "tidal"]
assert backends and backends[0].load() is tidal_compile.tidal_backend
print(len(modules), "modules,", len(templates), "templates")
"""


def run(*command: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_a_wheel_in_a_fresh_venv_holds_every_module_and_runs_the_eval_command(tmp_path):
    source = tmp_path / "source"  # a copy: an in-tree build/ folder of an earlier build would leak into the wheel
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "models",
                                                                "docs"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        source, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("tidal_compile-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel, cwd=tmp_path)
    # The dependencies (torch, transformers, ...) come from this environment; a path line in a
    # .pth file does not run that folder's own .pth files, so the editable install stays out.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert "modules" in run(python, "-c", CHECK, site, cwd=tmp_path)
    assert "--lengths" in run(python, "-m", "tidal_compile.eval.needle", "--help", cwd=tmp_path)

"""Render Triton kernel templates (`templates/*.py.jinja`, shared helpers `{% include %}`d) into
importable modules, once.

A rendered module is written to the kernel cache folder (`$TIDAL_KERNEL_CACHE`, default
`~/.cache/tidal_compile/kernels`) under a name that hashes its rendered source, so editing a
template or an included helper gives a new module; `triton.jit` needs a real source file, and
the file is there to read when debugging (`rendered_path(...)`). Kernel variants are
`tl.constexpr` switches chosen by the launchers' launch plans, not template parameters.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import jinja2

TEMPLATE_DIR = Path(str(importlib.resources.files("tidal_compile.templates")))
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=True)


def cache_dir() -> Path:
    folder = Path(os.environ.get("TIDAL_KERNEL_CACHE", Path.home() / ".cache" / "tidal_compile" / "kernels"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def render(template: str) -> str:
    """The Triton source of `template`, its includes inlined (StrictUndefined: a template that
    uses a variable fails to render: kernel variants are tl.constexpr switches instead)."""
    return _ENV.get_template(template).render()


def rendered_path(template: str) -> Path:
    """Where the rendered module lives (written if missing)."""
    source = render(template)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = cache_dir() / f"{template.split('.')[0]}_{digest}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        tmp.replace(path)
    return path


@functools.lru_cache(maxsize=None)
def _load(template: str, interpret: str) -> ModuleType:
    path = rendered_path(template)
    spec = importlib.util.spec_from_file_location(f"tidal_kernels.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(template: str) -> ModuleType:
    """Render (once per process) and import a kernel module.

    Modules loaded under `TRITON_INTERPRET=1` hold interpreted kernels and are cached apart."""
    return _load(template, os.environ.get("TRITON_INTERPRET", "0"))

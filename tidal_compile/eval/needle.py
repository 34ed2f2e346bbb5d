"""Needle-in-a-haystack accuracy of a model under several attention settings, through
`compile_for_generation` and `model.generate` (the real compiled path).

    python -m tidal_compile.eval.needle --model models/retrieval-llama \
        --settings full tidal:128 tidal:128@none quest:128 topk_oracle:128 \
        --lengths 512 1024 2048 4096 --depths 0 0.25 0.5 0.75 1 --cases 8 --out needle.json

A setting is `MODE[:BUDGET][@RESELECT][,KEY=INT...]`: `full`, `tidal:128` (selection layers
auto), `tidal:128@6` (selection layers [2, 6]), `tidal:128@none` (one selection layer, 2),
`tidal:128@3,recent=8` (and any other integer config key: `sink`, `recent`, `page_size`),
`quest:128`, `topk_oracle:128`, or a YAML config file (`model.yaml`, as `python -m
tidal_compile.calibrate` writes it). Every setting sees the same prompts (seeded per cell). A case
is answered when the 5 greedy tokens after the query `KEY k` equal the needle's value.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, StaticCache

from tidal_compile import hf_compat
from tidal_compile.config import TidalConfig
from tidal_compile.eval import retrieval_data as data
from tidal_compile.hf import compile_for_generation


@dataclass(frozen=True)
class Setting:
    """One attention configuration to evaluate: a name and tidal config overrides (None: the
    uncompiled model, for reference)."""

    name: str
    options: Optional[dict[str, Any]]

    def config(self) -> TidalConfig:
        """The setting's tidal config (its file, with the other options as overrides)."""
        options = dict(self.options or {})
        return TidalConfig.load(options.pop("config", None), **options)

    @classmethod
    def parse(cls, spec: str) -> "Setting":
        if spec.endswith((".yaml", ".yml")):  # a config file, e.g. one `python -m tidal_compile.calibrate` wrote
            return cls(spec, {"config": spec})
        head, *extra = spec.split(",")
        mode, _, rest = head.partition(":")
        budget, _, reselect = rest.partition("@")
        options: dict[str, Any] = {"mode": mode}
        for item in extra:
            key, sep, value = item.partition("=")
            if not sep or not value.lstrip("-").isdigit():
                raise ValueError(f"setting {spec!r}: expected KEY=INT after a comma, got {item!r}")
            options[key] = int(value)
        if budget:
            options["budget"] = int(budget)
        if reselect:
            options["selection_layers"] = [2] if reselect == "none" else [2, int(reselect)]
        if mode == "eager":
            return cls(spec, None)
        return cls(spec, options)


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def needle_prompts(length: int, depth: float, cases: int, device: torch.device,
                   language: data.FillerLanguage) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded prompts of one grid cell (identical for every setting)."""
    gen = torch.Generator().manual_seed(hash((length, round(depth * 1000))) % 2**31)
    prompt, answer = data.needle_batch(language, cases, length, depth, gen, torch.device("cpu"))
    return prompt.to(device), answer.to(device)


@torch.no_grad()
def evaluate_setting(model_path: str | Path, setting: Setting, lengths: list[int], depths: list[float], cases: int,
                     device: torch.device, dtype: torch.dtype, inner_backend: str) -> list[dict[str, Any]]:
    """Accuracy per (length, depth) cell for one setting."""
    torch._dynamo.reset()
    model = load_model(model_path, device, dtype)
    cache_len = max(lengths) + data.VALUE_TOKENS  # one cache shape for every cell: one compiled graph
    cache_name = hf_compat.forward_cache_name(model.forward)
    if setting.options is not None:
        compile_for_generation(model, inner_backend=inner_backend, **setting.options)
    language = data.FillerLanguage()
    cells = []
    for length in lengths:
        for depth in depths:
            prompt, answer = needle_prompts(length, depth, cases, device, language)
            # compile_for_generation's generate builds a TidalCache per call
            cache = ({"max_cache_len": cache_len} if setting.options is not None else
                     {cache_name: StaticCache(config=model.config, max_cache_len=cache_len)})
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **cache,
                                 max_new_tokens=data.VALUE_TOKENS, min_new_tokens=data.VALUE_TOKENS,
                                 do_sample=False, pad_token_id=data.PAD)
            generated = out[:, -data.VALUE_TOKENS:]
            hits = (generated == answer).all(dim=1)
            cells.append(dict(setting=setting.name, length=length, depth=depth, cases=cases,
                              accuracy=hits.float().mean().item(), generated=generated.tolist()))
            print(f"  {setting.name:18s} length {length:6d} depth {depth:.2f}: {cells[-1]['accuracy']:.3f}", flush=True)
    return cells


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--settings", nargs="+", default=["full", "tidal:128", "topk_oracle:128"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--cases", type=int, default=8, help="prompts per grid cell")
    parser.add_argument("--inner-backend", default="inductor", choices=["inductor", "eager", "aot_eager"],
                        help="what compiles the rewritten graph (eager: the tidal ops still run their kernels)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for spec in args.settings:
        setting = Setting.parse(spec)
        start = time.perf_counter()
        print(f"{setting.name}: {len(args.lengths)} lengths x {len(args.depths)} depths x {args.cases} cases", flush=True)
        results += evaluate_setting(args.model, setting, args.lengths, args.depths, args.cases, device, dtype,
                                    args.inner_backend)
        mean = sum(c["accuracy"] for c in results if c["setting"] == setting.name) / (len(args.lengths) * len(args.depths))
        print(f"{setting.name}: mean accuracy {mean:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # written after every setting: a cut run keeps its part
        args.out.write_text(json.dumps(dict(model=str(args.model), device=str(device), dtype=str(dtype),
                                            inner_backend=args.inner_backend, torch=torch.__version__,
                                            cells=results), indent=1))


if __name__ == "__main__":
    main()

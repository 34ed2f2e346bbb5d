"""Attention recall: how much of each sparse layer's full attention probability mass falls on
the positions it attends to, per mode and budget (position persistence made visible).

    python -m tidal_compile.eval.recall --model models/retrieval-llama \
        --settings tidal:128 quest:128 topk_oracle:128 --length 2048 --cases 8 --out recall.json

The model decodes needle prompts with every layer's attention replaced through transformers'
`AttentionInterface` by the mode's reference computation (`tidal_compile.ops.reference`, the
semantics the compiled ops implement): the trajectory is the mode's own. At each decode step
and each non-dense layer, the full softmax of that layer's query over all valid positions is
computed as well, and the mass on the chosen positions is recorded (averaged over heads,
sequences and steps). Selection layers of mode tidal and every layer of topk_oracle choose by
their own scores; tidal's sparse layers reuse the indices of their selection layer. A selection
layer's own output is exact (it reads every position); its recall is the mass on the positions it
passes on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from transformers import StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tidal_compile import hf_compat
from tidal_compile.config import TidalConfig
from tidal_compile.eval import retrieval_data as data
from tidal_compile.eval.needle import Setting, load_model, needle_prompts
from tidal_compile.ops import reference

NAME = "tidal_recall_probe"


class RecallProbe:
    """Decode-step attention of one mode, recording the recall of each non-dense layer."""

    def __init__(self, config: TidalConfig, num_layers: int):
        self.config = config
        self.plan = config.resolve(num_layers)
        self.indices: dict[int, Tensor] = {}
        self.mass: dict[int, list[float]] = {}

    def kind(self, layer: int) -> str:
        if self.config.mode == "full" or layer in self.plan.dense_layers:
            return "dense"
        if self.config.mode in ("quest", "topk_oracle"):
            return self.config.mode
        return "selection" if layer in self.plan.selection_layers else "sparse"

    def positions(self, layer: int, kind: str, query: Tensor, key: Tensor, mask: Optional[Tensor],
                  logits: Tensor, valid: Tensor) -> Tensor:
        """The positions the layer attends to, int32 [B, S, n] (-1 unused), given its full logits
        and valid positions [B, H, L] (`reference.attention_logits`)."""
        cfg = self.config
        if kind == "quest":
            meta = reference.quest_page_metadata(key, mask, cfg.page_size)
            return reference.quest_positions(query, *meta, mask, key.shape[2], cfg.budget, cfg.page_size)
        if kind in ("selection", "topk_oracle"):
            granularity = "query_head" if kind == "topk_oracle" else cfg.granularity
            rank, rank_valid = reference.selection_ranking(logits, valid, key.shape[1], granularity)
            chosen = reference.top_positions(rank, rank_valid, cfg.budget, cfg.sink, cfg.recent)
            self.indices[layer] = chosen
            return chosen
        return self.indices[max(s for s in self.plan.selection_layers if s < layer)]

    def attention(self, module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                  dropout: float = 0.0, scaling: Optional[float] = None, **kwargs: Any) -> tuple[Tensor, None]:
        if query.shape[2] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        layer = module.layer_idx
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = attention_mask[:, :, -1:, :] if attention_mask is not None else None
        kind = self.kind(layer)
        if kind == "dense":
            out = reference.dense_attention(query, key, value, mask, scale)
        else:
            logits, valid = reference.attention_logits(query, key, mask, scale)
            chosen = self.positions(layer, kind, query, key, mask, logits, valid)
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [B, H, L]
            per_head = reference.indices_per_query_head(chosen, query.shape[1]).long()
            mass = torch.gather(probs, 2, per_head.clamp(min=0)).masked_fill(per_head < 0, 0.0).sum(-1)
            self.mass.setdefault(layer, []).append(float(mass.mean()))
            # a selection layer reads every position itself; it passes `chosen` on
            out = (reference.dense_attention(query, key, value, mask, scale) if kind == "selection"
                   else reference.sparse_attention(query, key, value, chosen, scale))
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    def recall(self) -> dict[int, float]:
        return {layer: sum(m) / len(m) for layer, m in sorted(self.mass.items())}


@torch.no_grad()
def measure(model: torch.nn.Module, setting: Setting, length: int, depths: list[float], cases: int,
            steps: int) -> dict[int, float]:
    """Mean recall per non-dense layer over needle prompts at `depths`, `steps` decode steps each."""
    config = setting.config()
    probe = RecallProbe(config, model.config.num_hidden_layers)
    language = data.FillerLanguage()
    device = next(model.parameters()).device
    with hf_compat.attention_routed_through(model, NAME, probe.attention):
        for depth in depths:
            prompt, _ = needle_prompts(length, depth, cases, device, language)
            cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps)
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **{hf_compat.forward_cache_name(model.forward): cache},
                           max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=data.PAD,
                           disable_compile=True)  # the probe runs eagerly
    return probe.recall()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--settings", nargs="+", default=["tidal:128", "quest:128", "topk_oracle:128"])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--steps", type=int, default=data.VALUE_TOKENS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = load_model(args.model, device, torch.float32)
    results = {}
    for spec in args.settings:
        setting = Setting.parse(spec)
        if setting.options is None or setting.config().mode == "full":
            continue  # nothing is sparse
        results[spec] = measure(model, setting, args.length, args.depths, args.cases, args.steps)
        print(f"{spec}: " + ", ".join(f"L{layer} {r:.3f}" for layer, r in results[spec].items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(model=str(args.model), length=args.length, depths=args.depths,
                                        cases=args.cases, steps=args.steps, recall=results), indent=1))


if __name__ == "__main__":
    main()

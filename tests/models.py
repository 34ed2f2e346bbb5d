"""Tiny random-initialised Hugging Face decoders built inside the tests (no downloads)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, StaticCache)

from tidal_compile import TidalCache, hf_compat

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
VOCAB = 96
CACHE = hf_compat.forward_cache_name(LlamaForCausalLM.forward)
"""The forward / generate argument for the KV cache in the installed transformers."""


def tiny_model(family: str = "llama", layers: int = 4, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
               dtype: torch.dtype = torch.float32, seed: int = 0, **config_overrides) -> torch.nn.Module:
    config_cls, model_cls = FAMILIES[family]
    extra = {"sliding_window": None} if family == "mistral" else {}
    extra["attn_implementation"] = "sdpa"
    extra.update(config_overrides)
    config = config_cls(vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        head_dim=head_dim, max_position_embeddings=512, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    # Random init gives near-uniform attention; sharper weights make top-k selection matter.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def prompts(batch: int, length: int, padded: bool, seed: int = 0, device: str = "cpu"
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Random prompts [B, L] and, when `padded` (and B > 1), a left-padding mask for sequence 1."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (batch, length), generator=gen)
    padding = None
    if padded and batch > 1:
        padding = torch.ones(batch, length, dtype=torch.bool)
        padding[1, : length // 3] = False
        padding = padding.to(device)
    return prompt.to(device), padding


def greedy_decode(forward: Callable, model: torch.nn.Module, prompt: torch.Tensor, steps: int,
                  max_cache_len: int, padding: Optional[torch.Tensor] = None,
                  tokens: Optional[torch.Tensor] = None, cache: Optional[StaticCache] = None,
                  prefill: Optional[Callable] = None, page_size: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `prompt` then decode `steps` tokens with a StaticCache through `forward`.

    `padding` ([B, P] bool, True = real token) masks left padding. With `tokens` given, those
    are fed instead of the argmax (teacher forcing), so two runs see identical inputs. `cache`
    lets the caller inspect the cache afterwards; by default a StaticCache, or a TidalCache with
    Quest pages of `page_size`. `prefill` runs the prompt instead of `forward` (e.g. the eager
    model, so CUDA-graph decode steps find the cache allocated).
    Returns (generated tokens [B, steps], last-position logits [steps + 1, B, V]).
    """
    batch, length = prompt.shape
    if cache is None:
        cache = (TidalCache(model.config, max_cache_len, page_size=page_size) if page_size
                 else StaticCache(config=model.config, max_cache_len=max_cache_len))
    mask = torch.ones(batch, max_cache_len, dtype=torch.long, device=prompt.device)
    if padding is not None:
        mask[:, :length] = padding.long()
    position = (mask[:, :length].cumsum(-1) - 1).clamp(min=0)
    logits, generated = [], []
    with torch.no_grad():
        out = (prefill or forward)(input_ids=prompt, attention_mask=mask, position_ids=position,
                                   use_cache=True, **{CACHE: cache})
        for step in range(steps + 1):
            last = out.logits[:, -1].to(torch.float32, copy=True)  # CUDA-graph outputs are reused
            logits.append(last)
            if step == steps:
                break
            token = tokens[:, step:step + 1] if tokens is not None else last.argmax(-1, keepdim=True)
            generated.append(token)
            position = position[:, -1:] + 1
            out = forward(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True,
                          **{CACHE: cache})
    return torch.cat(generated, dim=1), torch.stack(logits)

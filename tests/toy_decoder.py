"""A toy decoder whose attention calls SDPA the way Hugging Face does, for small-graph pass tests."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Hugging Face's repeat_kv: query head h reads KV head h // groups."""
    b, hkv, length, d = x.shape
    if groups == 1:
        return x
    return x[:, :, None, :, :].expand(b, hkv, groups, length, d).reshape(b, hkv * groups, length, d)


class ToyAttention(nn.Module):
    def __init__(self, heads: int, kv_heads: int, head_dim: int, expand: str = "repeat_kv", **sdpa_kwargs):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.expand = heads, kv_heads, head_dim, expand
        self.q_proj = nn.Linear(heads * head_dim, heads * head_dim, bias=False)
        self.sdpa_kwargs = sdpa_kwargs

    def forward(self, x, k_cache, v_cache, mask):
        b, q_len, _ = x.shape
        q = self.q_proj(x).view(b, q_len, self.heads, self.head_dim).transpose(1, 2)
        groups = self.heads // self.kv_heads
        kwargs = dict(self.sdpa_kwargs)
        if self.expand == "repeat_kv":
            k, v = repeat_kv(k_cache, groups), repeat_kv(v_cache, groups)
        elif self.expand == "tile":  # head h reads KV head h % Hkv: not repeat_kv
            k, v = k_cache.repeat(1, groups, 1, 1), v_cache.repeat(1, groups, 1, 1)
        elif self.expand == "eager":  # attn_implementation="eager": no SDPA call
            k, v = repeat_kv(k_cache, groups), repeat_kv(v_cache, groups)
            scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
            return out.transpose(1, 2).reshape(b, q_len, -1)
        else:
            k, v = k_cache, v_cache
            kwargs["enable_gqa"] = groups > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        return out.transpose(1, 2).reshape(b, q_len, -1)


class ToyLayer(nn.Module):
    def __init__(self, attention: ToyAttention):
        super().__init__()
        self.self_attn = attention


class ToyDecoder(nn.Module):
    """`layers.<i>.self_attn` like a Hugging Face decoder; the KV caches are inputs. Layers in
    `sliding` attend under a mask of their own (the last `window` positions of `mask`), as
    sliding-window layers of Hugging Face models do."""

    def __init__(self, num_layers=4, heads=4, kv_heads=2, head_dim=8, expand="repeat_kv", sliding=(), window=4,
                 **sdpa_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(ToyLayer(ToyAttention(heads, kv_heads, head_dim, expand, **sdpa_kwargs))
                                    for _ in range(num_layers))
        self.sliding, self.window = set(sliding), window

    def forward(self, x, caches, mask=None):
        sliding_mask = None
        if self.sliding and mask is not None:
            recent = torch.arange(mask.shape[-1], device=mask.device) >= mask.shape[-1] - self.window
            sliding_mask = mask & recent
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, caches)):
            x = x + layer.self_attn(x, k_cache, v_cache, sliding_mask if i in self.sliding else mask)
        return x

    def inputs(self, batch=2, q_len=1, length=12, seed=0, masked=True):
        gen = torch.Generator().manual_seed(seed)
        attn = self.layers[0].self_attn
        x = torch.randn(batch, q_len, attn.heads * attn.head_dim, generator=gen)
        caches = [(torch.randn(batch, attn.kv_heads, length, attn.head_dim, generator=gen),
                   torch.randn(batch, attn.kv_heads, length, attn.head_dim, generator=gen)) for _ in self.layers]
        mask = None
        if masked:
            mask = torch.ones(batch, 1, q_len, length, dtype=torch.bool)
            mask[-1, ..., : length // 3] = False  # left padding of the last sequence
        return x, caches, mask


def capture_graph(fn, *args, **compile_kwargs) -> fx.GraphModule:
    """The FX graph Dynamo hands a backend for `fn(*args)` (fullgraph)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True, **compile_kwargs)(*args)
    assert len(graphs) == 1
    return graphs[0]

"""Launchers of the Triton decode-attention kernels (templates rendered by `codegen`).

Each launcher allocates outputs, picks the split count and block sizes from the shapes and the
device, and launches through `wrap_triton` so that Inductor compiles the kernels inside the
graph. They run wherever Triton does: CUDA, or the CPU under `TRITON_INTERPRET=1` (tests).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from tidal_compile import codegen

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DecodeBlocks:
    """Tile sizes of the split-K decode kernels."""

    block_n: int
    num_warps: int
    num_stages: int


# Defaults per head dim, for few (B x Hkv <= 32) and many sequence-heads. D=128 from
# benchmarks/tune_decode.py on an H100 (docs/results/tune-decode-*.log: within 1-3% of SDPA's
# flash backend at B 1/8, Hkv 8/32); 64 and 256 keep the same tile bytes.
_DECODE_BLOCKS = {
    64: (DecodeBlocks(128, 8, 3), DecodeBlocks(128, 4, 3)),
    128: (DecodeBlocks(128, 8, 3), DecodeBlocks(128, 4, 3)),
    256: (DecodeBlocks(64, 8, 2), DecodeBlocks(64, 4, 2)),
}
MIN_SPLIT = 256  # positions per split: below this, combining costs more than the split saves
SPLIT_ALIGN = 128  # split lengths are multiples of every tile's BLOCK_N, so the grid fits them all

# Candidate tiles (BLOCK_N at D = 128, warps, stages) that flash_decode autotunes over on CUDA: the
# best of benchmarks/tune_decode.py's sweep on an H100 across shapes, plus the defaults above.
TUNE_CANDIDATES = ((128, 8, 3), (128, 8, 4), (128, 4, 2), (128, 4, 3), (64, 4, 4), (64, 8, 3))


FEW_SEQUENCE_HEADS = 32  # B x Hkv up to this takes the "few" tiles


def decode_blocks(head_dim: int, sequence_heads: int = 1) -> DecodeBlocks:
    few, many = _DECODE_BLOCKS.get(triton.next_power_of_2(head_dim), (DecodeBlocks(32, 4, 2),) * 2)
    return few if sequence_heads <= FEW_SEQUENCE_HEADS else many


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def autotune_enabled(device: torch.device) -> bool:
    """Tiles are autotuned on CUDA unless `TIDAL_AUTOTUNE=0` (then the defaults above are used)."""
    return device.type == "cuda" and os.environ.get("TIDAL_AUTOTUNE", "1") != "0"


SWITCHES = ("MASK_KIND", "EMIT_LOGITS", "SKIP_MASKED_BLOCKS", "BOUND_LOOP", "UNMASKED_RUN")
"""flash_decode's feature switches: part of the autotuning key (each variant is tuned apart)."""


def tile_rows(rows_at_128: int, head_dim: int) -> int:
    """A tile's rows at `head_dim` for `rows_at_128` at D = 128: as many tile bytes at larger head
    dims (at least 16 rows), the same rows at smaller ones."""
    return max(16, rows_at_128 // max(1, triton.next_power_of_2(head_dim) // 128))


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: triton.JITFunction, head_dim: int) -> triton.runtime.Autotuner:
    """`kernel` under triton.autotune over TUNE_CANDIDATES (tile bytes kept for other head dims).
    Triton times the candidates at the first launch of each key and caches the winner per process;
    under torch.compile, Inductor autotunes the same configs and keeps the result in its cache."""
    configs = [triton.Config({"BLOCK_N": tile_rows(n, head_dim)}, num_warps=w, num_stages=st)
               for n, w, st in TUNE_CANDIDATES]
    return triton.autotune(configs, key=["length", "split_len", "NUM_KV_HEADS", "GROUP", "HEAD_DIM", *SWITCHES])(kernel)


DECODE_WAVES = 4  # flash_decode's programs fill the GPU this many times (benchmarks/tune_decode.py)


def split_work(programs: int, length: int, block_n: int, device: torch.device, waves: int = 2
               ) -> tuple[int, int]:
    """(splits, positions per split) so that programs x splits fills at most `waves` whole waves of
    one program per SM (a launch just past a whole wave idles most SMs during its last), with at
    least MIN_SPLIT positions per split and a split length that is a multiple of block_n."""
    wanted = max(1, waves * _sm_count(device) // max(programs, 1))
    splits = min(wanted, triton.cdiv(length, MIN_SPLIT))
    split_len = triton.cdiv(triton.cdiv(length, splits), block_n) * block_n
    return triton.cdiv(length, split_len), split_len


@dataclass(frozen=True)
class MaskSummary:
    """Per sequence (int32 [B]): valid length (last valid position + 1), where sink / recent
    start, and the first valid position and how many are valid (one run when they fill
    [kv_start, kv_len))."""

    kv_len: Tensor
    sink_end: Tensor
    recent_start: Tensor
    kv_start: Optional[Tensor] = None
    valid_count: Optional[Tensor] = None

    FIELDS = ("kv_len", "kv_start", "valid_count", "sink_end", "recent_start")
    """The order of `tidal::mask_summary`'s outputs (`reference.mask_summary`)."""

    def as_tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> Optional["MaskSummary"]:
        """The summary held by `tidal::mask_summary`'s outputs (none given: None)."""
        return cls(**dict(zip(cls.FIELDS, tensors))) if tensors else None


SUMMARY_CHUNK = 4096  # positions per program of the one-pass mask summary


def summarize_mask(attn_mask: Optional[Tensor], batch: int, length: int, device: torch.device,
                   sink: int = 0, recent: int = 0) -> MaskSummary:
    """Valid length, first valid position, valid count and sink / recent boundaries per sequence,
    from a mask broadcast over heads."""
    batch, length = int(batch), int(length)  # see `sizes`
    one_pass = sink == 0 and recent <= 1  # no boundary to count: parallel over the row
    # The one pass merges its chunks by atomics: max / add into zeros, min into the length.
    make = torch.zeros if one_pass else torch.empty
    kv_len, recent_start, valid_count = (make(batch, dtype=torch.int32, device=device) for _ in range(3))
    sink_end = torch.empty(batch, dtype=torch.int32, device=device)
    kv_start = (torch.full((batch,), length, dtype=torch.int32, device=device) if one_pass
                else torch.empty(batch, dtype=torch.int32, device=device))
    mask, (stride_mb, stride_mn), mask_kind, mask_min = _mask_args(attn_mask, batch, length, kv_len)
    module = codegen.load("mask_summary.py.jinja")
    args = dict(Mask=mask, KvLen=kv_len, KvStart=kv_start, ValidCount=valid_count, SinkEnd=sink_end,
                RecentStart=recent_start, stride_mb=stride_mb, stride_mn=stride_mn, length=length,
                MASK_KIND=mask_kind, MASK_MIN=mask_min)
    if one_pass:
        wrap_triton(module.mask_valid_length)[(batch, triton.cdiv(length, SUMMARY_CHUNK))](
            **args, BLOCK=1024, CHUNK=SUMMARY_CHUNK)
    else:
        wrap_triton(module.mask_summary)[(batch,)](**args, sink=sink, recent=recent, BLOCK=4096)
    return MaskSummary(kv_len, sink_end, recent_start, kv_start, valid_count)


MAX_HEAD_DIM = 256


def unsupported(query: Tensor, value: Tensor, attn_mask: Optional[Tensor]) -> Optional[str]:
    """Why the kernels do not take these inputs (the op then runs the PyTorch reference), or None
    when they do: they take fp16 / bf16 / fp32, one head dim <= 256 for q, k and v, and a mask
    shared by all heads."""
    if query.dtype not in KERNEL_DTYPES:
        return f"dtype {query.dtype} (kernels: float16, bfloat16, float32)"
    if value.shape[-1] != query.shape[-1]:
        return f"value head dim {value.shape[-1]} differs from the query's {query.shape[-1]}"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} > {MAX_HEAD_DIM}"
    if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] != 1:
        return f"a per-head attention mask {tuple(attn_mask.shape)} (kernels: one mask per sequence)"
    return None


def sizes(t: Tensor) -> tuple[int, ...]:
    """`t.shape` as plain ints. Launch plans (split counts, tiles, template flags) depend on the
    sizes, so under torch.compile with a symbolic size (dynamic=True, or a cache that changed
    size) this specialises the graph on the traced value: a guard, and a recompile for another."""
    return tuple(int(size) for size in t.shape)


DOT_MIN = 16  # tl.dot's smallest dimension


def _dot_tile(size: int) -> int:
    """A tile of a tl.dot operand covering `size` (a query-head group, a head dim): a power of two,
    at least tl.dot's smallest dimension (head dims below 16: tiny test models), the lanes past
    `size` masked."""
    return max(DOT_MIN, triton.next_power_of_2(size))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(attn_mask: Optional[Tensor], batch: int, length: int, like: Tensor):
    """(tensor, strides b/n, kind, min value) for the kernels' per-sequence mask argument; kind is
    the kernels' MASK_KIND, "none" | "bool" | "additive" (no mask: `like` stands in, never read)."""
    if attn_mask is None:
        return like, (0, 0), "none", 0.0
    kind = "bool" if attn_mask.dtype == torch.bool else "additive"
    m = attn_mask.expand(batch, 1, 1, length)
    low = 0.0 if kind == "bool" else float(torch.finfo(m.dtype).min)
    return m, (m.stride(0), m.stride(3)), kind, low


ROW_ALIGN = 16  # positions: Triton specializes strides divisible by 16 (aligned, vectorized row loads)


def _aligned_rows(*leading: int, length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised [*leading, padded] tensor, rows of `length` padded to a multiple of
    ROW_ALIGN elements: row strides stay divisible by 16 for any cache length. A kernel that
    writes it takes it whole; readers may take the `[..., :length]` view. (Under torch.compile a
    kernel writing a view of a buffer copies the view in and out: five launches a Quest layer.)"""
    padded = triton.cdiv(length, ROW_ALIGN) * ROW_ALIGN
    return torch.empty(*leading, padded, dtype=dtype, device=device)


def scratch_row_stride(length: int) -> int:
    """A row stride of at least `length` for per-row scratch that every row's program writes at
    once: an odd multiple of ROW_ALIGN, so rows are aligned (on the H200, B8 32K + 16 k=2048 in
    4096-key steps: 154 us with rows 2050 entries apart, 104 with 2064) and never a power of two
    apart (cheap; no gain measured: 2048 and 2064 both 152 us at exactly 32K)."""
    return ROW_ALIGN * (triton.cdiv(length, ROW_ALIGN) | 1)


def _combine(part_out: Tensor, part_lse: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Merge split partials into (out [B, H, 1, D] in `dtype`, lse [B, H] fp32). One split is
    already the result (`_partials` gave it the output's dtype): no launch."""
    b, h, splits, d = sizes(part_out)
    if splits == 1:
        return part_out, part_lse.view(b, h)
    out = torch.empty(b, h, 1, d, dtype=dtype, device=part_out.device)
    lse = torch.empty(b, h, dtype=torch.float32, device=part_out.device)
    kernel = codegen.load("combine_splits.py.jinja").combine_splits
    wrap_triton(kernel)[(b * h,)](
        PartOut=part_out, PartLse=part_lse, Out=out, Lse=lse,
        stride_pb=part_out.stride(0), stride_ph=part_out.stride(1), stride_ps=part_out.stride(2),
        stride_lb=part_lse.stride(0), stride_lh=part_lse.stride(1), stride_ob=out.stride(0), stride_oh=out.stride(1),
        NUM_HEADS=h, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
        HEAD_DIM=d, BLOCK_D=_dot_tile(d))
    return out, lse


def _partials(batch: int, heads: int, splits: int, head_dim: int, dtype: torch.dtype, device: torch.device
              ) -> tuple[Tensor, Tensor]:
    """Per-split outputs (fp32; a single split writes the final output, in `dtype`) and log-sum-exps."""
    return (torch.empty(batch, heads, splits, head_dim, dtype=torch.float32 if splits > 1 else dtype, device=device),
            torch.empty(batch, heads, splits, dtype=torch.float32, device=device))


BOUND_MIN_WORK = 1 << 19  # B x Hkv x L from which a masked dense launch computes the mask summary


@dataclass(frozen=True)
class FlashDecodePlan:
    """How one `flash_decode` launch runs: its grid (B x Hkv programs, `splits` splits of
    `split_len` positions), its tiles (None: autotuned) and the kernel's feature switches."""

    splits: int
    split_len: int
    blocks: Optional[DecodeBlocks]
    mask_kind: str
    emit_logits: bool
    skip_masked_blocks: bool
    bound_loop: bool
    unmasked_run: bool

    def switches(self) -> dict[str, object]:
        """The kernel's tl.constexpr feature switches (the SWITCHES, from the fields of that name)."""
        return {name: getattr(self, name.lower()) for name in SWITCHES}

    def tiles(self) -> dict[str, int]:
        """Launch keywords fixing the tiles (none when autotuned)."""
        if self.blocks is None:
            return {}
        return dict(BLOCK_N=self.blocks.block_n, num_warps=self.blocks.num_warps, num_stages=self.blocks.num_stages)


def plan_flash_decode(batch: int, kv_heads: int, length: int, head_dim: int, device: torch.device, mask_kind: str,
                      emit_logits: bool, summary_given: bool, blocks: Optional[DecodeBlocks] = None,
                      waves: Optional[int] = None, bound_loop: Optional[bool] = None) -> FlashDecodePlan:
    """The launch plan of `flash_decode` for these shapes (arguments as there)."""
    autotune = blocks is None and autotune_enabled(device)
    fixed = blocks or decode_blocks(head_dim, batch * kv_heads)
    splits, split_len = split_work(batch * kv_heads, length, SPLIT_ALIGN if autotune else fixed.block_n, device,
                                   waves or DECODE_WAVES)
    if bound_loop is None:
        bound_loop = summary_given or (
            mask_kind != "none" and not emit_logits and batch * kv_heads * length >= BOUND_MIN_WORK)
    # Skipping all-masked blocks by a branch pays only for dense-only launches of few programs
    # (H100, docs/benchmarks.md); a skipped block would also owe its -inf logits.
    return FlashDecodePlan(splits=splits, split_len=split_len, blocks=None if autotune else fixed,
                           mask_kind=mask_kind, emit_logits=emit_logits,
                           skip_masked_blocks=not emit_logits and batch * kv_heads <= FEW_SEQUENCE_HEADS,
                           bound_loop=bound_loop, unmasked_run=bound_loop and mask_kind == "bool")


def flash_decode(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], scale: float,
                 emit_logits: bool = False, blocks: Optional[DecodeBlocks] = None, waves: Optional[int] = None,
                 bound_loop: Optional[bool] = None, summary: Optional[MaskSummary] = None
                 ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Exact decode attention. Returns (out [B, H, 1, D], lse [B, H] fp32, logits [B, H, L] fp32
    with -inf at masked positions, or None). Tiles are autotuned on CUDA (`autotune_enabled`),
    else the defaults of `decode_blocks`; `blocks` fixes them and `waves` the split count.

    `bound_loop` spreads each sequence's splits over its valid length only (from `summary`,
    computed by `summarize_mask` when not given), so a static cache's unfilled tail costs no
    iterations and leaves no program idle; logits from the valid length on are then left
    unwritten (the top-k never reads them). With a bool mask whose valid positions form one run
    per sequence, the run is then read without the mask.
    None: bound when the summary is given, or for a masked launch without logits of at least
    BOUND_MIN_WORK sequence-head positions, where the mask costs more than the summary
    (docs/benchmarks.md)."""
    b, h, _, d = sizes(query)
    _, hkv, length, _ = sizes(key)
    mask, (stride_mb, stride_mn), mask_kind, mask_min = _mask_args(attn_mask, b, length, query)
    plan = plan_flash_decode(b, hkv, length, d, query.device, mask_kind, emit_logits, summary is not None, blocks,
                             waves, bound_loop)
    if plan.bound_loop and summary is None:
        summary = summarize_mask(attn_mask, b, length, query.device)
    q = query.contiguous()
    part_out, part_lse = _partials(b, h, plan.splits, d, query.dtype, query.device)
    logits = _aligned_rows(b, h, length=length, dtype=torch.float32, device=query.device) if emit_logits else part_lse
    kernel = codegen.load("flash_decode.py.jinja").flash_decode_split
    if plan.unmasked_run:
        kv_len, kv_start, valid_count = summary.kv_len, summary.kv_start, summary.valid_count
    else:  # unread placeholders but for the valid length of a bounded loop
        kv_len, kv_start, valid_count = summary.kv_len if plan.bound_loop else part_lse, part_lse, part_lse
    wrap_triton(_autotuned(kernel, d) if plan.blocks is None else kernel)[(b * hkv, plan.splits)](
        Q=q, K=key, V=value, Mask=mask, KvLen=kv_len, KvStart=kv_start, ValidCount=valid_count,
        PartOut=part_out, PartLse=part_lse, Logits=logits,
        stride_qb=q.stride(0), stride_qh=q.stride(1),
        stride_kb=key.stride(0), stride_kh=key.stride(1), stride_kn=key.stride(2),
        stride_vb=value.stride(0), stride_vh=value.stride(1), stride_vn=value.stride(2),
        stride_mb=stride_mb, stride_mn=stride_mn,
        stride_pb=part_out.stride(0), stride_ph=part_out.stride(1), stride_ps=part_out.stride(2),
        stride_lb=part_lse.stride(0), stride_lh=part_lse.stride(1),
        stride_xb=logits.stride(0), stride_xh=logits.stride(1) if emit_logits else 0,
        scale=scale, length=length, split_len=plan.split_len,
        NUM_KV_HEADS=hkv, GROUP=h // hkv, GROUP_PAD=_dot_tile(h // hkv), HEAD_DIM=d,
        BLOCK_D=_dot_tile(d), MASK_MIN=mask_min, DOT_PRECISION=_dot_precision(query.dtype),
        **plan.switches(), **plan.tiles())
    out, lse = _combine(part_out, part_lse, query.dtype)
    return out, lse, logits[..., :length] if emit_logits else None


@dataclass(frozen=True)
class SparseDecodePlan:
    """How one `sparse_decode` launch runs: `programs` programs (B x Hkv when `shared`: one index
    row for the GROUP query heads of a KV head; else B x H) times `splits` splits of `split_len`
    index slots, its tiles, and the kernel's feature switches (`paged`: indices are Quest pages;
    `mask_kind` of the mask paged slots are checked against)."""

    programs: int
    splits: int
    split_len: int
    blocks: DecodeBlocks
    shared: bool
    paged: bool
    mask_kind: str

    def switches(self) -> dict[str, object]:
        return dict(SHARED=self.shared, PAGED=self.paged, MASK_KIND=self.mask_kind)


SPARSE_BLOCKS = DecodeBlocks(128, 4, 2)  # sparse_decode's tile at D = 128 (same tile bytes at other head dims) ...
SPARSE_ONE_TILE_MAX = 256  # ... or, with few programs, all of a split's slots in one tile up to this many


def sparse_blocks(head_dim: int, programs: int, slots: int, device: torch.device) -> DecodeBlocks:
    """sparse_decode's tile: SPARSE_BLOCKS, or with at most half as many programs as SMs and at most
    SPARSE_ONE_TILE_MAX slots (scaled with the head dim), every slot in one tile: the gathered rows
    in one step, no chain of dependent index and row loads. On an H200 (benchmarks/
    tune_sparse_decode.py, docs/results/tune-sparse-decode-h200-2026-12-03-*.log; us a layer, eight
    layers of their own caches in one graph; before: the dense launch's tiles, 128 positions, 8 warps
    (4 with many sequence-heads), 3 stages): B1 128K k=256 query_head (32 programs) 7.46 -> 5.94 in
    one tile of 256; kv_head (8) 6.88 -> 5.43; B8 32K k=256 (256 programs) 16.31 -> 13.44 and k=2048
    72.3 -> 66.2 with SPARSE_BLOCKS; B1 128K k=2048 (8 splits of 256) 16.60 -> 15.53."""
    block_n = tile_rows(SPARSE_BLOCKS.block_n, head_dim)
    if programs <= _sm_count(device) // 2 and slots <= tile_rows(SPARSE_ONE_TILE_MAX, head_dim):
        block_n = max(block_n, triton.next_power_of_2(slots))
    return DecodeBlocks(block_n, SPARSE_BLOCKS.num_warps, SPARSE_BLOCKS.num_stages)


def plan_sparse_decode(batch: int, heads: int, kv_heads: int, sets: int, slots: int, head_dim: int,
                       device: torch.device, paged: bool, mask_kind: str) -> SparseDecodePlan:
    """The launch plan of `sparse_decode` for `slots` index slots per set (pages x page size)."""
    shared = sets != heads or heads == kv_heads
    programs = batch * kv_heads if shared else batch * heads
    blocks = sparse_blocks(head_dim, programs, slots, device)
    splits, split_len = split_work(programs, slots, blocks.block_n, device)
    return SparseDecodePlan(programs=programs, splits=splits, split_len=split_len, blocks=blocks, shared=shared,
                            paged=paged, mask_kind=mask_kind)


def sparse_decode(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                  attn_mask: Optional[Tensor] = None, page_size: int = 0,
                  plan: Optional[SparseDecodePlan] = None) -> Tensor:
    """Attention over the positions in `indices` (int32 [B, S, k], -1 ignored). With `page_size`,
    indices are pages (Quest): each covers `page_size` positions, those valid under `attn_mask` used.
    `plan` defaults to `plan_sparse_decode`'s."""
    b, h, _, d = sizes(query)
    _, hkv, length, _ = sizes(key)
    _, sets, budget = sizes(indices)
    slots = budget * max(page_size, 1)
    mask, (stride_mb, stride_mn), mask_kind, mask_min = _mask_args(attn_mask if page_size else None, b, length, query)
    plan = plan or plan_sparse_decode(b, h, hkv, sets, slots, d, query.device, bool(page_size), mask_kind)
    q = query.contiguous()
    idx = indices.contiguous()
    part_out, part_lse = _partials(b, h, plan.splits, d, query.dtype, query.device)
    kernel = codegen.load("sparse_decode.py.jinja").sparse_decode_split
    group = h // hkv
    wrap_triton(kernel)[(plan.programs, plan.splits)](
        Q=q, K=key, V=value, Indices=idx, Mask=mask, PartOut=part_out, PartLse=part_lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1),
        stride_kb=key.stride(0), stride_kh=key.stride(1), stride_kn=key.stride(2),
        stride_vb=value.stride(0), stride_vh=value.stride(1), stride_vn=value.stride(2),
        stride_ib=idx.stride(0), stride_is=idx.stride(1), stride_mb=stride_mb, stride_mn=stride_mn,
        stride_pb=part_out.stride(0), stride_ph=part_out.stride(1), stride_ps=part_out.stride(2),
        stride_lb=part_lse.stride(0), stride_lh=part_lse.stride(1),
        scale=scale, split_len=plan.split_len, budget=slots, length=length,
        NUM_KV_HEADS=hkv, GROUP=group, GROUP_PAD=_dot_tile(group if plan.shared else 1), HEAD_DIM=d,
        BLOCK_D=_dot_tile(d), BLOCK_N=plan.blocks.block_n, SETS=sets, PAGE=max(page_size, 1),
        MASK_MIN=mask_min, DOT_PRECISION=_dot_precision(query.dtype), **plan.switches(),
        num_warps=plan.blocks.num_warps, num_stages=plan.blocks.num_stages)
    return _combine(part_out, part_lse, query.dtype)[0]


QUEST_BLOCK_P = 64  # pages per quest_scores program (H200: 64 over 128, 4 warps over 8; docs/benchmarks.md) ...
QUEST_WARPS = 4  # ... and its warps (benchmarks/tune_quest.py sweeps both)


def quest_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], page_min: Tensor,
                    page_max: Tensor, filled: Tensor, scale: float, budget: int, page_size: int,
                    summary: Optional[MaskSummary] = None) -> Tensor:
    """Quest decode attention: the page metadata brought up to date in place (the pages from the
    one holding position `filled` to the valid length, which `filled` then becomes) and the page
    scores in one launch, per-head top pages (the current one forced), then attention over the
    chosen pages' valid positions."""
    b, h, _, d = sizes(query)
    _, hkv, length, _ = sizes(key)
    pages = sizes(page_min)[2]
    summary = summary or summarize_mask(attn_mask, b, length, query.device)
    scores = _aligned_rows(b, h, length=pages, dtype=torch.float32, device=query.device)
    # The top-k's rows are pages (the current token's page forced), bounded in the kernels; with the
    # grouped plan the scores' launch also writes its group keys.
    plan = plan_topk(b * h, pages, budget // page_size, query.device)
    group_keys = topk_group_keys(b * h, pages, plan, query.device) if plan.grouped else None
    mask, (stride_mb, stride_mn), mask_kind, mask_min = _mask_args(attn_mask, b, length, scores)
    q = query.contiguous()
    block_p = QUEST_BLOCK_P if group_keys is None else max(QUEST_BLOCK_P, plan.group)  # whole groups per block
    kernel = codegen.load("quest_scores.py.jinja").quest_scores
    wrap_triton(kernel)[(b * hkv, triton.cdiv(pages, block_p))](
        Q=q, K=key, PageMin=page_min, PageMax=page_max, Filled=filled, Mask=mask, KvLen=summary.kv_len,
        SinkEnd=summary.sink_end, RecentStart=summary.recent_start, Scores=scores,
        GroupKeys=scores if group_keys is None else group_keys, stride_qb=q.stride(0), stride_qh=q.stride(1),
        stride_kb=key.stride(0), stride_kh=key.stride(1), stride_kn=key.stride(2),
        stride_pb=page_min.stride(0), stride_ph=page_min.stride(1), stride_pp=page_min.stride(2), stride_mb=stride_mb,
        stride_mn=stride_mn, stride_sb=scores.stride(0), stride_sh=scores.stride(1),
        stride_gr=0 if group_keys is None else group_keys.stride(0), length=length, pages=pages, NUM_KV_HEADS=hkv,
        GROUP=h // hkv, PAGE=page_size, HEAD_DIM=d, BLOCK_D=_dot_tile(d), BLOCK_P=block_p,
        MASK_KIND=mask_kind, MASK_MIN=mask_min, TOPK_GROUP=0 if group_keys is None else plan.group,
        GROUP_PAD=_dot_tile(h // hkv), DOT_PRECISION=_dot_precision(query.dtype), num_warps=QUEST_WARPS)
    filled.copy_(summary.kv_len)
    chosen = select_topk(scores[..., :pages], None, summary, budget // page_size, h,
                         rank_by_prob=False, plan=plan, page_size=page_size, group_keys=group_keys)
    return sparse_decode(query, key, value, chosen, scale, attn_mask, page_size)


TOPK_BLOCK = 1024
TOPK_CHUNK = 4096  # the longest chunk of a row one top-k program takes
TOPK_PROGRAMS_PER_SM = 8  # chunks shrink (to TOPK_BLOCK) until rows x chunks reaches this per SM
TOPK_MAX_GROUP = 128
SELECT_BLOCK = 1024  # candidate keys per step of radix_select (benchmarks/tune_topk.py on an H200) ...
SELECT_BLOCK_MIN = 128  # ... but no more than CANDIDATES_PER_BUDGET x budget (at least this)
CANDIDATES_PER_BUDGET = 4
GATHER_BLOCK_FEW_ROWS = 4096  # with at most half as many rows as SMs: gathers this long ...
GATHER_BLOCK_LARGE = 2048  # ... else this long from a budget of LARGE_BUDGET on (more candidates), else SELECT_BLOCK
LARGE_BUDGET = 1024
GROUP_BLOCK_MAX = 4096  # radix_select's first selection holds up to this many group keys in registers ...
GROUP_BLOCK_MAX_MANY_ROWS = 2048  # ... this many when the rows fill the GPU (4096: B8 32K k=2048 193 us, not 121)
GROUP_TAIL_MIN = 256  # group keys a selection holds past its first step: at least this many (TopkPlan.group_tail)
SELECT_WARPS = 8
SELECT_WARPS_LONG_ROWS = 16  # few rows with long gathers: one program's chain of phases decides the time
GATHER_SPLIT_MIN = 8192  # with few rows a candidate gather of this many positions or more is its own launch ...
GATHER_SHARE = 1024  # ... about this many positions a program ...
GATHER_PROGRAMS_PER_SM = 2  # ... and at most this many of its programs per SM ...
GATHER_PROGRAMS_MAX = 8  # ... and per row
RADIX_BITS = 8  # bits per digit of 32-bit keys (radix_keys.py.jinja): the chunked plan's, the grouped one's default ...
RADIX_BITS_FEW_ROWS = 4  # ... and with at most half as many rows as SMs, the grouped plan's
GROUP_SLACK_PER_BUDGET = 16  # with many rows and a budget of LARGE_BUDGET on, the top groups up to budget / this over
RADIX_LEVELS = 32 // RADIX_BITS


def topk_chunk(rows: int, length: int, device: torch.device) -> int:
    """Positions per top-k program over a row: a power of two in [TOPK_BLOCK, TOPK_CHUNK] giving
    about TOPK_PROGRAMS_PER_SM programs per SM (benchmarks/tune_topk.py on an H100: the passes
    over the logits are latency-bound, so few long rows want short chunks)."""
    wanted = triton.cdiv(rows * length, TOPK_PROGRAMS_PER_SM * _sm_count(device))
    return max(TOPK_BLOCK, min(TOPK_CHUNK, triton.next_power_of_2(wanted)))


def topk_group(length: int, budget: int) -> int:
    """Positions per group of the grouped top-k: radix_select makes RADIX_LEVELS histogram passes
    over length / group group keys, then one gather pass over budget x group positions; a power
    of two near sqrt(RADIX_LEVELS x length / budget) balances them."""
    balanced = (RADIX_LEVELS * length / max(budget, 1)) ** 0.5
    return max(1, min(TOPK_MAX_GROUP, 1 << round(math.log2(max(balanced, 1.0)))))


def topk_split_group(length: int, budget: int, group: int) -> int:
    """The group of a plan whose candidate gather is its own launch (`topk_gather_programs` > 1):
    the gather no longer weighs on one program, so the group grows from `topk_group`'s until the
    row's group keys fit one step of radix_select_groups (GROUP_BLOCK_MAX), but to at most
    length / (2 x budget): past it the top groups hold most of the row and every position is a
    candidate. On an H200 at B1 128K k=2048 (docs/results/tune-topk-h200-2026-12-02-split-sweep-
    k2048-b419b79.log): group 16 93.1 us, 32 71.6, 64 1017 (the top 2048 of 2048 groups: the row)."""
    fit = triton.next_power_of_2(triton.cdiv(length, GROUP_BLOCK_MAX))
    most = 1 << (max(length // (2 * budget), 1).bit_length() - 1)
    return max(1, min(max(group, fit), most, TOPK_MAX_GROUP))


def topk_grouped_is_faster(rows: int, length: int, budget: int, device: torch.device) -> bool:
    """Whether the grouped top-k (one program per row: time grows with sqrt(length x budget)
    per wave of rows) beats the chunked one (the whole GPU on every pass: time grows with rows x
    length), by a cost model in microseconds fitted to benchmarks/tune_topk.py on an H200
    (docs/results/tune-topk-h200-2026-11-30-candidate-threshold.log): at all sixteen measured
    shapes its pick is within 9% of the faster plan."""
    grouped = 18 + 0.0065 * (length * budget) ** 0.5 * max(1.0, rows / _sm_count(device))
    chunked = 35 + 30 * rows * length / 2 ** 20
    return grouped < chunked


def topk_select_steps(rows: int, length: int, budget: int, group: int, device: torch.device,
                      block: int = TOPK_BLOCK, gather_programs: Optional[int] = None) -> dict[str, int | bool]:
    """radix_select's steps, warps and digits (TopkPlan's group_block, select_block, gather_block,
    select_warps, gather_programs (`topk_gather_programs` by default), digit_bits, hold_tail,
    early_exit, group_slack) for a group-max step of `block` (TOPK_BLOCK; smaller blocks scale the constants down).
    - Group keys: in one step where they fit (GROUP_BLOCK_MAX, fewer when the rows fill the GPU)
      and fill three quarters of it: loaded once for the four digit passes; a short row (Quest's
      pages) takes a short step. A histogram costs its whole step, so a row just past a power
      of two (2049 groups: a cache 16 tokens past 128K) takes steps of SELECT_BLOCK, as before
      (decode step, H200: 56 us a selection; one step of 4096: 65; two of 2048: 67.5); but with
      the gather split over programs radix_select_groups holds them in one step (128K + 16, k =
      256: 45.2 us in the sweep, 46.9 in `tune_topk.py --quick`, against 47.0: about even).
      A row a few keys past the step holds them too (`TopkPlan.group_tail`): 4097 groups at 128K
      + 16 with k=2048 streamed two whole steps a pass, radix_select_groups 36.8 us against 15.8
      at 128K; held, 23.8 (the top-k 89.9 -> 71.2 us; docs/results/tune-topk-h200-2026-12-03-*).
      Where those few past a power of two are no more than the least tail and a gather program's
      share of the top groups, and groups are longer than one position, the step is that power
      and the tail's groups are taken whole, unranked (`topk_taken_tail`): at 128K + 16
      radix_select_groups in a selection layer 19.3 -> 12.0 us (k = 256, its step 4096 -> 2048)
      and 26.0 -> 16.0 (k = 2048), as at 128K (docs/results/tune-topk-h200-2026-12-03-taken-tail-
      9b13b7f.log).
    - Candidates (a few per budget slot): steps of SELECT_BLOCK, at most CANDIDATES_PER_BUDGET x
      budget; with few rows the selections hold a step and a tail in registers and stream the
      rest (`TopkPlan.hold_tail`). Longer steps lose now that a step is held (`tune_topk.py
      --select-block`, docs/results/tune-topk-h200-2026-12-03-hold-tail-dcdf4a9.log: B1 128K
      k=2048 70.6 us in steps of 1024, 73.1 of 2048; B8 32K k=2048 110.4 against 114.9), and
      holding loses with many rows (B8 32K query_head k=256 51.6 -> 70.6 us) but wins with few
      (B1 128K k=2048 69.8 -> 65.8: radix_select_candidates 26.9 -> 22.4 in a selection layer;
      B8 32K kv_head k=2048, 64 rows, 87.7 -> 82.7).
    - Candidate gather: with at most half as many rows as SMs each program's chain of passes
      decides and long steps pay (5-7 us at 128K, k = 256); else GATHER_BLOCK_LARGE from a
      budget of LARGE_BUDGET; at most the length of a gather program's share of the chosen
      groups.
    - Radix digits: RADIX_BITS_FEW_ROWS with at most half as many rows as SMs (each row's chain of
      histograms decides: eight of 16 bins beat four of 256; B1 128K k=256 37.9 -> 35.2 us, k=2048
      73.0 -> 68.6, B8 32K kv_head 61.6 -> 57.0), else RADIX_BITS (B8 32K query_head k=2048, 256
      rows: 120.5 us, 212.2 with 4-bit digits; docs/results/tune-topk-h200-2026-12-02-digit-bits-55b92fc.log).
    - Warps: SELECT_WARPS_LONG_ROWS with at most half as many rows as SMs and a gather of at
      least GATHER_BLOCK_FEW_ROWS positions (in a selection layer at B1 128K: k = 256 62.3 -> 56.8
      us, k = 2048 140.7 -> 123.2 us with steps of 2048 candidates; docs/results/
      topk-warps-h200-2026-12-01.log), else SELECT_WARPS (Quest's page rows at B1 128K, 1024-
      position gathers: 12.9 us a launch with 8 warps, 17.6 with 16).
    - Early exit (`TopkPlan.early_exit`): always; the same keys in fewer passes (B1 128K k=256,
      selection layer: top-k 42.7 -> 39.6 us; never slower beyond noise). The top groups' slack
      (budget / GROUP_SLACK_PER_BUDGET) with many rows and a budget of LARGE_BUDGET on: B8 32K
      query_head k=2048 109.2 -> 97.8 us in the layer (radix_select 91.0 -> 79.1); elsewhere the
      slack's groups can cost a gather step more than the passes it saves (B1 128K k=256 with 8
      gather programs: 39.6 -> 40.9; docs/results/tune-topk-h200-2026-12-03-early-exit-*.log).
    Fitted to benchmarks/tune_topk.py on an H200 (docs/results/tune-topk-h200-2026-11-30-*.log,
    the split plans: tune-topk-h200-2026-12-02-split-sweep-*-b419b79.log)."""
    def scaled(step: int) -> int:
        return max(1, step * block // TOPK_BLOCK)

    few_rows = rows <= _sm_count(device) // 2
    programs = gather_programs or topk_gather_programs(rows, budget, group, device)
    slack = budget // GROUP_SLACK_PER_BUDGET if group > 1 and not few_rows and budget >= LARGE_BUDGET else 0
    select = min(scaled(SELECT_BLOCK),
                 max(scaled(SELECT_BLOCK_MIN), triton.next_power_of_2(CANDIDATES_PER_BUDGET * budget)))
    if few_rows:
        gather = scaled(GATHER_BLOCK_FEW_ROWS)
    elif budget >= LARGE_BUDGET:
        gather = scaled(GATHER_BLOCK_LARGE)
    else:
        gather = select
    groups = triton.cdiv(length, group)
    group_block = triton.next_power_of_2(groups)
    if topk_taken_tail(groups, group_block // 2, group, triton.cdiv(budget + slack, programs), scaled(GROUP_TAIL_MIN)):
        group_block //= 2  # a few group keys past a power of two: its tail's groups are taken whole
    elif 4 * groups <= 3 * group_block and programs == 1:  # a quarter empty or more: steps of at most SELECT_BLOCK
        group_block = min(group_block, scaled(SELECT_BLOCK))
    group_block = min(group_block, scaled(GROUP_BLOCK_MAX if few_rows else GROUP_BLOCK_MAX_MANY_ROWS))
    gather = min(gather, triton.next_power_of_2(triton.cdiv(budget, programs) * group))
    long_rows = few_rows and gather >= scaled(GATHER_BLOCK_FEW_ROWS)
    return {"group_block": group_block, "select_block": select, "gather_block": gather,
            "select_warps": SELECT_WARPS_LONG_ROWS if long_rows else SELECT_WARPS, "gather_programs": programs,
            "digit_bits": RADIX_BITS_FEW_ROWS if few_rows else RADIX_BITS, "hold_tail": few_rows,
            "early_exit": True, "group_slack": slack}


def topk_gather_programs(rows: int, budget: int, group: int, device: torch.device) -> int:
    """Programs per row of the grouped top-k's candidate gather (TopkPlan's gather_programs): 1
    keeps it inside radix_select; more split it over its own launch, each program a share of the
    budget x group positions (about GATHER_SHARE), at most GATHER_PROGRAMS_PER_SM per SM in all
    and GATHER_PROGRAMS_MAX per row: a power of two; gathers shorter than GATHER_SPLIT_MIN, and
    those of more rows than half the SMs (the rows alone fill the GPU), stay.
    One program per row gathers about 1.2 us per 1024 positions; on an H200 (docs/results/
    tune-topk-h200-2026-12-02-gather-programs-9301974.log) B1 128K k=256 (16384 positions): 45.2
    us in radix_select, 37.5 on 8 programs; k=2048 (32768): 110.2 -> 96.7; B8 32K kv_head k=256
    (64 rows, 4096 positions): 63.2 in radix_select, 65.4-67.2 split."""
    if group == 1 or budget * group < GATHER_SPLIT_MIN or rows > _sm_count(device) // 2:
        return 1
    wanted = min(GATHER_PROGRAMS_MAX, budget * group // GATHER_SHARE,
                 GATHER_PROGRAMS_PER_SM * _sm_count(device) // max(rows, 1))
    return 1 << (max(wanted, 1).bit_length() - 1)


@dataclass(frozen=True)
class TopkPlan:
    """How one `select_topk` runs. Grouped (radix_topk.py.jinja): radix_group_max over chunks of
    `chunk` positions per row in steps of `block`, then one radix_select program per row
    (`select_warps` warps; group keys in steps of `group_block`, a row of at most group_block +
    `group_tail(length)` of them held in registers, candidates in steps of `select_block`, the
    candidate gather in steps of `gather_block` positions) over groups of `group` positions;
    with `gather_programs` > 1 the gather is its own launch on that many programs per row,
    between radix_select_groups and radix_select_candidates. Its selections find each threshold
    `digit_bits` bits at a time (32 / digit_bits histograms of 2 ** digit_bits bins); with
    `hold_tail`, rows longer than their step and tail (group keys; candidates: two steps) hold
    those in registers too and stream the rest (`topk_select_steps` turns it on for few rows).
    With `early_exit` a selection stops at the first radix digit whose bin, taken whole, leaves
    nothing over (the same keys, fewer passes) or, for the top groups, at most `group_slack`
    groups over (more groups gathered, T0 a little lower: fewer passes again).
    Chunked (radix_topk_chunked.py.jinja): every pass on (rows, chunks of `chunk`) programs."""

    grouped: bool
    chunk: int
    group: int = 1
    block: int = TOPK_BLOCK
    group_block: int = SELECT_BLOCK
    select_block: int = SELECT_BLOCK
    select_warps: int = SELECT_WARPS
    gather_block: int = SELECT_BLOCK
    gather_programs: int = 1
    digit_bits: int = RADIX_BITS
    group_tail_min: int = GROUP_TAIL_MIN
    hold_tail: bool = False
    early_exit: bool = False
    group_slack: int = 0

    def __post_init__(self) -> None:
        if self.digit_bits not in (4, 8):
            raise ValueError(f"TopkPlan.digit_bits must be 4 or 8, not {self.digit_bits}")
        if self.group_slack < 0 or (self.group_slack and not self.early_exit):
            raise ValueError(f"TopkPlan.group_slack must be >= 0, and 0 without early_exit, not {self.group_slack}")

    def chunks(self, length: int) -> int:
        return triton.cdiv(length, self.chunk)

    def group_tail(self, length: int) -> int:
        """Group keys a selection holds in registers past its first `group_block`: as many as a
        row of `length` positions has beyond them (a cache a few tokens past a power of two: one
        short step, not a second group_block), at least `group_tail_min` (scaled with the block);
        group_block where that is more than half a step: then, without `hold_tail`, nothing is held
        and the row streams in whole steps (a second whole step held: B8 32K k=2048 180 us against
        116 streamed); with `hold_tail` (few rows) two whole steps are held and the rest streamed."""
        past = triton.cdiv(length, self.group) - self.group_block
        return min(self.group_block, max(self.least_tail, triton.next_power_of_2(max(past, 1))))

    @property
    def least_tail(self) -> int:
        """`group_tail_min`, scaled with the block."""
        return max(1, self.group_tail_min * self.block // TOPK_BLOCK)

    @property
    def gather_parts(self) -> int:
        """The candidate gather's programs per row (1 where groups are positions: no gather)."""
        return self.gather_programs if self.group > 1 else 1

    def scratch_groups(self, length: int, budget: int) -> int:
        """Groups a row's scratch must hold: the gather parts' shares of the most groups the first
        selection takes (the budget, and `group_slack` more with `early_exit`), then a taken tail."""
        parts = self.gather_parts
        return parts * triton.cdiv(budget + self.group_slack, parts) + self.taken_tail(length, budget)

    def taken_tail(self, length: int, budget: int) -> int:
        """`topk_taken_tail` of this plan's rows of up to `length` positions."""
        return topk_taken_tail(triton.cdiv(length, self.group), self.group_block, self.group,
                               triton.cdiv(budget + self.group_slack, self.gather_programs), self.least_tail)


def topk_taken_tail(groups: int, group_block: int, group: int, share: int, least: int) -> int:
    """Group keys past the first `group_block` (of `groups`) whose groups a selection takes whole,
    unranked (radix_topk.py.jinja): the power of two at or above those past it where that is at
    most `least` (the least tail: a row a few keys past a step longer than it) and a gather
    program's `share` of the top groups (the last gather program, which appends the tail's
    candidates, does at most twice the others' work), else 0: the tail is ranked."""
    past = groups - group_block
    tail = triton.next_power_of_2(max(past, 1))
    return tail if group > 1 and past > 0 and tail <= min(least, share) and least < group_block else 0


def plan_topk(rows: int, length: int, budget: int, device: torch.device, grouped: Optional[bool] = None,
              chunk: Optional[int] = None, block: int = TOPK_BLOCK, group: Optional[int] = None,
              gather_programs: Optional[int] = None, **select: int) -> TopkPlan:
    """The launch plan of `select_topk` (defaults: `topk_grouped_is_faster`, `topk_chunk`,
    TOPK_BLOCK, `topk_group` (at most the block; `topk_split_group`'s where the gather is split),
    `topk_select_steps` for the gather programs and the steps they imply; `early_exit=False`
    drops their top-group slack)."""
    if grouped is None:
        grouped = topk_grouped_is_faster(rows, length, budget, device)
    if group is None:
        group = topk_group(length, budget)
        if (gather_programs or topk_gather_programs(rows, budget, min(group, block), device)) > 1:
            group = topk_split_group(length, budget, group)
    group = min(group, block)
    steps = topk_select_steps(rows, length, budget, group, device, block, gather_programs)
    if not select.get("early_exit", True):
        steps["group_slack"] = 0  # a slack needs the early exit
    select = {**steps, **select}
    return TopkPlan(grouped=grouped, chunk=chunk or topk_chunk(rows, length, device), group=group, block=block,
                    **select)


def topk_group_keys(rows: int, length: int, plan: TopkPlan, device: torch.device) -> Tensor:
    """The grouped plan's group keys (int64 [rows, groups padded], `_aligned_rows`): radix_group_max
    writes them, or a caller that has the ranks in hand (Quest's page scores) before `select_topk`."""
    return _aligned_rows(rows, length=triton.cdiv(length, plan.group), dtype=torch.int64, device=device)


def select_topk(logits: Tensor, lse: Optional[Tensor], summary: MaskSummary, budget: int, sets: int,
                rank_by_prob: bool, plan: Optional[TopkPlan] = None, page_size: int = 1,
                group_keys: Optional[Tensor] = None) -> Tensor:
    """The top-`budget` positions per index set from flash_decode's logits (int32 [B, S, k],
    ascending, -1 past the valid positions), by a radix select (no sort); `plan` defaults to
    `plan_topk`.

    A set ranks by its head's logit (query_head) or, with `rank_by_prob`, by the sum over its
    H / S heads of softmax probabilities (kv_head, layer). With `page_size` > 1 the entries are
    Quest pages of that many positions (`summary` still in positions): the pages covering the
    valid length, the last one (the current token's) forced, none by probability. `group_keys`:
    the grouped plan's first pass, already written (`topk_group_keys`; ranks by logit only).
    `lse` is read with `rank_by_prob` only (None otherwise: no buffer for Inductor to copy)."""
    if rank_by_prob and lse is None:
        raise ValueError("select_topk ranks by probability from the logits' log-sum-exps: lse is required")
    if page_size > 1 and rank_by_prob:
        raise ValueError("select_topk ranks pages by their own scores only (rank_by_prob=False)")
    b, h, length = sizes(logits)
    plan = plan or plan_topk(b * sets, length, budget, logits.device)
    if group_keys is not None and (rank_by_prob or not plan.grouped):
        raise ValueError("group_keys are the grouped plan's, ranked by logit (rank_by_prob=False)")
    heads_per_set = h // sets
    sets_args = dict(NUM_SETS=sets, NUM_HEADS=h, HEADS_PER_SET=heads_per_set,
                     HEADS_PAD=triton.next_power_of_2(heads_per_set))
    # Blocks of ranks by probability load every head of the set: fewer positions per block.
    prob_block = plan.block // triton.next_power_of_2(heads_per_set)
    out = torch.empty(b, sets, budget, dtype=torch.int32, device=logits.device)
    if plan.grouped:  # a block covers whole groups
        block = max(plan.group, prob_block) if rank_by_prob else plan.block
        _select_grouped(logits, lse, summary, budget, rank_by_prob, plan, sets_args, block, page_size, out, group_keys)
    else:
        _select_chunked(logits, lse, summary, budget, rank_by_prob, plan, sets_args, max(16, prob_block), page_size,
                        out)
    return out


def _select_grouped(logits: Tensor, lse: Optional[Tensor], summary: MaskSummary, budget: int, rank_by_prob: bool,
                    plan: TopkPlan, sets_args: dict[str, int], block: int, page_size: int, out: Tensor,
                    group_keys: Optional[Tensor]) -> None:
    """Two launches (radix_topk.py.jinja), one when `group_keys` are given: the largest key of
    each group of positions, then per row the top groups and the top positions among them (three
    launches with `plan.gather_programs` > 1: the top groups, the gather, the top positions)."""
    rows, length, device = out.shape[0] * out.shape[1], sizes(logits)[2], logits.device
    module = codegen.load("radix_topk.py.jinja")
    written = group_keys is not None
    group_max = group_keys if written else topk_group_keys(rows, length, plan, device)
    rank = (torch.empty(rows, group_max.stride(0) * plan.group, dtype=torch.float32, device=device) if rank_by_prob
            else None)  # unread: Inductor counts the top-k's pointers as written, a shared one is copied
    row_args = dict(Logits=logits, Lse=lse, KvLen=summary.kv_len, SinkEnd=summary.sink_end,
                    RecentStart=summary.recent_start, Rank=rank,
                    stride_xb=logits.stride(0), stride_xh=logits.stride(1), stride_gr=group_max.stride(0))
    constants = dict(**sets_args, BY_PROB=rank_by_prob, GROUP=plan.group, PAGE=page_size)
    if not written:
        wrap_triton(module.radix_group_max)[(rows, plan.chunks(length))](
            **row_args, GroupMax=group_max, **constants, BLOCK=block, CHUNK=plan.chunk)
    taken_tail = plan.taken_tail(length, budget)
    parts = plan.gather_parts
    capacity = scratch_row_stride(plan.scratch_groups(length, budget))
    groups = torch.empty(rows, capacity, dtype=torch.int32, device=device)
    slots = capacity * plan.group if plan.group > 1 else 1
    cand_keys = torch.empty(rows, slots, dtype=torch.int64, device=device)
    cand_pos = torch.empty(rows, slots, dtype=torch.int32, device=device)
    budget_args = dict(budget=budget, group_slack=plan.group_slack, capacity=capacity)
    out_args = dict(Out=out, stride_ob=out.stride(0), stride_os=out.stride(1), **budget_args)
    selection = dict(DIGIT_BITS=plan.digit_bits, HOLD_TAIL=plan.hold_tail, EARLY_EXIT=plan.early_exit,
                     num_warps=plan.select_warps)
    group_steps = dict(GROUP_BLOCK=plan.group_block, GROUP_TAIL=plan.group_tail(length), TAKEN_TAIL=taken_tail)
    if parts == 1:
        wrap_triton(module.radix_select)[(rows,)](
            **row_args, GroupMax=group_max, Groups=groups, CandKeys=cand_keys, CandPos=cand_pos, **out_args,
            **constants, **group_steps, BLOCK=plan.select_block, GATHER_BLOCK=plan.gather_block, **selection)
        return
    chosen = torch.empty(rows, 2, dtype=torch.int32, device=device)  # top groups, tail groups
    threshold = torch.empty(rows, dtype=torch.int64, device=device)
    counts = torch.empty(rows, parts, dtype=torch.int32, device=device)
    wrap_triton(module.radix_select_groups)[(rows,)](
        KvLen=summary.kv_len, SinkEnd=summary.sink_end, RecentStart=summary.recent_start, GroupMax=group_max,
        Groups=groups, Chosen=chosen, Threshold=threshold, stride_gr=group_max.stride(0), **budget_args,
        NUM_SETS=constants["NUM_SETS"], GROUP=plan.group, **group_steps, PAGE=page_size, **selection)
    wrap_triton(module.radix_gather)[(rows, parts)](
        **row_args, Groups=groups, Chosen=chosen, Threshold=threshold, CandKeys=cand_keys, CandPos=cand_pos,
        CandCount=counts, **budget_args, **constants, GATHER_BLOCK=plan.gather_block, PARTS=parts,
        TAKEN_TAIL=taken_tail)
    wrap_triton(module.radix_select_candidates)[(rows,)](
        CandKeys=cand_keys, CandPos=cand_pos, CandCount=counts, PackedKeys=torch.empty_like(cand_keys),
        PackedPos=torch.empty_like(cand_pos), **out_args, NUM_SETS=constants["NUM_SETS"], GROUP=plan.group,
        BLOCK=plan.select_block, PARTS=parts, PARTS_PAD=triton.next_power_of_2(parts), **selection)


def _select_chunked(logits: Tensor, lse: Optional[Tensor], summary: MaskSummary, budget: int, rank_by_prob: bool,
                    plan: TopkPlan, sets_args: dict[str, int], prob_block: int, page_size: int, out: Tensor
                    ) -> None:
    """Seven launches or fewer (radix_topk_chunked.py.jinja), each on (rows, chunks) programs:
    ranks by probability (in steps of `prob_block`), four digit histograms, the per-chunk counts,
    the emit."""
    b, sets, _ = sizes(out)
    rows, length, device = b * sets, logits.shape[2], logits.device
    chunks = plan.chunks(length)
    module = codegen.load("radix_topk_chunked.py.jinja")
    rank = logits
    if rank_by_prob:
        rank = _aligned_rows(b, sets, length=length, dtype=torch.float32, device=device)
        wrap_triton(module.rank_by_prob)[(rows, chunks)](
            Logits=logits, Lse=lse, KvLen=summary.kv_len, Rank=rank, stride_xb=logits.stride(0),
            stride_xh=logits.stride(1), stride_rb=rank.stride(0), stride_rs=rank.stride(1),
            **sets_args, BLOCK=prob_block, CHUNK=plan.chunk)
    hist = torch.zeros(rows, RADIX_LEVELS, 256, dtype=torch.int32, device=device)
    chunks_pad = triton.next_power_of_2(chunks)
    counts = torch.empty(rows, chunks_pad, 2, dtype=torch.int32, device=device)
    row_args = dict(Rank=rank, Hist=hist, KvLen=summary.kv_len, SinkEnd=summary.sink_end,
                    RecentStart=summary.recent_start, stride_rb=rank.stride(0), stride_rs=rank.stride(1),
                    budget=budget, NUM_SETS=sets, BLOCK=plan.block, CHUNK=plan.chunk, PAGE=page_size)
    for level in range(RADIX_LEVELS):
        wrap_triton(module.radix_histogram)[(rows, chunks)](**row_args, LEVEL=level)
    wrap_triton(module.radix_count)[(rows, chunks)](**row_args, Counts=counts, CHUNKS_PAD=chunks_pad)
    wrap_triton(module.radix_emit)[(rows, chunks)](
        **row_args, Counts=counts, Out=out, stride_ob=out.stride(0), stride_os=out.stride(1), CHUNKS_PAD=chunks_pad)


"""Calibrate tidal to a model: choose dense and selection layers, granularity and windows from
the model's own attention.

    config = tidal_compile.calibrate(model, calibration_ids, budget=128)
    python -m tidal_compile.calibrate MODEL_PATH --budget 128 --out model.yaml

Measure (`measure_coverage`): the model decodes calibration prompts densely (prefill, then
teacher-forced decode steps), its attention routed through a probe. At every decode step and
layer `l`, the probe takes the layer's exact attention probabilities and, for every candidate
selection layer `s <= l` and every variant (granularity, sink / recent windows), the mass of
`l`'s attention that falls on the `budget` positions `s` would select. The coverage `C[s, l]`
is that mass relative to the mass of `l`'s own per-head top-`budget` (what topk_oracle attends
to): the share of what any `budget` positions could cover that `s`'s choice covers, averaged
over the worst 10% of decode steps. A layer with broad attention (no `budget` positions hold
much of it) is judged by what can be covered, and a selection layer must serve the steps where
a later layer attends sharply (retrieval), not only the average step.
The trajectory is dense, so the table describes the model, not one plan.

Choose (`choose_plan`): every layer is dense (a full read), selection (a full read whose top-k the
following sparse layers reuse) or sparse (reads `budget` rows, covers `C[source, l]` of its mass).
A dynamic program over the layers finds, for each number of full reads, the plan whose worst
sparse layer covers the most (the mean breaks ties); the cheapest plan (bytes read per decode
step) whose worst layer reaches `threshold` wins, else the one with the best worst layer.
Deterministic for a given model and data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from tidal_compile import hf_compat
from tidal_compile.config import GRANULARITIES, TidalConfig
from tidal_compile.ops import reference

WINDOWS = ((0, 0), (0, 8), (4, 8))
"""(sink, recent) pairs tried, where the budget holds them."""


@dataclass(frozen=True)
class Variant:
    """How a selection layer picks: granularity and always-kept windows."""

    granularity: str
    sink: int
    recent: int

    def __str__(self) -> str:
        return f"{self.granularity}, sink={self.sink}, recent={self.recent}"


@dataclass
class Coverage:
    """Coverage per variant: `table[variant][s, l]` is the attention mass of layer l on the
    positions selection layer s picks, relative to the mass on l's own per-head top-k without
    windows, the most any `budget` positions hold (s <= l; NaN below the diagonal). `oracle[l]`
    is the mean mass l's own top-k holds."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    budget: int
    context: int
    steps: int
    table: dict[Variant, Tensor] = field(default_factory=dict)
    oracle: Optional[Tensor] = None


def variants(budget: int, num_heads: int, num_kv_heads: int) -> list[Variant]:
    """The variants worth measuring (kv_head is query_head for MHA models)."""
    grains = [g for g in GRANULARITIES if not (g == "kv_head" and num_heads == num_kv_heads)]
    return [Variant(g, sink, recent) for g in grains for sink, recent in WINDOWS if sink + max(recent, 1) <= budget]


TAIL = 0.1
"""Coverage is the mean over the worst `TAIL` share of decode steps: a selection layer must
serve the steps where a later layer attends sharply (retrieval), not only the average step."""


class CoverageProbe:
    """Attention for `transformers.AttentionInterface`: exact (dense) attention that records, at
    decode steps, the coverage of every (selection layer, later layer) pair for every variant."""

    def __init__(self, num_layers: int, budget: int, chosen_variants: list[Variant]):
        self.num_layers, self.budget, self.variants = num_layers, budget, chosen_variants
        self.mass: dict[Variant, list[Tensor]] = {v: [] for v in chosen_variants}
        """Per decode step, [source, layer]: layer's attention mass on source's selection."""
        self.chosen: dict[tuple[Variant, int], Tensor] = {}

    def attention(self, module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                  dropout: float = 0.0, scaling: Optional[float] = None, **kwargs: Any) -> tuple[Tensor, None]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.shape[2] != 1:  # prefill: nothing to measure
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        layer = module.layer_idx
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = attention_mask[:, :, -1:, :] if attention_mask is not None else None
        logits, valid = reference.attention_logits(query, key, mask, scale)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        for v in self.variants:
            if layer == 0:  # a new decode step
                self.mass[v].append(torch.full((self.num_layers, self.num_layers), float("nan"), dtype=torch.float64))
            rank, rank_valid = reference.selection_ranking(logits, valid, key.shape[1], v.granularity)
            self.chosen[v, layer] = reference.top_positions(rank, rank_valid, self.budget, v.sink, v.recent)
            for source in range(layer + 1):
                picked = reference.indices_per_query_head(self.chosen[v, source], query.shape[1]).long()
                mass = torch.gather(probs, 2, picked.clamp(min=0)).masked_fill(picked < 0, 0.0).sum(-1)
                self.mass[v][-1][source, layer] = float(mass.double().mean())
        out = reference.dense_attention(query, key, value, mask, scale)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    def _own(self) -> Tensor:
        """[steps, layers]: each layer's mass on its own per-head top-k, no windows (the most any
        `budget` positions hold)."""
        return torch.stack(self.mass[self.variants[0]]).diagonal(dim1=1, dim2=2)

    def coverage(self) -> dict[Variant, Tensor]:
        """Per variant, [source, layer]: the mean over the worst TAIL of steps of the mass on the
        source's selection relative to the layer's own top-k (see `Coverage`)."""
        own = self._own().clamp(min=1e-12)
        table = {}
        for v, steps in self.mass.items():
            ratios = (torch.stack(steps) / own[:, None, :]).clamp(max=1.0)  # [steps, source, layer]
            worst = ratios.sort(dim=0).values[: max(1, math.ceil(TAIL * ratios.shape[0]))]
            table[v] = worst.mean(0)  # NaN below the diagonal stays NaN
        return table

    def oracle(self) -> Tensor:
        """Mean mass of each layer's own top-k."""
        return self._own().mean(0)


@torch.no_grad()
def measure_coverage(model: torch.nn.Module, prompts: Sequence[Tensor], continuations: Sequence[Tensor], budget: int,
                     progress: Optional[Any] = None) -> Coverage:
    """Run each prompt ([1, L] ids) densely, then feed its continuation ([1, T] ids) one token at
    a time, recording coverage at every decode step. `progress(done, total)` is called per step."""
    from transformers import StaticCache

    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    probe = CoverageProbe(layers, budget, variants(budget, heads, kv_heads))
    device = next(model.parameters()).device
    cache_name = hf_compat.forward_cache_name(model.forward)
    total, done = sum(c.shape[1] for c in continuations), 0
    with hf_compat.attention_routed_through(model, "tidal_calibration_probe", probe.attention):
        for prompt, continuation in zip(prompts, continuations):
            prompt, continuation = prompt.to(device), continuation.to(device)
            cache = StaticCache(config=config, max_cache_len=prompt.shape[1] + continuation.shape[1])
            model(input_ids=prompt, use_cache=True, **{cache_name: cache})
            for step in range(continuation.shape[1]):
                position = torch.tensor([[prompt.shape[1] + step]], device=device)
                model(input_ids=continuation[:, step:step + 1], position_ids=position, use_cache=True,
                      **{cache_name: cache})
                done += 1
                if progress is not None:
                    progress(done, total)
    context = round(sum(p.shape[1] for p in prompts) / max(len(prompts), 1))
    return Coverage(layers, heads, kv_heads, budget, context, total, probe.coverage(), probe.oracle())


@dataclass(frozen=True)
class Plan:
    """A calibrated choice and what it is predicted to do."""

    variant: Variant
    dense_layers: tuple[int, ...]
    selection_layers: tuple[int, ...]
    source: dict[int, int]
    """Sparse layer -> the selection layer whose indices it reuses."""
    worst: float
    mean: float
    cost: float
    """Bytes of KV cache read per decode step, relative to full attention (at the calibration context)."""

    def config(self, budget: int) -> TidalConfig:
        v = self.variant
        return TidalConfig(mode="tidal", budget=budget, granularity=v.granularity, sink=v.sink, recent=v.recent,
                           dense_layers=self.dense_layers, selection_layers=self.selection_layers)


def read_cost(full_reads: int, sparse: int, coverage: Coverage, variant: Variant, context: int) -> float:
    """KV rows read per decode step relative to full attention: full reads read every row of each
    KV head; a sparse layer reads `budget` rows per index set (per query head for query_head)."""
    sets = coverage.num_heads if variant.granularity == "query_head" else coverage.num_kv_heads
    rows_per_sparse = min(coverage.budget, context) * sets
    full = coverage.num_layers * context * coverage.num_kv_heads
    return (full_reads * context * coverage.num_kv_heads + sparse * rows_per_sparse) / full


def best_plans(table: Tensor, max_dense: int, max_selection: int) -> dict[int, tuple[float, float, tuple]]:
    """For each count of full reads: (worst, mean, roles) of the best plan, roles a tuple of
    ("dense" | "selection" | source layer) per layer. Dynamic program over the layers with
    state (current source, dense used, selection used)."""
    layers = table.shape[0]
    # state -> (worst, coverage sum, sparse count, roles)
    states: dict[tuple, tuple[float, float, int, tuple]] = {(None, 0, 0): (math.inf, 0.0, 0, ())}
    for layer in range(layers):
        nxt: dict[tuple, tuple[float, float, int, tuple]] = {}

        def offer(key: tuple, value: tuple) -> None:
            old = nxt.get(key)
            if old is None or (value[0], value[1] / max(value[2], 1)) > (old[0], old[1] / max(old[2], 1)):
                nxt[key] = value

        for (source, dense, selection), (worst, total, count, roles) in states.items():
            if dense < max_dense:
                offer((source, dense + 1, selection), (worst, total, count, roles + ("dense",)))
            if selection < max_selection:
                offer((layer, dense, selection + 1), (worst, total, count, roles + ("selection",)))
            if source is not None:
                c = float(table[source, layer])
                offer((source, dense, selection), (min(worst, c), total + c, count + 1, roles + (source,)))
        states = nxt
    best: dict[int, tuple[float, float, tuple]] = {}
    for (_, dense, selection), (worst, total, count, roles) in states.items():
        reads = dense + selection
        candidate = (1.0 if count == 0 else worst, total / max(count, 1), roles)
        if reads not in best or candidate[:2] > best[reads][:2]:
            best[reads] = candidate
    return best


def choose_plan(coverage: Coverage, max_dense_layers: int = 2, max_selection_layers: int = 3,
                threshold: float = 0.9) -> Plan:
    """The cheapest plan whose worst sparse layer covers at least `threshold` of its attention
    mass; if none does, the plan with the best worst layer (then the cheaper)."""
    plans = []
    for variant, table in sorted(coverage.table.items(), key=lambda item: str(item[0])):
        for reads, (worst, mean, roles) in best_plans(table, max_dense_layers, max_selection_layers).items():
            sparse = sum(isinstance(r, int) for r in roles)
            if sparse == 0:
                continue  # all full reads: no sparse layer, nothing calibrated
            cost = read_cost(reads, sparse, coverage, variant, coverage.context)
            plans.append(Plan(variant, tuple(i for i, r in enumerate(roles) if r == "dense"),
                              tuple(i for i, r in enumerate(roles) if r == "selection"),
                              {i: r for i, r in enumerate(roles) if isinstance(r, int)}, worst, mean, cost))
    if not plans:
        raise ValueError("calibration: the model is too shallow for a sparse layer under these limits")
    good = [p for p in plans if p.worst >= threshold]
    if good:
        return min(good, key=lambda p: (p.cost, -p.worst, -p.mean))
    return max(plans, key=lambda p: (p.worst, p.mean, -p.cost))


def layer_table(plan: Plan, coverage: Coverage) -> list[str]:
    """One line per layer: its role, and why."""
    table = coverage.table[plan.variant]
    lines = []
    for layer in range(coverage.num_layers):
        own = float(coverage.oracle[layer]) if coverage.oracle is not None else float("nan")
        if layer in plan.dense_layers:
            why = "dense: a full read (no earlier selection layer covers it well enough, in the plan's limits)"
        elif layer in plan.selection_layers:
            users = [l for l, s in plan.source.items() if s == layer]
            if users:
                worst = min(float(table[layer, u]) for u in users)
                why = f"selection: covers {worst:.3f} (worst) of what layers {users} could cover"
            else:  # a full read all the same; the next layer selects again
                why = "selection: a full read whose indices no layer reuses (the next full read serves them better)"
        else:
            source = plan.source[layer]
            why = f"sparse: indices from layer {source} cover {float(table[source, layer]):.3f} of what it could cover"
        lines.append(f"layer {layer:3d}  {why}  (its own top-{coverage.budget} holds {own:.3f} of its mass)")
    return lines


def summary(plan: Plan, coverage: Coverage) -> str:
    """The choice, its predicted cost and the per-layer table, as printed and written to YAML."""
    at_32k = read_cost(len(plan.dense_layers) + len(plan.selection_layers), len(plan.source), coverage,
                       plan.variant, 32768)
    head = [f"calibrated: budget {coverage.budget}, {plan.variant}; dense {list(plan.dense_layers)}, "
            f"selection {list(plan.selection_layers)}",
            f"coverage of the sparse layers (share of what their own top-{coverage.budget} covers): worst "
            f"{plan.worst:.3f}, mean {plan.mean:.3f} ({coverage.steps} decode steps at ~{coverage.context} tokens)",
            f"predicted KV bytes read per decode step: {plan.cost:.1%} of full attention at {coverage.context} "
            f"tokens, {at_32k:.1%} at 32768"]
    return "\n".join(head + layer_table(plan, coverage))


def calibrate_model(model: torch.nn.Module, prompts: Sequence[Tensor], continuations: Sequence[Tensor], *,
                    budget: int, max_selection_layers: int = 3, max_dense_layers: int = 2, threshold: float = 0.9,
                    progress: Optional[Any] = None) -> tuple[TidalConfig, str]:
    """Measure, choose; returns the config and the printed summary."""
    if budget <= 0:
        raise ValueError(f"budget must be a positive integer, got {budget}")
    coverage = measure_coverage(model, prompts, continuations, budget, progress)
    plan = choose_plan(coverage, max_dense_layers, max_selection_layers, threshold)
    return plan.config(budget), summary(plan, coverage)


def split_for_decoding(ids: Iterable[Tensor], steps: int) -> tuple[list[Tensor], list[Tensor]]:
    """Each calibration sequence ([L] or [1, L] ids) as (prompt, the last `steps` tokens, fed
    one at a time)."""
    prompts, continuations = [], []
    for seq in ids:
        seq = seq.reshape(1, -1)
        if seq.shape[1] <= steps:
            raise ValueError(f"a calibration sequence of {seq.shape[1]} tokens leaves no prompt before {steps} "
                             "decode steps")
        prompts.append(seq[:, :-steps])
        continuations.append(seq[:, -steps:])
    return prompts, continuations


DEFAULT_SEQUENCES, DEFAULT_LENGTH = 4, 1024
CALIBRATION_SEED = 2**31 - 7  # far from the needle evaluation's seeds (eval/needle.py)
PASSKEY_FILLER = ("Rivers run down to the sea. Clouds drift over the hills. A train passes the old mill. "
                  "Birds rest on the wire. ")  # not the passkey evaluation's words (eval/passkey.py)
PASSKEY_STEPS = 8  # decode steps over the end of a passkey prompt: the question's end and the key


def default_calibration_ids(model: torch.nn.Module, tokenizer: Any = None, sequences: int = DEFAULT_SEQUENCES,
                            length: int = DEFAULT_LENGTH) -> tuple[list[Tensor], int]:
    """Built-in calibration data, never the evaluation prompts: for the project's retrieval
    vocabulary, training-style sequences of `eval.retrieval_data` (filler, needles, and queries
    answered at the end); with a tokenizer, plain-text passkey prompts (filler sentences, a
    passkey at a random depth, the question, the answer). Returns (sequences, decode steps: the
    answer tokens at the end of each, fed one at a time)."""
    from tidal_compile.eval import retrieval_data as data

    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    if model.config.vocab_size == data.VOCAB_SIZE:
        batch = data.training_batch(data.FillerLanguage(), sequences, data.slots_for_length(length), gen,
                                    torch.device("cpu"), max_needles=8)
        return list(batch.tokens), 2 * data.SLOT  # the last two query slots: `KEY k v1 .. v5 .`
    if tokenizer is None:
        raise ValueError("calibration: no built-in data for this model's vocabulary without its tokenizer; pass "
                         "calibration_ids (token ids of text like your prompts) or a tokenizer")
    unit = len(tokenizer(PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    repeats = max(1, (length - 64) // unit)
    ids = []
    for _ in range(sequences):
        key = int(torch.randint(10000, 99999, (1,), generator=gen))
        before = int(torch.randint(0, repeats + 1, (1,), generator=gen))
        text = (f"There is a pass key hidden in this text. Find it and remember it. {PASSKEY_FILLER * before}"
                f"The pass key is {key}. Remember it. {PASSKEY_FILLER * (repeats - before)}"
                f"What is the pass key? The pass key is {key}")
        ids.append(torch.tensor(tokenizer(text)["input_ids"]))
    return ids, PASSKEY_STEPS


_LAST_SUMMARY: dict[int, str] = {}


def calibrate(model: torch.nn.Module, calibration_ids: Optional[Sequence[Tensor]] = None, *, budget: int,
              max_selection_layers: int = 3, max_dense_layers: int = 2, threshold: float = 0.9,
              decode_steps: int = 16, tokenizer: Any = None, verbose: bool = True) -> TidalConfig:
    """A `TidalConfig` for `model` at `budget`, chosen from the model's own attention (see the
    module docstring): on `calibration_ids` (sequences of token ids from text like yours; the last
    `decode_steps` tokens of each are decoded one at a time), or the built-in data. Prints the
    choice and a per-layer table when `verbose`; `explain` shows it too."""
    if calibration_ids is None:
        calibration_ids, decode_steps = default_calibration_ids(model, tokenizer)
    prompts, continuations = split_for_decoding(calibration_ids, decode_steps)
    progress = _progress_bar("calibrating") if verbose else None
    config, text = calibrate_model(model, prompts, continuations, budget=budget,
                                   max_selection_layers=max_selection_layers, max_dense_layers=max_dense_layers,
                                   threshold=threshold, progress=progress)
    _LAST_SUMMARY[id(model)] = text
    if verbose:
        print(text, flush=True)
    return config


def calibration_summary(model: torch.nn.Module) -> Optional[str]:
    """The last calibration's summary for `model` (None if it was not calibrated)."""
    return _LAST_SUMMARY.get(id(model))


def _progress_bar(label: str) -> Any:
    import sys

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} decode steps")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def write_yaml(config: TidalConfig, text: str, path: str) -> None:
    """The config as YAML, with the calibration summary above it as comments."""
    import yaml

    values = {"mode": config.mode, "budget": config.budget, "granularity": config.granularity,
              "dense_layers": list(config.dense_layers), "selection_layers": list(config.selection_layers),
              "sink": config.sink, "recent": config.recent}
    comments = "".join(f"# {line}\n" for line in text.splitlines())
    with open(path, "w", encoding="utf-8") as f:
        f.write(comments + yaml.safe_dump(values, sort_keys=False))


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m tidal_compile.calibrate MODEL_PATH --budget K --out model.yaml`."""
    import argparse

    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(prog="python -m tidal_compile.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a path as from_pretrained takes it, or pkg:NAME (an installed package's folder)")
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--out", required=True, help="YAML file to write")
    parser.add_argument("--prompts", help="a text file: calibration prompts separated by blank lines")
    parser.add_argument("--gguf-file", help="a GGUF checkpoint in MODEL_PATH (needs gguf and accelerate)")
    parser.add_argument("--max-selection-layers", type=int, default=3)
    parser.add_argument("--max-dense-layers", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--decode-steps", type=int, default=16)
    args = parser.parse_args(argv)

    from tidal_compile.eval.text_models import model_path

    path = model_path(args.model)
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                 **extra).eval()
    tokenizer = _tokenizer(path, extra)
    ids = None
    if args.prompts:
        if tokenizer is None:
            raise SystemExit("--prompts needs the model's tokenizer, which could not be loaded")
        texts = [t.strip() for t in open(args.prompts, encoding="utf-8").read().split("\n\n") if t.strip()]
        ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    config = calibrate(model, ids, budget=args.budget, max_selection_layers=args.max_selection_layers,
                       max_dense_layers=args.max_dense_layers, threshold=args.threshold,
                       decode_steps=args.decode_steps, tokenizer=tokenizer)
    write_yaml(config, calibration_summary(model), args.out)
    print(f"wrote {args.out}")


def _tokenizer(path: str, extra: dict[str, Any]) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError):
        return None  # e.g. the project's retrieval model: no tokenizer; the built-in data needs none

"""Synthetic long-context retrieval data: the vocabulary, filler text, needles and queries.

A sequence is a BOS token followed by 8-token *slots*. Filler slots are sentences of a fixed
random Markov language (7 words and a period), so next-token prediction over filler needs broad,
not one-hot, attention. A needle slot `KEY k v1 v2 v3 v4 v5 .` states a fact; a query slot
restates its start, `KEY k`, and the values are the answer (the value follows the key directly,
so retrieval is one induction step: find the earlier `KEY k`, copy what follows). Training mixes
passkey-style single needles and multi-query associative recall (many needles, several queries);
the needle evaluation uses one needle at a chosen depth and one query at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PAD, BOS, EOS, KEY, PERIOD = 0, 1, 2, 3, 5  # 4 unused
SLOT = 8
VALUE_TOKENS = 5
KEY_BASE, NUM_KEYS = 8, 128
VALUE_BASE, NUM_VALUES = KEY_BASE + NUM_KEYS, 64
WORD_BASE, NUM_WORDS = VALUE_BASE + NUM_VALUES, 256
VOCAB_SIZE = WORD_BASE + NUM_WORDS  # 456
SUCCESSORS = 8  # each filler word is followed by one of 8 words, Zipf-weighted
SENTENCES = 4096


@dataclass
class Batch:
    """Token ids [B, L] and per-token loss weights [B, L] (weight of predicting token t+1 at t is
    stored at t+1); `answer_mask` marks query answers (the retrieval tokens)."""

    tokens: Tensor
    answer_mask: Tensor


def sequence_length(slots: int) -> int:
    return 1 + SLOT * slots


def slots_for_length(length: int) -> int:
    """The number of slots of the longest sequence no longer than `length`."""
    if length < sequence_length(2):
        raise ValueError(f"length must be at least {sequence_length(2)} tokens, got {length}")
    return (length - 1) // SLOT


def token_name(token: int) -> str:
    """A readable name for a token id: `KEY`, `k17` (a key), `v3` (a value), `w120` (a word)."""
    special = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", KEY: "KEY", PERIOD: "."}
    if token in special:
        return special[token]
    for prefix, base, count in (("k", KEY_BASE, NUM_KEYS), ("v", VALUE_BASE, NUM_VALUES), ("w", WORD_BASE, NUM_WORDS)):
        if base <= token < base + count:
            return f"{prefix}{token - base}"
    return f"<{token}>"


class FillerLanguage:
    """A fixed (seeded) bank of filler sentences from a random Markov chain over the words."""

    def __init__(self, seed: int = 1234):
        gen = torch.Generator().manual_seed(seed)
        successors = torch.stack([torch.randperm(NUM_WORDS, generator=gen)[:SUCCESSORS] for _ in range(NUM_WORDS)])
        zipf = 1.0 / torch.arange(1, SUCCESSORS + 1, dtype=torch.float64)
        words = torch.empty(SENTENCES, SLOT - 1, dtype=torch.long)
        words[:, 0] = torch.randint(NUM_WORDS, (SENTENCES,), generator=gen)
        for i in range(1, SLOT - 1):
            choice = torch.multinomial(zipf.expand(SENTENCES, -1), 1, generator=gen).squeeze(1)
            words[:, i] = successors[words[:, i - 1], choice]
        self.sentences = torch.cat([words + WORD_BASE, torch.full((SENTENCES, 1), PERIOD)], dim=1)

    def slots(self, batch: int, slots: int, gen: torch.Generator, device: torch.device) -> Tensor:
        """Random filler sentences [batch, slots, SLOT]."""
        ids = torch.randint(SENTENCES, (batch, slots), generator=gen, device=gen.device)
        return self.sentences.to(device)[ids.to(device)]


def fact_slots(marker: int, keys: Tensor, values: Tensor) -> Tensor:
    """`marker k v1..v5 .` slots [..., SLOT] for keys [...] and values [..., 5] (token ids)."""
    shape = keys.shape
    head = torch.stack([torch.full(shape, marker, device=keys.device), keys], dim=-1)
    return torch.cat([head, values, torch.full((*shape, 1), PERIOD, device=keys.device)], dim=-1)


def random_facts(batch: int, count: int, gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """`count` facts per sequence with distinct keys: keys [batch, count], values [batch, count, 5]."""
    keys = torch.rand(batch, NUM_KEYS, generator=gen, device=gen.device).argsort(dim=1)[:, :count] + KEY_BASE
    values = torch.randint(NUM_VALUES, (batch, count, VALUE_TOKENS), generator=gen, device=gen.device) + VALUE_BASE
    return keys.to(device), values.to(device)


def assemble(filler: Tensor, needles: Tensor, needle_slot: Tensor, queries: Tensor) -> Batch:
    """Put needle slots [B, N, SLOT] at slot indices [B, N] of the filler [B, S, SLOT], replace the
    last Q filler slots by the query slots [B, Q, SLOT], and prepend BOS."""
    b, s, _ = filler.shape
    q = queries.shape[1]
    slots = filler.clone()
    slots.scatter_(1, needle_slot[..., None].expand(-1, -1, SLOT), needles)
    slots[:, s - q:] = queries
    answer = torch.zeros_like(slots, dtype=torch.bool)
    answer[:, s - q:, 2:2 + VALUE_TOKENS] = True
    bos = torch.full((b, 1), BOS, dtype=slots.dtype, device=slots.device)
    tokens = torch.cat([bos, slots.reshape(b, -1)], dim=1)
    answer_mask = torch.cat([torch.zeros_like(bos, dtype=torch.bool), answer.reshape(b, -1)], dim=1)
    return Batch(tokens, answer_mask)


def training_batch(language: FillerLanguage, batch: int, slots: int, gen: torch.Generator,
                   device: torch.device, max_needles: int = 32) -> Batch:
    """A mix of passkey (one needle) and multi-query associative recall (up to `max_needles`
    needles, at most half the slots, and up to 8 queries): the needle count is drawn per batch,
    needle positions and the queried facts per sequence."""
    num_needles = int(torch.randint(1, max(1, min(max_needles, slots // 2)) + 1, (1,), generator=gen, device=gen.device))
    num_queries = int(torch.randint(1, min(8, num_needles, slots - num_needles) + 1, (1,), generator=gen, device=gen.device))
    keys, values = random_facts(batch, num_needles, gen, device)
    free = slots - num_queries
    needle_slot = torch.rand(batch, free, generator=gen, device=gen.device).argsort(dim=1)[:, :num_needles].to(device)
    asked = torch.rand(batch, num_needles, generator=gen, device=gen.device).argsort(dim=1)[:, :num_queries].to(device)
    queries = fact_slots(KEY, keys.gather(1, asked), values.gather(1, asked[..., None].expand(-1, -1, VALUE_TOKENS)))
    filler = language.slots(batch, slots, gen, device)
    return assemble(filler, fact_slots(KEY, keys, values), needle_slot, queries)


def needle_batch(language: FillerLanguage, batch: int, length: int, depth: float, gen: torch.Generator,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """Needle-in-a-haystack prompts: one needle at `depth` (0 = first slot, 1 = just before the
    query) in filler, ending with `KEY k`. Returns (prompt ids [B, L'], answers [B, 5]),
    L' <= length."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    slots = slots_for_length(length + SLOT - 2)  # the last slot is cut after `KEY k`
    keys, values = random_facts(batch, 1, gen, device)
    position = round(depth * (slots - 2))
    needle_slot = torch.full((batch, 1), position, dtype=torch.long, device=device)
    queries = fact_slots(KEY, keys, values)
    sample = assemble(language.slots(batch, slots, gen, device), fact_slots(KEY, keys, values), needle_slot, queries)
    prompt = sample.tokens[:, :-(SLOT - 2)]
    return prompt, values[:, 0]

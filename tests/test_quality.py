"""The shipped retrieval model (models/retrieval-llama) through the real compile path on the CPU:
full attention answers the needle cases, and tidal at a budget far below the context (32 of
~512 positions, selection layers chosen as in docs/quality.md) answers every case full answers."""

from __future__ import annotations

from pathlib import Path

import torch

from tidal_compile.eval import retrieval_data as data
from tidal_compile.eval.needle import Setting, evaluate_setting, needle_prompts

MODEL = Path(__file__).resolve().parent.parent / "models" / "retrieval-llama"
LENGTHS, DEPTHS, CASES = [512], [0.0, 0.5, 1.0], 4


def _answered(spec: str) -> list[bool]:
    """Per case (cells in grid order, cases within): the greedy answer equals the needle's value."""
    cells = evaluate_setting(MODEL, Setting.parse(spec), LENGTHS, DEPTHS, CASES, torch.device("cpu"), torch.float32,
                             "eager")
    language = data.FillerLanguage()
    answered = []
    for cell in cells:
        _, answers = needle_prompts(cell["length"], cell["depth"], CASES, torch.device("cpu"), language)
        answered += [generated == answer for generated, answer in zip(cell["generated"], answers.tolist())]
    return answered


def test_tidal_far_below_the_context_answers_what_full_answers():
    full = _answered("full")
    assert sum(full) >= 0.95 * len(full), "the shipped model must retrieve its needles under full attention"
    tidal = _answered("tidal:32@3,recent=8")
    missed = [i for i, (f, t) in enumerate(zip(full, tidal)) if f and not t]
    assert not missed, f"tidal missed cases {missed} that full attention answers"

"""Quality-evaluation tooling on the CPU: the synthetic retrieval data, the needle evaluation
through `compile_for_generation` (settings that must equal full attention do), attention recall
(exactly 1 when the budget covers the context, below 1 when it does not) and the report tables."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from tidal_compile.eval import retrieval_data as data
from tidal_compile.eval.needle import Setting, evaluate_setting
from tidal_compile.eval.recall import measure
from tidal_compile.eval.report import recall_table, summary_table

LANGUAGE = data.FillerLanguage()


@settings(max_examples=25, deadline=None)
@given(length=st.integers(data.sequence_length(2), 600), depth=st.floats(0, 1), seed=st.integers(0, 999))
def test_needle_prompt_holds_the_fact_once_and_ends_with_its_query(length, depth, seed):
    prompt, answer = data.needle_batch(LANGUAGE, 2, length, depth, torch.Generator().manual_seed(seed),
                                       torch.device("cpu"))
    assert prompt.shape[1] <= length and prompt[0, 0] == data.BOS
    for row, values in zip(prompt.tolist(), answer.tolist()):
        key = row[-1]
        assert row[-2] == data.KEY and data.KEY_BASE <= key < data.KEY_BASE + data.NUM_KEYS
        starts = [i for i in range(len(row) - 2) if row[i] == data.KEY and row[i + 1] == key]
        assert len(starts) == 1, "exactly one needle states the queried key"
        i = starts[0]
        assert row[i + 2:i + 2 + data.VALUE_TOKENS] == values
        slots = (len(row) - 1 - 2) // data.SLOT + 1
        assert abs((i - 1) // data.SLOT - depth * (slots - 2)) <= 0.5 + 1e-9


@settings(max_examples=25, deadline=None)
@given(slots=st.integers(6, 40), seed=st.integers(0, 999), needles=st.integers(1, 32))
def test_training_answers_are_predictable_from_the_context(slots, seed, needles):
    """Every answer token follows, somewhere earlier, the same token that precedes it here."""
    batch = data.training_batch(LANGUAGE, 2, slots, torch.Generator().manual_seed(seed), torch.device("cpu"),
                                max_needles=needles)
    assert batch.tokens.shape == (2, data.sequence_length(slots)) and batch.answer_mask.any()
    for row, answers in zip(batch.tokens.tolist(), batch.answer_mask.tolist()):
        first = answers.index(True)
        for t in range(first, len(row)):
            if answers[t]:
                earlier = [j for j in range(1, first) if row[j - 1] == row[t - 1] and row[j] == row[t]]
                assert earlier, f"answer token at {t} has no earlier copy"


def _tiny_retrieval_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=data.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharp attention, so that sparse settings differ from full
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    model.save_pretrained(tmp_path)
    return tmp_path


def _generated(path, spec, lengths=(150,)):
    cells = evaluate_setting(path, Setting.parse(spec), list(lengths), [0.0, 1.0], 4, torch.device("cpu"),
                             torch.float32, "eager")
    return [c["generated"] for c in cells], cells


def test_needle_eval_settings_that_must_equal_full_do(tmp_path):
    """An untrained model answers whatever it answers; full attention through the tidal ops, and
    tidal / quest with budgets covering the context, must generate exactly its tokens, and a
    small budget must change some of them (so the comparison can fail)."""
    path = _tiny_retrieval_model(tmp_path)
    expected, cells = _generated(path, "eager")
    for spec in ("full", "tidal:160", "quest:160"):
        assert _generated(path, spec)[0] == expected, spec
    assert _generated(path, "tidal:16")[0] != expected
    table = summary_table(cells)
    assert "| eager |" in table and "L=150" in table


def test_recall_is_one_when_the_budget_covers_the_context(tmp_path):
    path = _tiny_retrieval_model(tmp_path)
    from tidal_compile.eval.needle import load_model

    model = load_model(path, torch.device("cpu"), torch.float32)
    for spec in ("tidal:256", "quest:256", "topk_oracle:256"):
        recall = measure(model, Setting.parse(spec), 150, [0.5], 2, 3)
        assert recall and all(abs(r - 1.0) < 1e-5 for r in recall.values()), (spec, recall)
    small = measure(model, Setting.parse("tidal:16"), 150, [0.5], 2, 3)
    assert set(small) == {2, 3, 4} and all(0.0 < r < 1.0 for layer, r in small.items() if layer != 2)
    assert "| tidal:16 |" in recall_table({"tidal:16": small})


def test_token_names_cover_the_vocabulary_without_collisions():
    names = [data.token_name(t) for t in range(data.VOCAB_SIZE)]
    assert len(set(names)) == data.VOCAB_SIZE
    assert [data.token_name(t) for t in (data.KEY, data.KEY_BASE + 17, data.VALUE_BASE, data.WORD_BASE + 3)] == \
        ["KEY", "k17", "v0", "w3"]


def test_recall_probe_attends_as_the_mode_does():
    """Selection layers output exact attention and pass their top-k on; sparse layers attend to
    exactly those positions (the semantics of the compiled ops, tidal_compile.ops.reference)."""
    from types import SimpleNamespace

    from tidal_compile.config import TidalConfig
    from tidal_compile.eval.recall import RecallProbe
    from tidal_compile.ops import reference

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=gen) for s in ((2, 4, 1, 8), (2, 2, 30, 8), (2, 2, 30, 8)))
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    mask[1, ..., :5] = False
    probe = RecallProbe(TidalConfig.load(None, mode="tidal", budget=6, selection_layers=[2]), 4)
    scale = 8 ** -0.5
    selection, _ = probe.attention(SimpleNamespace(layer_idx=2), q, k, v, mask, scaling=scale)
    expected_out, chosen = reference.selection_attention(q, k, v, mask, scale, 6, "query_head")
    torch.testing.assert_close(selection, expected_out.transpose(1, 2))
    sparse, _ = probe.attention(SimpleNamespace(layer_idx=3), q, k, v, mask, scaling=scale)
    torch.testing.assert_close(sparse, reference.sparse_attention(q, k, v, chosen, scale).transpose(1, 2))
    assert set(probe.recall()) == {2, 3} and all(0.0 < r < 1.0 for r in probe.recall().values())

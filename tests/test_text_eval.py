"""Evaluation tools for pretrained text models and the retrieval-layer probe, on the CPU: passkey
prompts, teacher-forced decode loss (settings that must equal full attention do), and the
shipped retrieval model's retrieval layer."""

from __future__ import annotations

from pathlib import Path

import torch
from hypothesis import given, settings, strategies as st

from tidal_compile import hf_compat
from tidal_compile.eval import lm_loss, passkey, text_models
from tidal_compile.eval.needle import Setting


class CharTokenizer:
    """A stand-in tokenizer: one id per character (what the passkey and loss tools need of one)."""

    pad_token = eos_token = "\0"
    pad_token_id = 0
    padding_side = "right"

    def __call__(self, texts, add_special_tokens=True, return_tensors=None, padding=False):
        single = isinstance(texts, str)
        rows = [[ord(c) % 250 + 1 for c in t] for t in ([texts] if single else texts)]
        if return_tensors is None:
            return {"input_ids": rows[0] if single else rows}
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(200, 2000), depth=st.floats(0, 1), key=st.integers(10000, 99999))
def test_a_passkey_prompt_holds_its_key_once_at_its_depth_and_ends_with_the_question(tokens, depth, key):
    text = passkey.passkey_text(tokens, depth, key, CharTokenizer())
    assert text.endswith(passkey.QUESTION) and text.count(str(key)) == 2  # "The pass key is K ... K is the pass key"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    before = text.index(needle) - len(passkey.INSTRUCTION)
    repeats = (len(text) - len(passkey.INSTRUCTION) - len(passkey.QUESTION) - len(needle)) / len(passkey.FILLER)
    assert before % len(passkey.FILLER) == 0 and abs(before / len(passkey.FILLER) - depth * repeats) <= 0.5


def test_passkey_cells_are_seeded_and_distinct():
    tok = CharTokenizer()
    first, keys = passkey.passkey_batch(300, 0.5, 3, tok)
    again, same = passkey.passkey_batch(300, 0.5, 3, tok)
    other, other_keys = passkey.passkey_batch(300, 0.9, 3, tok)
    assert keys == same and torch.equal(first["input_ids"], again["input_ids"]) and keys != other_keys


def _tiny_text_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharp attention, so that small budgets change the loss
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def test_decode_loss_equals_full_attention_where_it_must_and_differs_at_a_small_budget():
    base = _tiny_text_model()
    window = torch.randint(1, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    name = hf_compat.forward_cache_name(base.forward)

    def loss(spec):
        return lm_loss.decode_loss(text_models.for_setting(base, Setting.parse(spec), "eager"), name, window, 6)

    reference = loss("eager")
    for spec in ("full", "tidal:128", "quest:128"):
        assert abs(loss(spec) - reference) < 1e-4, spec
    assert abs(loss("tidal:8") - reference) > 1e-3


def test_text_windows_are_disjoint_slices_of_the_reference_text():
    windows = lm_loss.text_windows(CharTokenizer(), 500, 4)
    assert windows.shape == (4, 500) and len({tuple(w.tolist()) for w in windows}) == 4
    assert "statement" in lm_loss.natural_text()


def test_the_shipped_retrieval_model_retrieves_in_layer_3():
    from tidal_compile.eval.needle import load_model
    from tidal_compile.eval.retrieval_layers import needle_attention

    model = load_model(Path(__file__).resolve().parent.parent / "models" / "retrieval-llama", torch.device("cpu"),
                       torch.float32)
    shares = needle_attention(model, 256, [0.5], 2)
    assert int(shares[:, 0].argmax()) == 3 and shares[3, 0] > 0.8


def test_model_path_names_an_installed_package_folder():
    assert Path(text_models.model_path("pkg:tidal_compile"), "hf.py").exists()
    assert text_models.model_path("models/retrieval-llama") == "models/retrieval-llama"

"""The byte-level BPE tokenizer built for from-scratch models."""

import pytest
from transformers import AutoTokenizer

from tokensieve.errors import ModelError
from tokensieve.launch.tokenizer import EOS_TOKEN, IM_END, IM_START, PAD_TOKEN, build_tokenizer


def test_specials_and_size(tiny_tokenizer):
    assert len(tiny_tokenizer) == 300
    assert tiny_tokenizer.eos_token == EOS_TOKEN and tiny_tokenizer.pad_token == PAD_TOKEN
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    for token in (IM_START, IM_END):
        ids = tiny_tokenizer(f"a {token} b", add_special_tokens=False).input_ids
        assert tiny_tokenizer.convert_tokens_to_ids(token) in ids  # kept whole, not split into bytes


def test_any_text_round_trips(tiny_tokenizer):
    # Characters never seen in training still encode through the full byte alphabet.
    text = "héllo wörld ✓ 😀 k17 -> v3\n\ttabs"
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.unk_token_id not in ids


def test_save_and_reload(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "record 3 : key k3 maps to value v21 😀"
    assert reloaded(text).input_ids == tiny_tokenizer(text).input_ids
    assert (reloaded.eos_token, reloaded.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert reloaded.chat_template == tiny_tokenizer.chat_template
    assert len(reloaded) == len(tiny_tokenizer)


def test_chat_template_marks_assistant_tokens(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "what is k1?"},
        {"role": "assistant", "content": " v3"},
        {"role": "user", "content": "and k2?"},
        {"role": "assistant", "content": " v5"},
    ]
    out = tiny_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    marked = [i for i, m in zip(ids, mask) if m]
    assert tiny_tokenizer.decode(marked) == f" v3{IM_END} v5{IM_END}"
    text = tiny_tokenizer.decode(ids)
    assert text.startswith(f"{IM_START}user\nwhat is k1?{IM_END}\n{IM_START}assistant\n")


def test_generation_prompt(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text.endswith(f"{IM_START}assistant\n")


def test_too_small_vocab_is_an_error():
    with pytest.raises(ModelError, match="vocab_size must be at least 260"):
        build_tokenizer(["abc"], vocab_size=100)

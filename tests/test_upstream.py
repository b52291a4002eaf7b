"""The internals of transformers and TRL that tokensieve relies on (tokensieve/upstream.py): each still exists in
the installed versions, each wrapper does what it says, and importing tokensieve changes no other library's state.

A failure here names the upstream change; fix it in tokensieve/upstream.py, not at the call sites."""

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
import trl.trainer.utils
from trl.trainer.utils import add_fused_lm_head

from tokensieve.launch.methods import METHODS
from tokensieve.selectors.attention import _gate_hook, attach_gates, attention_modules, gates_of, retention_state
from tokensieve.selectors.kv_cache import RetentionCache
from tokensieve.upstream import (CACHE_ARGUMENTS, PRIVATE_OVERRIDES, SUBMODULE_IMPORTS, UpstreamChange,
                                 attn_implementation, cache_argument, cache_in, check_private_overrides,
                                 decoder_from_layer, fused_head_labelled_positions_only, modeling_function,
                                 with_cache)


# --- importing tokensieve changes nothing upstream ------------------------------------------------------------------

WATCHED_MODULES = ["trl.trainer.utils", "trl.kernels.chunked_logprob", "trl.trainer.sft_trainer", "transformers.trainer",
                   "transformers.modeling_utils", "transformers.generation.utils", "transformers.cache_utils"]
SNAPSHOT = (
    "import importlib, json, sys\n"
    "def snapshot():\n"
    "    return {m: {k: id(v) for k, v in vars(importlib.import_module(m)).items()} for m in MODULES}\n"
    "before = snapshot()\n"
    "import tokensieve.trainers, tokensieve.trainers.token_loss, tokensieve.trainers.retention\n"
    "import tokensieve.trainers.query_selector, tokensieve.launch.cli, tokensieve.launch.methods\n"
    "import tokensieve.selectors.attention, tokensieve.selectors.keep_attention, tokensieve.data.curation\n"
    "after = snapshot()\n"
    "print(json.dumps({m: sorted(k for k in set(before[m]) | set(after[m]) if before[m].get(k) != after[m].get(k))"
    " for m in MODULES}))\n"
)


def test_importing_tokensieve_leaves_upstream_modules_as_they_were():
    script = f"MODULES = {WATCHED_MODULES!r}\n" + SNAPSHOT
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    changed = json.loads(result.stdout.strip().splitlines()[-1])
    assert changed == {m: [] for m in WATCHED_MODULES}, f"attributes changed by importing tokensieve: {changed}"


# --- TRL's fused LM head, scoped ------------------------------------------------------------------------------------

def fused_step(model, input_ids, labels, compact: bool):
    model.zero_grad()
    scope = fused_head_labelled_positions_only() if compact else torch.enable_grad()
    with scope:
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_fused_head_scope_is_restored_and_changes_only_what_is_projected(tiny_llama, monkeypatch):
    original = trl.trainer.utils._use_triton
    seen = []
    monkeypatch.setattr(trl.trainer.utils, "_use_triton", lambda device: seen.append(device.type) or False)
    with fused_head_labelled_positions_only():
        assert trl.trainer.utils._use_triton(torch.device("cpu")) is True  # compacted on CPU
    assert trl.trainer.utils._use_triton(torch.device("meta")) is False and seen == ["meta"]  # restored
    monkeypatch.setattr(trl.trainer.utils, "_use_triton", original)

    model = copy.deepcopy(tiny_llama)  # the fixture is shared: patch a copy
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    torch.manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 20))
    labels = input_ids.clone()
    labels[0, :12] = -100
    labels[1, :5] = -100
    labels[2, 15:] = -100
    compact, compact_grads = fused_step(model, input_ids, labels, True)
    full, full_grads = fused_step(model, input_ids, labels, False)
    torch.testing.assert_close(compact.loss, full.loss)
    for field in ("log_probs", "entropy", "is_top1", "label_mask"):
        torch.testing.assert_close(getattr(compact, field), getattr(full, field))
    assert compact_grads.keys() == full_grads.keys() and compact_grads
    for name in full_grads:
        torch.testing.assert_close(compact_grads[name], full_grads[name], rtol=1e-5, atol=1e-6)


def test_trl_still_has_the_switch_the_fused_head_scope_swaps():
    assert hasattr(trl.trainer.utils, "_use_triton"), (
        f"trl {trl.__version__}: trl.trainer.utils._use_triton is gone, so fused_head_labelled_positions_only changes "
        "nothing (results unchanged, CPU training slower): find TRL's new switch for compacting the fused LM head")


# --- the KV-cache keyword -------------------------------------------------------------------------------------------

def test_cache_in_finds_the_cache_under_either_name():
    cache = object()
    for name in CACHE_ARGUMENTS:
        assert cache_in({name: cache, "hidden_states": None}) is cache
    assert cache_in({"cache": None, "past_key_values": cache}) is cache
    assert cache_in({"hidden_states": None}) is None


@pytest.mark.parametrize("name", CACHE_ARGUMENTS)
def test_gate_hook_sees_a_retention_cache_under_each_name(tiny_model, name):
    _, model = tiny_model
    model = copy.deepcopy(model)
    attach_gates(model, intermediate_size=8)
    attention = attention_modules(model)[1]
    hidden = torch.randn(2, 5, model.config.hidden_size)
    cache = RetentionCache.for_model(model, memory_size=4, buffer_size=2)
    _gate_hook(attention, (), {"hidden_states": hidden, name: cache})
    assert retention_state(attention).cache_layer is cache.layers[1]
    assert retention_state(attention).log_beta is None  # no training bias on a cached forward
    gate, gate_input = cache.layers[1].pending_gate
    assert gate is gates_of(model)[1] and torch.equal(gate_input, hidden)
    _gate_hook(attention, (), {"hidden_states": hidden, name: None})  # no cache: the training bias path
    assert retention_state(attention).cache_layer is None
    assert retention_state(attention).log_beta.shape == (2, model.config.num_key_value_heads, 5)


def test_with_cache_uses_the_installed_name_and_equals_the_old_name(tiny_model):
    architecture, model = tiny_model
    model = copy.deepcopy(model)
    attach_gates(model, intermediate_size=8)
    name = cache_argument(model)
    assert name in CACHE_ARGUMENTS and name in __import__("inspect").signature(type(model).forward).parameters
    prompt = torch.randint(3, 250, (2, 30))
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the installed name never warns
        new = model.generate(prompt, **options, **with_cache(model, RetentionCache.for_model(model, 8, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name: deprecated from transformers 5.24 on
        old = model.generate(prompt, **options, past_key_values=RetentionCache.for_model(model, 8, 4))
    assert torch.equal(new, old), architecture


def test_decoder_from_layer_skips_the_first_layers_and_feeds_the_given_state(tiny_model):
    architecture, model = tiny_model
    model = copy.deepcopy(model)
    decoder = model.get_decoder()
    a, b = torch.randint(3, 250, (2, 2, 12))
    mask = torch.ones_like(a)
    seen = {}
    handle = decoder.layers[1].register_forward_pre_hook(lambda m, args: seen.update(hidden=args[0]))
    with torch.no_grad():
        full = model(input_ids=a, attention_mask=mask).logits
        handle.remove()
        calls = []
        counter = decoder.layers[0].register_forward_hook(lambda *_: calls.append(1))
        with decoder_from_layer(decoder, 1, seen["hidden"]):  # b's own first layer is skipped: a's state is fed
            resumed = model(input_ids=b, attention_mask=mask).logits
        counter.remove()
        assert calls == [1]  # the layer is still called (its hooks run), but its own forward is not
        torch.testing.assert_close(resumed, full, msg=architecture)
        assert "forward" not in decoder.layers[0].__dict__  # the class forward is back
        assert not decoder.layers[1]._forward_pre_hooks
        again = model(input_ids=b, attention_mask=mask).logits
        assert not torch.allclose(again, full)


def test_decoder_from_layer_puts_back_an_instance_forward_and_checks_the_start(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    decoder = model.get_decoder()
    wrapped = decoder.layers[0].forward  # as accelerate's hooks do: an instance attribute
    decoder.layers[0].forward = wrapped
    with decoder_from_layer(decoder, 1, torch.zeros(1, 3, model.config.hidden_size)):
        assert decoder.layers[0].forward is not wrapped
    assert decoder.layers[0].__dict__["forward"] is wrapped
    for start in (0, len(decoder.layers)):
        with pytest.raises(ValueError, match=f"start layer {start}"), decoder_from_layer(decoder, start, None):
            pass


# --- other internals ------------------------------------------------------------------------------------------------

def test_modeling_function_and_attn_implementation(tiny_model):
    _, model = tiny_model
    attention = attention_modules(model)[0]
    for name in ("eager_attention_forward", "apply_rotary_pos_emb"):
        assert callable(modeling_function(attention, name))
    with pytest.raises(UpstreamChange, match="has no no_such_function"):
        modeling_function(attention, "no_such_function")
    assert attn_implementation(model) in ("sdpa", "eager")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_private_methods_our_trainers_override_still_exist_upstream(method):
    check_private_overrides(METHODS[method].trainer_class)  # raises UpstreamChange naming the method otherwise


def test_a_vanished_or_changed_private_method_is_named(monkeypatch):
    from trl import SFTTrainer

    def define(body):
        namespace = {"SFTTrainer": SFTTrainer, "__name__": "tokensieve.fake"}
        exec("class Fake(SFTTrainer):\n" + body, namespace)
        return namespace["Fake"]

    changed = define("    def _save_checkpoint(self, model, trial, extra):\n        pass\n")
    with pytest.raises(UpstreamChange, match=r"_save_checkpoint takes \(self, model, trial, extra\)"):
        check_private_overrides(changed)
    import transformers

    monkeypatch.delattr(transformers.Trainer, "_get_num_items_in_batch")
    vanished = define("    def _get_num_items_in_batch(self, batch_samples, device):\n        pass\n")
    with pytest.raises(UpstreamChange, match="_get_num_items_in_batch overrides a private method .* no longer has"):
        check_private_overrides(vanished)
    assert "_get_num_items_in_batch" in PRIVATE_OVERRIDES


def test_our_configs_warn_only_about_what_the_user_wrote(tmp_path):
    from transformers import TrainingArguments

    for method in METHODS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            config = method.config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
        if hasattr(TrainingArguments, "activation_checkpointing"):
            assert config.activation_checkpointing is True  # TRL's default, under its current name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the user's own deprecated key warns, as in TRL
            config = method.config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                                         gradient_checkpointing=False)
        assert getattr(config, "activation_checkpointing", False) is False and config.gradient_checkpointing is False


def test_every_submodule_import_still_resolves():
    import importlib

    missing = []
    for path, names in SUBMODULE_IMPORTS.items():
        try:
            module = importlib.import_module(path)
        except ImportError as error:
            missing.append(f"{path} ({error})")
            continue
        missing += [f"{path}.{name}" for name in names if not hasattr(module, name)]
    assert not missing, f"moved or removed upstream: {', '.join(missing)}"


def test_what_our_overrides_use_inside_still_exists(tiny_llama, tiny_tokenizer, tmp_path):
    from transformers import Trainer

    assert callable(getattr(Trainer, "_get_output_dir", None)), "Trainer._get_output_dir is gone (TokenLossTrainer)"
    trainer = METHODS["sft"].trainer_class(
        model=copy.deepcopy(tiny_llama), processing_class=tiny_tokenizer,
        args=METHODS["sft"].config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none"),
        train_dataset=__import__("datasets").Dataset.from_list([{"prompt": "a", "completion": " b"}] * 2))
    trainer._set_signature_columns_if_needed()
    assert "input_ids" in trainer._signature_columns, "Trainer._signature_columns changed (TokenLossTrainer)"

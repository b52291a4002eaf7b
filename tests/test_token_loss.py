"""TokenLossTrainer: every scorer trains; the loss is exact under gradient accumulation; EMA state resumes;
LoRA exports load with plain PEFT; per-token columns are checked per example."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from tokensieve.errors import DataError
from tokensieve.launch.model import FromScratchArguments, apply_peft, build_config
from tokensieve.trainers.history import EMA_FILE, first_changed_layer
from tokensieve.trainers.token_loss import TokenLossConfig, TokenLossTrainer


def fresh_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = build_config(FromScratchArguments(architecture="llama", max_position_embeddings=128), tokenizer)
    return AutoModelForCausalLM.from_config(config)


def lora(model):
    return apply_peft(model, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"})


@pytest.fixture(scope="module")
def rows(tiny_tokenizer):
    """Prompt/completion rows with a condition-free prompt and per-response-token columns of the right length."""
    out = []
    for i in range(16):
        prompt, completion = f"record {i} : key k{i % 5} maps to v{(i * 3) % 7} ; copy", f" v{(i * 3) % 7} done" * (1 + i % 3)
        full = tiny_tokenizer(prompt)["input_ids"]
        n = len(tiny_tokenizer(prompt + completion)["input_ids"]) - len(full) + 1  # + the EOS TRL appends
        out.append({
            "prompt": prompt, "completion": completion, "prompt_without_context": "copy",
            "token_weights": [float((i + j) % 3) for j in range(n)],
            "history_loss": [1.0 + 0.1 * ((i * j) % 5) for j in range(n)],
        })
    return out


def config(tmp_path, config_class=TokenLossConfig, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=1,
        learning_rate=1.0, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", weight_decay=0.0,
        report_to="none", save_strategy="no", use_cpu=True, bf16=False, activation_checkpointing=False,
        logging_steps=1, train_sampling_strategy="sequential", dataset_num_proc=None, seed=0,
    )
    defaults.update(kwargs)
    return config_class(**defaults)


def train(rows, tokenizer, args, peft=False):
    model = fresh_model(tokenizer)
    model = lora(model) if peft else model
    trainer = TokenLossTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    result = trainer.train()
    return trainer, result


def trained_parameters(model):
    """Trainable parameters by name, without PEFT's wrapper prefix (a trainer's model or a bare model)."""
    model = getattr(model, "model", model) if isinstance(model, TokenLossTrainer) else model
    return {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad}


SCORERS = [
    dict(token_scorer="sstoken", history_model="base"),
    dict(token_scorer="sstoken", history_model="offline"),
    dict(token_scorer="sstoken", history_model="ema"),
    dict(token_scorer="prior", reference_model="base"),
    dict(token_scorer="column"),
    dict(token_scorer="dft"),
    dict(token_scorer="none"),
]


@pytest.mark.parametrize("options", SCORERS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_gradient_accumulation_is_exact(rows, tiny_tokenizer, tmp_path, options):
    """Batch 8 x accumulation 1 and batch 1 x accumulation 8: same loss and same update (SGD, lr 1: update = grad)."""
    peft = options.get("history_model") == "base" or options.get("reference_model") == "base"
    a, result_a = train(rows[:8], tiny_tokenizer, config(tmp_path / "a", **options), peft=peft)
    b, result_b = train(rows[:8], tiny_tokenizer, config(tmp_path / "b", per_device_train_batch_size=1,
                                                          gradient_accumulation_steps=8, **options), peft=peft)
    assert abs(result_a.training_loss - result_b.training_loss) <= 1e-5 * max(1.0, abs(result_a.training_loss))
    start = trained_parameters(lora(fresh_model(tiny_tokenizer)) if peft else fresh_model(tiny_tokenizer))
    pa, pb = trained_parameters(a), trained_parameters(b)
    moved = 0
    for name, before in start.items():
        grad_a, grad_b = before - pa[name], before - pb[name]
        assert torch.allclose(grad_a, grad_b, atol=1e-5), name
        moved += int(grad_a.abs().max() > 0)
    assert moved > 0


def test_full_finetuning_base_history_uses_a_frozen_copy(rows, tiny_tokenizer, tmp_path):
    args = config(tmp_path, token_scorer="sstoken", history_model="base", max_steps=2, per_device_train_batch_size=4,
                  learning_rate=1e-2, optim="adamw_torch")
    trainer, _ = train(rows, tiny_tokenizer, args)
    start = fresh_model(tiny_tokenizer).state_dict()
    frozen = trainer.frozen.state_dict()
    assert all(torch.equal(frozen[n], start[n]) for n in start)  # the history is still the start model
    assert any(not torch.equal(trainer.model.state_dict()[n], start[n]) for n in start)


def test_selection_metrics_and_kept_fraction(rows, tiny_tokenizer, tmp_path):
    args = config(tmp_path, token_scorer="sstoken", history_model="base", select_ratio=0.5, max_steps=2,
                  per_device_train_batch_size=4, learning_rate=1e-3, optim="adamw_torch")
    trainer, _ = train(rows, tiny_tokenizer, args, peft=True)
    logs = [entry for entry in trainer.state.log_history if "kept_fraction" in entry]
    assert logs, trainer.state.log_history
    for entry in logs:
        assert 0.5 <= entry["kept_fraction"] < 0.7  # ceil(0.5 n) per sample
        for key in ("rel_mean", "attention_mean", "loss_kept_tokens", "loss_all_tokens", "history_age"):
            assert key in entry, key
        assert 0.0 <= entry["attention_mean"] <= 1.0


def test_rho1_and_random_train_only_the_adapters(rows, tiny_tokenizer, tmp_path):
    reference = tmp_path / "reference"  # any saved model will do as the clean-data reference here
    fresh_model(tiny_tokenizer, seed=1).save_pretrained(reference)
    for scorer in ("rho1", "random"):
        args = config(tmp_path / scorer, token_scorer=scorer, select_ratio=0.6, max_steps=2,
                      per_device_train_batch_size=4, learning_rate=1e-2, optim="adamw_torch",
                      **({"reference_model": str(reference)} if scorer == "rho1" else {}))
        trainer, _ = train(rows, tiny_tokenizer, args, peft=True)
        start = lora(fresh_model(tiny_tokenizer)).state_dict()
        after = trainer.model.state_dict()
        changed = {n for n in start if not torch.equal(start[n], after[n])}
        assert changed and all("lora_" in n for n in changed), changed


def test_first_changed_layer_is_where_adapters_or_trainable_weights_begin(tiny_tokenizer):
    def with_lora(**options):
        return apply_peft(fresh_model(tiny_tokenizer), {"r": 4, "target_modules": ["q_proj", "v_proj"], **options})

    assert first_changed_layer(with_lora(layers_to_transform=[1])) == 1
    assert first_changed_layer(with_lora()) == 0  # adapters from layer 0 on: nothing to skip
    assert first_changed_layer(with_lora(layers_to_transform=[1], modules_to_save=["embed_tokens"])) == 0
    assert first_changed_layer(with_lora(layers_to_transform=[1], modules_to_save=["lm_head"])) == 1  # after them
    assert first_changed_layer(fresh_model(tiny_tokenizer)) == 0  # full fine-tuning
    frozen_start = fresh_model(tiny_tokenizer)
    for name, parameter in frozen_start.named_parameters():
        parameter.requires_grad = ".layers.1." in name
    assert first_changed_layer(frozen_start) == 1  # the EMA history swaps only layer 1's weights


@pytest.mark.parametrize("history", ["base", "ema"])
def test_history_from_the_first_adapted_layer_is_the_full_history(rows, tiny_tokenizer, tmp_path, history):
    """LoRA on layer 1 only: the history pass starts at layer 1 from the training forward's state there, runs layer
    0 once per step instead of twice, and trains exactly as the full history pass does."""
    runs = {}
    for reuse in (True, False):
        model = apply_peft(fresh_model(tiny_tokenizer), {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                                         "layers_to_transform": [1]})
        calls = []
        model.get_base_model().get_decoder().layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        args = config(tmp_path / str(reuse), token_scorer="sstoken", history_model=history, max_steps=3,
                      per_device_train_batch_size=4, learning_rate=1e-2, optim="adamw_torch", gamma_warmup_steps=0,
                      history_from_first_adapted_layer=reuse, ema_alpha=0.5)
        trainer = TokenLossTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tiny_tokenizer)
        trainer.train()
        logs = [e for e in trainer.state.log_history if "rel_mean" in e]
        runs[reuse] = trainer, logs, len(calls)
    (reused, logs, calls), (full, full_logs, full_calls) = runs[True], runs[False]
    assert reused._history_start == 1 and full._history_start == 0
    assert calls == 3 + 1 and full_calls == 2 * 3  # + 1: the full history pass that checks the first batch
    assert len(logs) == 3 and any(abs(e["rel_mean"]) > 1e-3 for e in logs[1:])  # the history differs from the model
    for ours, theirs in zip(logs, full_logs):
        for key in ("loss", "rel_mean", "attention_mean", "kept_fraction"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


def test_a_history_start_that_disagrees_with_the_full_pass_falls_back(rows, tiny_tokenizer, tmp_path, monkeypatch):
    import tokensieve.trainers.token_loss as token_loss

    real, fed = token_loss.decoder_from_layer, []

    def wrong_state(decoder, start, hidden):
        fed.append(start)
        return real(decoder, start, hidden + 1)

    monkeypatch.setattr(token_loss, "decoder_from_layer", wrong_state)
    model = apply_peft(fresh_model(tiny_tokenizer), {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                                         "layers_to_transform": [1]})
    args = config(tmp_path, token_scorer="sstoken", history_model="base", max_steps=2, per_device_train_batch_size=4)
    trainer = TokenLossTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tiny_tokenizer)
    trainer.train()
    assert fed == [1] and trainer._history_start == 0  # tried once, then the full pass for the rest of the run


def test_none_scorer_matches_plain_sft(rows, tiny_tokenizer, tmp_path):
    _, ours = train(rows[:8], tiny_tokenizer, config(tmp_path / "ours", token_scorer="none"))
    plain = config(tmp_path / "sft", config_class=SFTConfig)
    trainer = SFTTrainer(model=fresh_model(tiny_tokenizer), args=plain, train_dataset=Dataset.from_list(rows[:8]),
                         processing_class=tiny_tokenizer)
    assert abs(trainer.train().training_loss - ours.training_loss) < 1e-5


def test_ema_state_resumes_exactly(rows, tiny_tokenizer, tmp_path):
    common = dict(token_scorer="sstoken", history_model="ema", ema_alpha=0.5, per_device_train_batch_size=4,
                  learning_rate=1e-2, optim="adamw_torch", save_strategy="steps", save_steps=2)
    full, _ = train(rows, tiny_tokenizer, config(tmp_path / "full", max_steps=4, **common), peft=True)
    args = config(tmp_path / "part", max_steps=4, **common)
    part_a = TokenLossTrainer(model=lora(fresh_model(tiny_tokenizer)), args=config(tmp_path / "part", max_steps=2, **common),
                              train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    part_a.train()
    assert (tmp_path / "part/out/checkpoint-2" / EMA_FILE).exists()
    resumed = TokenLossTrainer(model=lora(fresh_model(tiny_tokenizer)), args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tiny_tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part/out/checkpoint-2"))
    assert resumed.ema.updated_at == full.ema.updated_at == 4
    for name, tensor in full.ema.shadow.items():
        assert torch.allclose(tensor, resumed.ema.shadow[name], atol=1e-6), name
    for name, tensor in trained_parameters(full).items():
        assert torch.allclose(tensor, trained_parameters(resumed)[name], atol=1e-6), name
    # The EMA moved away from the start (alpha 0.5) but is not the current adapter either.
    start = trained_parameters(lora(fresh_model(tiny_tokenizer)))
    name = next(iter(full.ema.shadow))
    assert not torch.equal(full.ema.shadow[name], start[name.removeprefix("base_model.model.")])


def test_lora_export_loads_with_plain_peft(rows, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    trainer, _ = train(rows, tiny_tokenizer, config(tmp_path, token_scorer="prior", max_steps=2, learning_rate=1e-2,
                                                    optim="adamw_torch", per_device_train_batch_size=4), peft=True)
    trainer.save_model(str(tmp_path / "export"))
    loaded = PeftModel.from_pretrained(fresh_model(tiny_tokenizer), str(tmp_path / "export")).eval()
    ids = torch.tensor([tiny_tokenizer("record 3 : key k3 maps to")["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-5)


def test_token_weights_of_the_wrong_length_name_the_example(rows, tiny_tokenizer, tmp_path):
    bad = [dict(r) for r in rows]
    bad[5]["token_weights"] = bad[5]["token_weights"] + [1.0]
    with pytest.raises(DataError, match=r"example 5: column 'token_weights' has \d+ values but the example has \d+"):
        TokenLossTrainer(model=fresh_model(tiny_tokenizer), args=config(tmp_path, token_scorer="column"),
                         train_dataset=Dataset.from_list(bad), processing_class=tiny_tokenizer)
    missing = [{k: v for k, v in r.items() if k != "history_loss"} for r in rows]
    with pytest.raises(DataError, match="column 'history_loss'"):
        TokenLossTrainer(model=fresh_model(tiny_tokenizer), args=config(tmp_path, history_model="offline"),
                         train_dataset=Dataset.from_list(missing), processing_class=tiny_tokenizer)


@pytest.mark.parametrize("key, value", [("select_ratio", 0.0), ("select_ratio", 1.5), ("token_scorer", "magic"),
                                        ("history_model", "future"), ("gamma", 2.0)])
def test_config_rejects_out_of_range_values(tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        config(tmp_path, **{key: value})


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(rows, tiny_tokenizer, tmp_path, monkeypatch):
    from tokensieve.errors import TrainingError

    args = config(tmp_path, token_scorer="none", max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                  optim="adamw_torch", save_strategy="steps", save_steps=1)
    trainer = TokenLossTrainer(model=fresh_model(tiny_tokenizer), args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tiny_tokenizer)
    original = TokenLossTrainer.compute_loss

    def poisoned(self, *a, **k):
        loss = original(self, *a, **k)
        return loss * float("nan") if self.state.global_step == 2 else loss

    monkeypatch.setattr(TokenLossTrainer, "compute_loss", poisoned)
    with pytest.raises(TrainingError, match="step 3: the loss is not finite"):
        trainer.train()
    checkpoints = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

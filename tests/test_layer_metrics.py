"""Per-layer metrics of the gate trainer: a summary on the console, every layer in the log history and in W&B."""

import re

import pytest
import torch
from datasets import Dataset
from test_retention import fresh_model, tiny_rows
from transformers import TrainerCallback

from tokensieve.trainers.retention import RetentionConfig, RetentionTrainer

LAYERS = 4
PER_LAYER_KEY = re.compile(r"beta_mean_layer\d+$")


class SeenLogs(TrainerCallback):
    """A copy of every `logs` dict the reporters get (the console's and W&B's input)."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train_llama_gates(tokenizer, tmp_path, eval_rows=None, **kwargs):
    """Two steps of a 4-layer llama's gates, logging every step."""
    options = dict(output_dir=str(tmp_path / "gates"), max_steps=2, per_device_train_batch_size=8,
                   learning_rate=1e-2, memory_size=4, gate_intermediate_size=16, gate_bias_init=2.0, report_to="none",
                   use_cpu=True, bf16=False, activation_checkpointing=False, save_strategy="no", logging_steps=1)
    seen = SeenLogs()
    trainer = RetentionTrainer(model=fresh_model(tokenizer, "llama", num_hidden_layers=LAYERS),
                               args=RetentionConfig(**{**options, **kwargs}),
                               train_dataset=Dataset.from_list(tiny_rows()), processing_class=tokenizer,
                               eval_dataset=eval_rows and Dataset.from_list(eval_rows), callbacks=[seen])
    trainer.train()
    steps = [e for e in trainer.state.log_history if "beta_mean" in e]
    assert [e["step"] for e in steps] == [1, 2]
    return trainer, seen.logs, steps


def test_console_shows_a_summary_and_the_history_keeps_every_layer(tiny_tokenizer, tmp_path, capfd):
    trainer, seen, steps = train_llama_gates(tiny_tokenizer, tmp_path)
    printed = [line for line in capfd.readouterr().out.splitlines() if "'beta_mean'" in line]
    assert len(printed) == 2, printed
    assert all("beta_mean_layer_min" in line and not re.search(r"beta_mean_layer\d|_by_layer", line)
               for line in printed), printed
    for logs in seen:
        assert not [k for k in logs if PER_LAYER_KEY.search(k) or k.endswith("_by_layer")], logs
    for logs, entry in zip([s for s in seen if "beta_mean" in s], steps):
        values = entry["beta_mean_by_layer"]
        assert len(values) == LAYERS and len(set(values)) == LAYERS  # one distinct mean per layer
        assert logs["beta_mean_layer_min"] == entry["beta_mean_layer_min"] == min(values)
        assert logs["beta_mean_layer_max"] == entry["beta_mean_layer_max"] == max(values)
        assert logs["beta_mean_layer_argmin"] == values.index(min(values))
        # every layer has as many (token, kv head) entries, so the layers' mean is the overall mean
        assert logs["beta_mean"] == pytest.approx(sum(values) / LAYERS, rel=1e-5)
    assert not any(PER_LAYER_KEY.search(k) for e in trainer.state.log_history for k in e)


def test_evaluation_logs_the_same_under_the_eval_prefix(tiny_tokenizer, tmp_path):
    trainer, _, _ = train_llama_gates(tiny_tokenizer, tmp_path, eval_rows=tiny_rows(8))
    metrics = trainer.evaluate()
    values = trainer.state.log_history[-1]["eval_beta_mean_by_layer"]
    assert len(values) == LAYERS and metrics["eval_beta_mean_layer_min"] == min(values)
    assert metrics["eval_beta_mean_layer_max"] == max(values) and "eval_beta_mean_by_layer" not in metrics
    assert not [k for k in metrics if PER_LAYER_KEY.search(k)]


def test_layer_means_average_the_micro_batches_of_a_log_step(tiny_tokenizer, tmp_path):
    trainer, _, _ = train_llama_gates(tiny_tokenizer, tmp_path)
    trainer.model.train()
    trainer.log_layer_means("train", "beta_mean", torch.tensor([0.2, 0.9, 0.5, 0.4]))
    trainer.log_layer_means("train", "beta_mean", torch.tensor([0.4, 0.7, 0.1, 0.6]))
    logs = {}
    trainer.log(logs)
    assert trainer.state.log_history[-1]["beta_mean_by_layer"] == pytest.approx([0.3, 0.8, 0.3, 0.5])
    assert logs["beta_mean_layer_min"] == pytest.approx(0.3) and logs["beta_mean_layer_argmin"] == 0
    assert logs["beta_mean_layer_max"] == pytest.approx(0.8)
    logs = {}
    trainer.log(logs)  # recorded values are logged once
    assert "beta_mean_layer_min" not in logs and "beta_mean_by_layer" not in trainer.state.log_history[-1]


def test_every_layer_reaches_wandb_in_its_own_section(tiny_tokenizer, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # wandb keeps its settings once set up (another test may have changed them): read ours
    logged, log = [], wandb.Run.log  # the run's method: wandb.init rebinds the module's wandb.log to it

    def recording_log(run, data, *args, **kwargs):
        logged.append(dict(data))
        return log(run, data, *args, **kwargs)  # still into the offline run

    monkeypatch.setattr(wandb.Run, "log", recording_log)
    try:
        _, seen, steps = train_llama_gates(tiny_tokenizer, tmp_path, report_to=["wandb"])
    finally:
        wandb.finish()
    names = [f"beta_mean_by_layer/layer_{i:02d}" for i in range(LAYERS)]
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))  # a real offline run got the records below
    by_layer = [d for d in logged if names[0] in d]
    assert [d["train/global_step"] for d in by_layer] == [1, 2]
    for record, entry in zip(by_layer, steps):
        assert sorted(record) == sorted(names + ["train/global_step"])
        assert [record[n] for n in names] == entry["beta_mean_by_layer"]
    scalars = [d for d in logged if "train/beta_mean" in d]  # transformers' W&B callback: the console's keys
    assert len(scalars) == 2 and all("train/beta_mean_layer_min" in d for d in scalars)
    assert not [k for d in scalars for k in d if PER_LAYER_KEY.search(k) or "_by_layer" in k]

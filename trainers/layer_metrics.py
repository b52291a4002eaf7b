"""Per-layer metrics kept out of the console: one summary per log step there, the whole vector in W&B and history.

A trainer records a vector of one value per layer with `log_layer_means(mode, "beta_mean", values)`; each vector is
averaged over the ranks when recorded and over the micro-batches of a log step when logged, as `log_means` does for
scalars. At every log step, for each such metric `name`:
    console and `logs`     `name_layer_min`, `name_layer_max`, `name_layer_argmin` (the layer with the minimum);
    `state.log_history`    also `name_by_layer`: the list of per-layer values (so in trainer_state.json too);
    W&B (report_to wandb)  `name_by_layer/layer_00` ... as scalars against train/global_step.
Evaluation logs carry the `eval_` prefix on every key, as TRL's metrics do.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class LayerMetrics:
    """Mixin (before TRL's trainer among the bases) for a trainer that records per-layer metrics (module docstring)."""

    def __init__(self, *args, **kwargs):
        self._layer_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(*args, **kwargs)

    def log_layer_means(self, mode: str, name: str, values: torch.Tensor) -> None:
        """One value per layer, averaged over the ranks, into the trainer's logged per-layer metrics."""
        vector = torch.as_tensor(values, device=self.args.device).detach().float().flatten()
        gathered = self.accelerator.gather_for_metrics(vector[None])
        self._layer_metrics[mode][name].append(gathered.mean(0).tolist())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        layers = {name: torch.tensor(vectors).mean(0).tolist() for name, vectors in self._layer_metrics[mode].items()}
        self._layer_metrics[mode].clear()
        for name, values in layers.items():  # into TRL's metrics, which log() prefixes and sends with the others
            lowest = min(range(len(values)), key=values.__getitem__)
            summary = {"layer_min": values[lowest], "layer_max": max(values), "layer_argmin": lowest}
            for key, value in summary.items():
                self._metrics[mode][f"{name}_{key}"].append(value)
        super().log(logs, start_time)
        if not layers:
            return
        self.state.log_history[-1].update({f"{prefix}{name}_by_layer": values for name, values in layers.items()})
        self._log_layers_to_wandb(prefix, layers)

    def _log_layers_to_wandb(self, prefix: str, layers: dict[str, list[float]]) -> None:
        """Scalars under one prefix per metric, not a wandb.Table or line_series per step: W&B puts them in a section
        of its own, one live chart per layer against train/global_step that runs can be compared on (and a panel
        can overlay with a regex), where a table or custom chart is a new file per step showing one step at a time."""
        if "wandb" not in (self.args.report_to or []) or not self.state.is_world_process_zero:
            return
        import wandb

        if wandb.run is None:
            return
        record = {"train/global_step": self.state.global_step}  # the x-axis transformers' W&B callback defines
        for name, values in layers.items():
            width = max(2, len(str(len(values) - 1)))  # zero-padded: W&B sorts the panels by name
            record.update({f"{prefix}{name}_by_layer/layer_{i:0{width}d}": v for i, v in enumerate(values)})
        wandb.log(record)

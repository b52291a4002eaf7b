"""Where a RetentionCache's slots go: token kinds from the recall tasks' ground truth, the cache's content at answer
time, per layer and kv head, and a retention map (tokens x layers/heads, kept or evicted, coloured by beta).

    kinds      every prompt token of an mqar or needle-qa row labelled from the row's own fields (`pair_positions`,
               `needle_position`): mqar key / value / filler / question; needle-qa needle (the asked fact) and the
               other facts' name / value / other (relation, period), question; bos for special tokens; a real-prose
               retrieval row (passkey, named-keys, facts: `needle_char_span`) gives first (its first 4 tokens),
               answer, needle (the rest of the asked statement), distractor (the other statements), cue (after the
               last blank line), punctuation and prose;
    snapshot   the prompt prefilled in chunks of the buffer into a RetentionCache of (M, buffer), as at inference;
               which tokens each (layer, kv head) still holds when the answer is generated, and every token's beta;
    shares     per (layer, kv head), the share of the held slots taken by each kind, and whether the asked pair (mqar:
               the queried key and its value; needle-qa: the needle fact's value) survived.
`RetentionMapCallback` logs the map of one fixed row to W&B as an image (and writes the PNG) every N steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from tokensieve.files import replace_atomically
from tokensieve.selectors.attention import attention_modules, collected_log_beta, gates_of
from tokensieve.selectors.kv_cache import RetentionCache
from tokensieve.upstream import with_cache

MQAR_KINDS = ("bos", "key", "value", "filler", "question")
NEEDLE_KINDS = ("bos", "needle", "name", "value", "other", "question")  # other: relations and periods
REAL_KINDS = ("bos", "first", "answer", "needle", "distractor", "cue", "punctuation", "prose")
FIRST_TOKENS = 4  # a real row's first tokens, labelled apart (where attention sinks are)


def _word_of_token(prompt: str, offsets: list[tuple[int, int]]) -> list[int]:
    """The index of the space-separated word each token ends in (-1 for special tokens, which have no span)."""
    starts, position = [], 0
    for word in prompt.split(" "):
        starts.append(position)
        position += len(word) + 1
    words = []
    for start, end in offsets:
        if end <= start:
            words.append(-1)
            continue
        last = end - 1
        words.append(max(i for i, s in enumerate(starts) if s <= last))
    return words


def real_token_kinds(row: dict, tokenizer) -> tuple[torch.Tensor, list[str], list[int], list[int]]:
    """`recall_token_kinds` of a real-prose retrieval row, from its character spans (so any tokenizer, special tokens
    included, labels alike). The asked tokens are those of the answer."""
    prompt = row["prompt"]
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    answers = [tuple(span) for span in row["answer_char_spans"]]
    needle = tuple(row["needle_char_span"])
    others = [tuple(d["char_span"]) for d in row.get("distractors", [])]
    cue = prompt.rfind("\n\n") + 2

    def inside(start, end, span):
        return span[0] <= start and end <= span[1]

    kinds, real = [], 0
    for start, end in encoded["offset_mapping"]:
        if end <= start:
            kinds.append("bos")
            continue
        real += 1
        text = prompt[start:end].strip()
        if any(inside(start, end, span) for span in answers):
            kinds.append("answer")
        elif inside(start, end, needle):
            kinds.append("needle")
        elif any(inside(start, end, span) for span in others):
            kinds.append("distractor")
        elif start >= cue:
            kinds.append("cue")
        elif real <= FIRST_TOKENS:
            kinds.append("first")
        elif not any(c.isalnum() for c in text):
            kinds.append("punctuation")
        else:
            kinds.append("prose")
    asked = [i for i, kind in enumerate(kinds) if kind == "answer"]
    return torch.tensor(encoded["input_ids"]), kinds, list(REAL_KINDS), asked


def recall_token_kinds(row: dict, tokenizer) -> tuple[torch.Tensor, list[str], list[int], list[int]]:
    """(input ids [T], the kind of each prompt token, kind names, the asked tokens' indices) of an mqar or needle-qa
    row. The asked tokens are the queried key and its value (mqar) or the needle fact's value (needle-qa). A
    real-prose retrieval row goes to `real_token_kinds`."""
    if "needle_char_span" in row:
        return real_token_kinds(row, tokenizer)
    prompt = row["prompt"]
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    word_of = _word_of_token(prompt, encoded["offset_mapping"])
    words = prompt.split(" ")
    question = max(i for i, w in enumerate(words) if w == "?")
    if "pair_positions" in row:
        names = MQAR_KINDS
        keys = set(row["pair_positions"])
        asked_key = next(p for p in row["pair_positions"] if words[p] == row["queries"][0])
        asked_words = {asked_key, asked_key + 1}

        def kind(w):
            return "question" if w >= question else "key" if w in keys else "value" if w - 1 in keys else "filler"
    elif "needle_position" in row:
        names = NEEDLE_KINDS
        needle = row["needle_position"]
        asked_words = {needle + 2}  # relation, name, value, "."

        roles = {1: "name", 2: "value"}  # a fact is "relation name value ."

        def kind(w):
            if w >= question:
                return "question"
            return "needle" if needle <= w < needle + 4 else roles.get(w % 4, "other")
    else:
        raise ValueError("a retention map needs an mqar row (pair_positions), a needle-qa row (needle_position) or a "
                         "real-prose retrieval row (needle_char_span)")
    kinds = ["bos" if w < 0 else kind(w) for w in word_of]
    asked = [i for i, w in enumerate(word_of) if w in asked_words]
    return torch.tensor(encoded["input_ids"]), kinds, list(names), asked


@dataclass
class Snapshot:
    kept: torch.Tensor  # [layers, kv heads, T] bool: held by the cache when the answer is generated
    log_beta: torch.Tensor  # [layers, kv heads, T]


@torch.no_grad()
def retention_snapshot(model, input_ids: torch.Tensor, memory_size: int, buffer_size: int,
                       decayed_attention: bool = False) -> Snapshot:
    """Prefill one prompt [T] in chunks of the buffer into a RetentionCache (as at inference, with the cache's
    attention plain or decayed) and read what each layer and kv head holds afterwards; the betas come from one
    forward without a cache (gates on)."""
    gates_of(model)  # a clear error if the model has no gates
    device = next(model.parameters()).device
    ids = input_ids[None].to(device)
    model(input_ids=ids, use_cache=False)
    layers = len(attention_modules(model))
    log_beta = collected_log_beta(model)[0].view(layers, -1, ids.shape[1]).float().cpu()
    cache = RetentionCache.for_model(model, memory_size, buffer_size, decayed_attention=decayed_attention)
    for start in range(0, ids.shape[1], buffer_size):
        model(input_ids=ids[:, start:start + buffer_size], use_cache=True, logits_to_keep=1,
              **with_cache(model, cache))
    # The next update (the first answer token) evicts first if the cache is full: that is what the answer reads.
    kept = torch.zeros(layers, log_beta.shape[1], ids.shape[1], dtype=torch.bool)
    for index, layer in enumerate(cache.layers):
        keep = layer.kept_before(1)
        if keep < layer.physical_length():
            layer.evict(keep)
        positions = layer.positions[0].cpu()  # [H, L]
        valid = layer.valid[0].cpu()
        for head in range(positions.shape[0]):
            kept[index, head, positions[head][valid[head]]] = True
    return Snapshot(kept=kept, log_beta=log_beta)


def slot_shares(snapshot: Snapshot, kinds: list[str], names: list[str], asked: list[int]) -> dict:
    """Per (layer, kv head): the share of held slots taken by each kind, and whether every asked token is held."""
    kind_ids = torch.tensor([names.index(k) for k in kinds])
    held = snapshot.kept.float()  # [layers, H, T]
    total = held.sum(-1).clamp(min=1)
    shares = {name: (held * (kind_ids == i)).sum(-1) / total for i, name in enumerate(names)}
    survived = snapshot.kept[..., asked].all(-1) if asked else torch.ones(held.shape[:2], dtype=torch.bool)
    return {"shares": shares, "asked_survived": survived, "slots": held.sum(-1)}


KIND_COLOURS = {"bos": "#000000", "key": "#d62728", "value": "#2ca02c", "filler": "#c7c7c7", "question": "#1f77b4",
                "needle": "#9467bd", "name": "#ff7f0e", "other": "#c7c7c7", "first": "#8c564b", "answer": "#2ca02c",
                "distractor": "#ff7f0e", "cue": "#1f77b4", "punctuation": "#e377c2", "prose": "#c7c7c7"}


def plot_retention_map(snapshot: Snapshot, kinds: list[str], path: Path, title: str = "") -> Path:
    """PNG: one row per (layer, kv head), one column per prompt token; colour = beta, evicted tokens faded, and a
    strip of token kinds on top. Written to a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    layers, heads, length = snapshot.kept.shape
    beta = snapshot.log_beta.exp().reshape(layers * heads, length)
    kept = snapshot.kept.reshape(layers * heads, length)
    colours = plt.get_cmap("viridis")(beta.numpy())  # [rows, T, 4]
    colours[~kept.numpy(), 3] = 0.15
    strip = torch.tensor([to_rgb(KIND_COLOURS[k]) for k in kinds]).numpy()[None]
    figure, (top, axis) = plt.subplots(2, 1, figsize=(min(2 + length / 12, 24), 1.2 + 0.35 * layers * heads),
                                       gridspec_kw={"height_ratios": [1, max(layers * heads, 1)]}, sharex=True,
                                       layout="constrained")  # no gap between the strip and the map on tall maps
    top.imshow(strip, aspect="auto", interpolation="nearest")
    top.set_yticks([])
    top.set_title(title or "retention map: kept (opaque) / evicted (faded), colour = beta; top strip = token kind",
                  fontsize=8)
    axis.imshow(colours, aspect="auto", interpolation="nearest")
    axis.set_yticks(range(layers * heads), [f"L{i // heads} H{i % heads}" for i in range(layers * heads)], fontsize=7)
    axis.set_xlabel("prompt token")
    handles = [matplotlib.patches.Patch(color=KIND_COLOURS[k], label=k) for k in dict.fromkeys(kinds)]
    figure.legend(handles=handles, loc="outside upper right", fontsize=7, ncol=len(handles))
    figure.colorbar(plt.cm.ScalarMappable(cmap="viridis"), ax=[top, axis], label="beta", fraction=0.03)  # both: aligned
    try:
        return replace_atomically(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(figure)


class RetentionMapCallback(TrainerCallback):
    """Every `every` optimizer steps: the retention map of one fixed row, written to
    `output_dir/retention_maps/step_N.png` and logged to W&B as an image when W&B is reporting."""

    def __init__(self, trainer, row: dict, every: int):
        self.trainer, self.every = trainer, every
        self.ids, self.kinds, _, _ = recall_token_kinds(row, trainer.processing_class)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or state.global_step % self.every:
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        model.eval()
        try:
            snapshot = retention_snapshot(model, self.ids, args.memory_size, args.buffer_size,
                                          decayed_attention=args.inference_attention == "decayed")
        finally:
            model.train(was_training)
        path = plot_retention_map(snapshot, self.kinds, Path(args.output_dir) / "retention_maps" /
                                  f"step_{state.global_step}.png",
                                  title=f"step {state.global_step}: M = {args.memory_size}, buffer {args.buffer_size}")
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:  # with the step as transformers' W&B callback records it
                wandb.log({"retention_map": wandb.Image(str(path)), "train/global_step": state.global_step})

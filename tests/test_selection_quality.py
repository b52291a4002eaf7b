"""Selection scored against ground truth: the metrics by hand, the noisy-recall generator's ground truth, its
per-token form after tokenization, and the trainer's truth_* metrics."""

import json

import pytest
import torch
from datasets import Dataset

from tokensieve.data.synthetic import TASKS, build_options, make_task
from tokensieve.data.synthetic.mqar import VALUES
from tokensieve.data.synthetic.noisy_recall import NOISE_POOL
from tokensieve.data.tokenize import tokenize_prompt_completion
from tokensieve.errors import TokensieveError
from tokensieve.selectors.selection_quality import (KIND_IDS, KINDS_COLUMN, auroc, kinds_from_spans,
                                                    selection_quality)

OTHER, CLEAN, UNLEARNABLE, LEARNABLE = (KIND_IDS[k] for k in ("other", "clean", "unlearnable", "learnable"))


def test_auroc_by_hand():
    # pairs: 0.9 > 0.5, 0.9 > 0.1, 0.5 = 0.5 (half), 0.5 > 0.1 -> 3.5 / 4
    assert auroc(torch.tensor([0.9, 0.5]), torch.tensor([0.5, 0.1])) == pytest.approx(0.875)
    assert auroc(torch.tensor([0.0, 0.1]), torch.tensor([0.5, 0.9])) == 0.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0, 1.0])) == 0.5
    assert auroc(torch.tensor([]), torch.tensor([1.0])) is None


def test_selection_quality_on_a_hand_built_batch():
    kinds = torch.tensor([[CLEAN, CLEAN, UNLEARNABLE, LEARNABLE, OTHER, 0],
                          [CLEAN, UNLEARNABLE, UNLEARNABLE, LEARNABLE, 0, 0]])
    mask = kinds > 0
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.85, 0.5, 0.0],
                           [0.2, 0.3, 0.05, 0.95, 0.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0],  # the 1.0 outside the mask is ignored
                            [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    got = selection_quality(scores, weights, kinds, mask)
    assert got["tokens_clean"] == 3 and got["tokens_unlearnable"] == 3 and got["tokens_learnable"] == 2
    assert got["kept_clean"] == pytest.approx(1.0)
    assert got["kept_unlearnable"] == pytest.approx(0.0)
    assert got["kept_learnable"] == pytest.approx(1.0)
    assert got["kept_other"] == pytest.approx(0.0) and got["tokens_other"] == 1
    assert got["weight_clean"] == pytest.approx(1.0)
    # clean 0.9, 0.8, 0.2 vs unlearnable 0.1, 0.3, 0.05: 8 of 9 pairs above -> 8/9
    assert got["auroc_clean_vs_unlearnable"] == pytest.approx(8 / 9)
    # clean vs learnable 0.85, 0.95: only 0.9 > 0.85 -> 1/6
    assert got["auroc_clean_vs_learnable"] == pytest.approx(1 / 6)


def test_kinds_from_spans():
    # "Q A" + " rol ? FEP sud": completion starts at 3; tokens by character offsets of the full text
    offsets = [(0, 1), (1, 3), (3, 7), (7, 9), (9, 13), (13, 17)]
    spans = [{"start": 1, "end": 4, "kind": "learnable"}, {"start": 11, "end": 14, "kind": "clean"}]
    assert kinds_from_spans(offsets, 3, spans) == [0, 0, LEARNABLE, OTHER, OTHER, CLEAN]
    with pytest.raises(ValueError, match="unknown token kind 'bogus'"):
        kinds_from_spans([(3, 7)], 3, [{"start": 0, "end": 4, "kind": "bogus"}])


def test_noisy_recall_is_deterministic_and_its_spans_point_at_the_noised_words(tmp_path):
    options = build_options("noisy-recall", {"unlearnable_share": 0.3, "learnable_share": 0.4})
    rows = TASKS["noisy-recall"].generate("train", 300, 7, options)
    assert rows == TASKS["noisy-recall"].generate("train", 300, 7, options)
    assert rows != TASKS["noisy-recall"].generate("train", 300, 8, options)
    counts = {"clean": 0, "unlearnable": 0, "learnable": 0}
    for row in rows:
        words = row["prompt"].split()[:-2]  # the context, without " ? KEY"
        binding = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].isupper()}
        assert len(row["noise_spans"]) == len(row["answers"]) == len(row["queries"]) == 8
        assert row["prompt"].endswith(" ? " + row["queries"][0])
        for span, answer, key in zip(row["noise_spans"], row["answers"], row["queries"]):
            assert binding[key] == answer
            start, end, kind = span["start"], span["end"], span["kind"]
            word = row["completion"][start:end]
            counts[kind] += 1
            assert row["completion"][start - 1] == " "
            if kind == "clean":
                assert word == answer
            elif kind == "learnable":  # the asked key, echoed
                assert word == key
            else:
                assert word != answer and word in NOISE_POOL
    total = sum(counts.values())
    assert abs(counts["unlearnable"] / total - 0.3) < 0.05 and abs(counts["learnable"] / total - 0.4) < 0.05
    test = TASKS["noisy-recall"].generate("test", 50, 7, options)
    assert all(r["noise_spans"] == [{"start": 1, "end": len(r["completion"]), "kind": "clean"}] and r["completion"] == " " + r["answer"]
               and r["answer"] in VALUES for r in test)
    with pytest.raises(TokensieveError, match="unlearnable_share \\+ learnable_share must be <= 1"):
        build_options("noisy-recall", {"unlearnable_share": 0.6, "learnable_share": 0.6})
    written = make_task("noisy-recall", tmp_path, n=20, seed=3, learnable_share=0.5)
    assert json.loads(written["meta"].read_text())["options"]["learnable_share"] == 0.5


def test_mapped_recall_answers_the_partner_and_marks_noise_and_boilerplate(tiny_tokenizer):
    from tokensieve.data.synthetic.mapped_recall import MAPPING

    assert sorted(MAPPING) == sorted(MAPPING.values()) == sorted(VALUES)  # a permutation of the values...
    assert all(value != partner for value, partner in MAPPING.items())  # ...that moves every one
    options = build_options("mapped-recall", {"unlearnable_share": 0.3, "learnable_share": 0.4, "boilerplate_words": 5})
    rows = TASKS["mapped-recall"].generate("train", 300, 7, options)
    assert rows == TASKS["mapped-recall"].generate("train", 300, 7, options)
    counts = {"clean": 0, "unlearnable": 0, "learnable": 0}
    for row in rows:
        words = row["prompt"].split()[:-2]  # the context, without " ? KEY"
        binding = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].isupper()}
        *answer_spans, tail = row["noise_spans"]
        assert tail["kind"] == "boilerplate" and row["completion"][tail["start"]:tail["end"]] == " ".join(words[:5])
        assert row["completion"].endswith(" ; " + " ".join(words[:5]))
        for span, answer, key in zip(answer_spans, row["answers"], row["queries"], strict=True):
            assert answer == MAPPING[binding[key]]  # the partner of the bound value, never the value itself
            word = row["completion"][span["start"]:span["end"]]
            counts[span["kind"]] += 1
            assert word == {"clean": answer, "learnable": key}.get(span["kind"], word)
            assert span["kind"] != "unlearnable" or (word != answer and word in NOISE_POOL)
    total = sum(counts.values())
    assert abs(counts["unlearnable"] / total - 0.3) < 0.05 and abs(counts["learnable"] / total - 0.4) < 0.05
    test = TASKS["mapped-recall"].generate("test", 50, 7, options)
    for row in test:  # one clean question, no boilerplate; the bound value (what recall answers) is wrong
        words = row["prompt"].split()
        bound = words[words.index(row["queries"][0]) + 1]
        assert row["completion"] == " " + row["answer"] and row["answer"] == MAPPING[bound] != bound
        assert row["noise_spans"] == [{"start": 1, "end": len(row["completion"]), "kind": "clean"}]
    dataset = tokenize_prompt_completion(Dataset.from_list(rows[:10]), tiny_tokenizer)
    for row, tokenized in zip(rows, dataset):
        response = [t for t, label in zip(tokenized["input_ids"], tokenized["labels"]) if label != -100]
        boilerplate = [t for t, kind in zip(response, tokenized[KINDS_COLUMN]) if kind == KIND_IDS["boilerplate"]]
        assert tiny_tokenizer.decode(boilerplate).replace(" ", "") == row["completion"].split(" ; ")[1].replace(" ", "")
    with pytest.raises(TokensieveError, match="boilerplate_words must be in"):
        build_options("mapped-recall", {"boilerplate_words": 100})


def test_tokenized_kinds_line_up_with_the_response_tokens(tiny_tokenizer):
    options = build_options("noisy-recall", {"unlearnable_share": 0.3, "learnable_share": 0.4})
    rows = TASKS["noisy-recall"].generate("train", 20, 1, options)
    dataset = tokenize_prompt_completion(Dataset.from_list(rows), tiny_tokenizer)
    for row in dataset:
        response = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        kinds = row[KINDS_COLUMN]
        assert len(kinds) == len(response)
        text = {kind: "" for kind in KIND_IDS.values()}
        for token, kind in zip(response, kinds):
            text[kind] += tiny_tokenizer.decode([token])
        # A value's tokens carry its kind; a token of the separating space alone (this tokenizer splits it off;
        # a BPE that merges " word" does not) is "other".
        spans = {name: "".join(row["completion"][s["start"]:s["end"]] for s in row["noise_spans"]
                               if s["kind"] == name)
                 for name in ("clean", "unlearnable", "learnable")}
        for name, expected in spans.items():
            assert text[KIND_IDS[name]].replace(" ", "") == expected, (name, text, row["completion"])
        assert tiny_tokenizer.eos_token in text[OTHER]  # the questions and EOS are "other"


@pytest.mark.parametrize("task", ["noisy-recall", "mapped-recall"])
def test_trainer_logs_selection_against_the_truth(task, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from tokensieve.launch.model import FromScratchArguments, build_config
    from tokensieve.trainers.token_loss import TokenLossConfig, TokenLossTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(
        FromScratchArguments(architecture="qwen3", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256), tiny_tokenizer))
    options = build_options(task, {"context_words": 20, "num_pairs": 4})
    rows = TASKS[task].generate("train", 16, 0, options)
    dataset = tokenize_prompt_completion(Dataset.from_list(rows), tiny_tokenizer)
    args = TokenLossConfig(output_dir=str(tmp_path), token_scorer="random", max_steps=2, per_device_train_batch_size=8,
                           logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                           activation_checkpointing=False)
    trainer = TokenLossTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "truth_kept_clean" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("truth_kept_unlearnable", "truth_kept_learnable", "truth_kept_other", "truth_weight_clean",
                    "truth_auroc_clean_vs_unlearnable", "truth_auroc_clean_vs_learnable"):
            assert key in entry, key
        assert 0.3 < entry["truth_kept_clean"] < 0.9  # random selection at 0.6
        assert 0.0 <= entry["truth_auroc_clean_vs_learnable"] <= 1.0
        # boilerplate is logged only where the rows have it (mapped-recall ends every training row with some)
        assert ("truth_kept_boilerplate" in entry) == (task == "mapped-recall")
        assert ("truth_auroc_clean_vs_boilerplate" in entry) == (task == "mapped-recall")

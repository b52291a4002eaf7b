"""Query selectors: the threshold solver and masks by hand, the selector module, LM plumbing, trainer and export."""

import json
import math
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tokensieve.errors import ModelError
from tokensieve.launch.model import FromScratchArguments, build_config
from tokensieve.selectors.query_selector import QuerySelector, position_scores, promptdistill_scores, smooth
from tokensieve.selectors.topn import hard_top_n, solve_threshold, straight_through_mask
from tokensieve.selectors.keep_attention import KEEP_ATTENTION
from tokensieve.trainers.query_selector import QuerySelectorConfig, QuerySelectorTrainer, key_keep_vector
from tokensieve.trainers.selector_lm import SelectorPipeline, lm_features, reduced_inputs


def fresh_model(tokenizer, architecture="qwen3", seed=0):
    torch.manual_seed(seed)
    spec = FromScratchArguments(architecture=architecture, max_position_embeddings=256, num_hidden_layers=3)
    return AutoModelForCausalLM.from_config(build_config(spec, tokenizer)).eval()


def test_solve_threshold_hits_the_target_and_is_differentiable():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7], [0.2, 0.8, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    target = torch.tensor([2.0, 1.0], requires_grad=True)
    t = solve_threshold(scores, target, tau=0.1, mask=mask)
    soft = torch.sigmoid((scores - t[:, None]) / 0.1) * mask
    assert torch.allclose(soft.sum(-1), target.detach(), atol=1e-4)
    assert 0.5 < t[0].item() < 0.7  # between the 2nd and 3rd highest scores
    t.sum().backward()
    assert (target.grad < 0).all()  # keeping more tokens lowers the threshold
    with pytest.raises(ValueError, match="tau"):
        solve_threshold(scores, target, tau=0.0)


def test_straight_through_mask_is_hard_with_a_gradient():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.01, 0.02, 0.03]], requires_grad=True)
    threshold = torch.tensor([0.4, 0.5])
    for gumbel in (False, True):
        torch.manual_seed(0)
        keep = straight_through_mask(scores, threshold, tau=0.1, gumbel=gumbel)
        hard = keep.detach().round()
        assert torch.allclose(keep.detach(), hard, atol=1e-6) and set(hard.flatten().tolist()) <= {0.0, 1.0}
        assert (hard.sum(-1) >= 1).all()  # row 1 has nothing above 0.5: its best token is forced in
        if not gumbel:
            assert hard.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
        (keep * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        assert scores.grad.abs().sum() > 0
        scores.grad = None


@pytest.mark.parametrize("n, rho, tau", [(200, 0.2, 0.1), (64, 6 / 64, 0.1), (500, 0.05, 0.3), (300, 0.5, 1.0),
                                         (128, 0.1, 0.03)])
def test_gumbel_mask_keeps_the_target_count_on_average(n, rho, tau):
    """Over many draws the hard Gumbel mask keeps rho * N tokens on average, for any tau (issue 18: it used to keep
    tokens with probability sigmoid(r - t) whatever tau was, e.g. 85 of a target 40 at N = 200, tau 0.1)."""
    torch.manual_seed(0)
    draws = 400
    scores = torch.randn(1, n).expand(draws, n).contiguous()  # one row, many draws of the noise
    target = torch.full((draws,), rho * n)
    threshold = solve_threshold(scores, target, tau)
    keep = straight_through_mask(scores, threshold, tau, gumbel=True)
    assert abs(keep.detach().sum(-1).mean().item() - rho * n) <= max(0.03 * rho * n, 0.5)


def test_hard_top_n_keeps_the_best_in_original_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8], [0.5, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    keep = hard_top_n(scores, torch.tensor([2, 5]), mask)
    assert keep.tolist() == [[False, True, False, True], [True, True, False, False]]
    assert hard_top_n(scores, 0, mask).sum(-1).tolist() == [1, 1]  # at least one


def test_query_selector_training_and_inference_modes():
    torch.manual_seed(0)
    selector = QuerySelector(hidden_size=16, num_heads=2, budget_hidden=8, rho_min=0.1, rho_max=0.5)
    candidates, query = torch.randn(3, 20, 16), torch.randn(3, 4, 16)
    cmask = torch.ones(3, 20, dtype=torch.bool)
    cmask[2, 12:] = False
    qmask = torch.ones(3, 4, dtype=torch.bool)
    selection = selector.train()(candidates, cmask, query, qmask)
    assert ((selection.rho >= 0.1) & (selection.rho <= 0.5)).all()
    assert not (selection.keep.detach().bool() & ~cmask).any()
    loss = (selection.keep * torch.arange(20.0)).sum() + sum(selector.budget_terms(selection, cmask).values())
    loss.backward()
    assert selector.q_proj.weight.grad.abs().sum() > 0 and selector.budget[0].weight.grad.abs().sum() > 0
    selection = selector.eval()(candidates, cmask, query, qmask)
    assert selection.keep.dtype == torch.bool
    expected = torch.ceil(selection.rho * cmask.sum(-1) - 1e-6).clamp(min=1)
    assert torch.equal(selection.count, expected)
    assert selector(candidates, cmask, query, qmask, n=3).count.tolist() == [3, 3, 3]
    fixed = selector(candidates, cmask, query, qmask, ratio=0.25)
    assert fixed.count.tolist() == [5, 5, 3]


def test_budget_terms_by_hand():
    selector = QuerySelector(hidden_size=8, num_heads=2, n_max=10)
    selection = type("S", (), {"rho": torch.tensor([0.2, 0.4])})()
    cmask = torch.ones(2, 20, dtype=torch.bool)  # rho N = 4 and 8; n_max 10
    terms = selector.budget_terms(selection, cmask, lambda_t=1.0, lambda_m=1.7, lambda_s=0.05)
    assert terms["budget_square"].item() == pytest.approx((0.16 + 0.64) / 2)
    assert terms["budget_linear"].item() == pytest.approx(1.7 * (0.4 + 0.8) / 2)
    mean = (selector.rho_min + selector.rho_max) / 2
    assert terms["budget_stability"].item() == pytest.approx(0.05 * ((0.2 - mean) ** 2 + (0.4 - mean) ** 2) / 2)


def test_projected_features_and_baseline_scores():
    selector = QuerySelector(hidden_size=16, num_heads=2, feature_size=40).eval()
    features, query = torch.randn(2, 30, 40), torch.randn(2, 3, 16)
    keep = selector(features, torch.ones(2, 30, dtype=torch.bool), query, torch.ones(2, 3, dtype=torch.bool)).keep
    assert keep.shape == (2, 30) and keep.sum() >= 2
    cmask = torch.tensor([[True, True, True, False]])
    assert hard_top_n(position_scores(cmask, "first"), 2, cmask).tolist() == [[True, True, False, False]]
    assert hard_top_n(position_scores(cmask, "last"), 2, cmask).tolist() == [[False, True, True, False]]
    q_last, keys = torch.randn(1, 2, 4), torch.randn(1, 2, 4, 4)
    scores = promptdistill_scores(q_last, keys, cmask, kernel=1)
    expected = (torch.einsum("bhd,bhnd->bhn", q_last, keys) / 2).mean(1)
    assert torch.allclose(scores[:, :3], expected[:, :3]) and scores[0, 3] == -math.inf


def test_pool_averages_the_relevance_over_valid_neighbours():
    scores = torch.tensor([[1.0, 0.0, 0.0, 4.0, 0.0], [2.0, 2.0, 5.0, 7.0, 7.0]])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    expected = torch.tensor([[0.5, 1 / 3, 4 / 3, 4 / 3, 2.0], [2.0, 3.0, 3.5, 0.0, 0.0]])  # padding: not counted, 0
    assert torch.allclose(smooth(scores, mask, 3), expected)
    assert torch.equal(smooth(scores, mask, 1), scores)
    with pytest.raises(ValueError, match="pool must be an odd window"):
        QuerySelector(hidden_size=8, num_heads=2, pool=4)
    with pytest.raises(ValueError, match="selector_pool"):
        QuerySelectorConfig(output_dir="unused", use_cpu=True, bf16=False, selector_pool=2)
    torch.manual_seed(0)
    selector = QuerySelector(hidden_size=16, num_heads=2, pool=3).eval()
    candidates, query = torch.randn(2, 12, 16), torch.randn(2, 3, 16)
    cmask, qmask = torch.ones(2, 12, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    cmask[1, 9:] = False
    selection = selector(candidates, cmask, query, qmask, n=4)
    raw = selector.relevance(candidates, cmask, query, qmask)
    assert torch.allclose(selection.scores, smooth(raw, cmask, 3))
    assert torch.equal(selection.keep, hard_top_n(smooth(raw, cmask, 3), 4, cmask))
    assert not torch.equal(selection.keep, hard_top_n(raw, 4, cmask))  # the window changes the choice here


def test_feature_width_mismatch_is_a_clear_error():
    projected = QuerySelector(hidden_size=16, num_heads=2, feature_size=40)
    plain = QuerySelector(hidden_size=16, num_heads=2)
    mask, query_mask = torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    query = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="width 32; this selector expects feature_size 40"):
        projected(torch.randn(1, 5, 32), mask, query, query_mask)
    with pytest.raises(ValueError, match="width 40; this selector expects hidden_size 16"):
        plain(torch.randn(1, 5, 40), mask, query, query_mask)
    with pytest.raises(ValueError, match="query features have width 8"):
        plain(torch.randn(1, 5, 16), mask, torch.randn(1, 3, 8), query_mask)


def test_empty_context_and_overlong_query_name_the_example(tiny_tokenizer):
    from tokensieve.errors import DataError
    from tokensieve.trainers.query_selector import encode_rows

    good = {"prompt": "record 1 : key k1 ? copy k1", "completion": " v1"}
    with pytest.raises(DataError, match="train dataset, example 1: the context is empty"):
        rows = [{"context": "record 1", "query": " ? copy k1", "completion": " v1"},
                {"context": "", "query": " ? copy", "completion": " v"}]
        encode_rows(Dataset.from_list(rows), tiny_tokenizer, " ?", "train")
    with pytest.raises(DataError, match=r"example 0: the query \(and answer\) take \d+ tokens and max_length is 4"):
        encode_rows(Dataset.from_list([good]), tiny_tokenizer, " ?", "train", max_length=4)
    assert len(encode_rows(Dataset.from_list([good]), tiny_tokenizer, " ?", "train", max_length=64)) == 1
    pipe = SelectorPipeline(fresh_model(tiny_tokenizer), tiny_tokenizer)  # max_position_embeddings 256
    with pytest.raises(DataError, match="example 1: the context is empty"):
        pipe.encode(["record 1", ""], [" ? copy", " ? copy"])
    with pytest.raises(DataError, match="max_position_embeddings is 256"):
        pipe.encode(["record 1"], [" ?" + " copy" * 300])


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_lm_features_and_reduced_inputs_match_the_full_model(tiny_tokenizer, architecture):
    model = fresh_model(tiny_tokenizer, architecture)
    pipe = SelectorPipeline(model, tiny_tokenizer)
    batch = pipe.encode(["record 1 : key k1 maps to v3 ;", "key k2 ;"], [" ? copy", " ? copy it"])
    features = lm_features(model, batch["context_ids"], batch["context_mask"], batch["query_ids"],
                           batch["query_mask"], layer=2)
    real_query = int(batch["query_mask"][0].sum())
    row = torch.cat([batch["context_ids"][0], batch["query_ids"][0, :real_query]])[None]
    hidden = model(input_ids=row, output_hidden_states=True).hidden_states[2]
    n = batch["context_ids"].shape[1]
    assert torch.allclose(features.context[0], hidden[0, :n], atol=1e-5)
    assert torch.allclose(features.query[0, :real_query], hidden[0, n:], atol=1e-5)
    # Keeping every context token reproduces the full model's logits at the query positions.
    inputs = reduced_inputs(model, batch["context_ids"], batch["context_mask"], batch["context_mask"].bool(),
                            batch["query_ids"], batch["query_mask"])
    inputs.pop("labels")
    reduced = model(**inputs).logits
    assert torch.allclose(reduced[0, : row.shape[1]], model(input_ids=row).logits[0], atol=1e-4)


def test_lm_features_score_layer_reads_a_later_layer(tiny_tokenizer):
    model = fresh_model(tiny_tokenizer)
    pipe = SelectorPipeline(model, tiny_tokenizer)
    batch = pipe.encode(["record 1 : key k1 maps to v3 ;", "key k2 ;"], [" ? copy", " ? copy it"])
    inputs = (batch["context_ids"], batch["context_mask"], batch["query_ids"], batch["query_mask"])
    both = lm_features(model, *inputs, layer=1, score_layer=2)
    early, late = lm_features(model, *inputs, layer=1), lm_features(model, *inputs, layer=2)
    torch.testing.assert_close(both.context, early.context)  # the features enter layer 1
    torch.testing.assert_close(both.q_last, late.q_last)  # the scores come from layer 2
    torch.testing.assert_close(both.context_keys, late.context_keys)
    assert not torch.allclose(early.q_last, late.q_last)
    with pytest.raises(ValueError, match=r"score layer must be in \[1, 2\], got 0"):
        lm_features(model, *inputs, layer=1, score_layer=0)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_keep_mask_attention_equals_removing_tokens_and_reaches_them(tiny_tokenizer, architecture):
    model = fresh_model(tiny_tokenizer, architecture)
    model.set_attn_implementation(KEEP_ATTENTION)
    pipe = SelectorPipeline(model, tiny_tokenizer)
    batch = pipe.encode(["record 1 : key k1 maps to v3 ; more words", "key k2 ;"], [" ? copy", " ? copy it"])
    answer_ids = torch.tensor([tiny_tokenizer(" v3")["input_ids"] * 2, tiny_tokenizer(" k2")["input_ids"] * 2])
    answer_mask = torch.ones_like(answer_ids)
    context_mask = batch["context_mask"]
    hard = torch.zeros(context_mask.shape)
    hard[0, [0, 2, 3, 6]] = 1.0
    hard[1, [1]] = 1.0
    keep = hard.clone().requires_grad_(True)
    args = (batch["query_ids"], batch["query_mask"], answer_ids, answer_mask)
    dropped = reduced_inputs(model, batch["context_ids"], context_mask, hard.bool(), *args)
    full = reduced_inputs(model, batch["context_ids"], context_mask, context_mask.bool(), *args)
    full["key_keep"] = key_keep_vector(keep, context_mask, full["attention_mask"])
    dropped_labels, full_labels = dropped.pop("labels"), full.pop("labels")
    reference = model(**dropped).logits
    masked = model(**full).logits
    for b in range(2):  # the answer positions (labels) and the logits there agree
        torch.testing.assert_close(masked[b][full_labels[b] != -100], reference[b][dropped_labels[b] != -100],
                                   atol=1e-4, rtol=1e-4)
    # Without key_keep the function is the model's own attention.
    full.pop("key_keep")
    model.set_attn_implementation("sdpa")
    plain = model(**full).logits
    model.set_attn_implementation(KEEP_ATTENTION)
    torch.testing.assert_close(model(**full).logits, plain)
    labels = full_labels[:, 1:]
    full["key_keep"] = key_keep_vector(keep, context_mask, full["attention_mask"])
    logits = model(**full).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    loss.backward()
    real = context_mask.bool()
    assert (keep.grad[real & ~hard.bool()] != 0).all()  # the removed tokens get a gradient
    assert (keep.grad[~real] == 0).all()


def rows(n=32):
    return [{"prompt": f"record {i} : key k{i % 5} maps to v{(i * 3) % 7} and filler words here ? copy k{i % 5}",
             "completion": f" v{(i * 3) % 7}"} for i in range(n)]


def train_selector(tokenizer, tmp_path, **kwargs):
    args = QuerySelectorConfig(output_dir=str(tmp_path / "sel"), max_steps=3, per_device_train_batch_size=8,
                               learning_rate=1e-2, feature_layer=1, selector_heads=2, budget_hidden=16,
                               report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False,
                               save_strategy="no", logging_steps=1, **kwargs)
    trainer = QuerySelectorTrainer(model=fresh_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows()),
                                   processing_class=tokenizer)
    trainer.start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer


@pytest.mark.parametrize("fixed, selection", [(None, "mask"), (0.25, "mask"), (0.25, "drop")])
def test_trainer_trains_only_the_selector(tiny_tokenizer, tmp_path, fixed, selection):
    trainer = train_selector(tiny_tokenizer, tmp_path, fixed_keep_ratio=fixed, training_selection=selection)
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in trainer.start.items() if not torch.equal(p, after[n])}
    assert changed and all("query_selector" in n for n in changed)
    logs = [e for e in trainer.state.log_history if "kept_fraction" in e]
    assert logs and "answer_ce" in logs[0] and "rho_mean" in logs[0]
    assert ("budget_linear" in logs[0]) == (fixed is None)


def test_attention_distill_loss_by_hand_and_logged(tiny_tokenizer, tmp_path):
    from tokensieve.trainers.query_selector import attention_distill_loss
    from tokensieve.trainers.selector_lm import Features

    torch.manual_seed(0)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    features = Features(context=None, query=None, q_last=torch.randn(2, 2, 4), context_keys=torch.randn(2, 2, 6, 4))
    teacher = promptdistill_scores(features.q_last, features.context_keys, mask).softmax(-1)
    assert attention_distill_loss(features, 0.3 * teacher, mask).abs() < 1e-6  # r proportional to t: no loss
    uniform = mask.float()
    expected = sum((t[m] * (t[m].log() - math.log(1 / int(m.sum())))).sum() for t, m in zip(teacher, mask)) / 2
    torch.testing.assert_close(attention_distill_loss(features, uniform, mask), expected)
    trainer = train_selector(tiny_tokenizer, tmp_path, fixed_keep_ratio=0.25, attention_distill_weight=0.5)
    logs = [e for e in trainer.state.log_history if "kept_fraction" in e]
    assert logs[0]["attention_distill"] > 0


def test_attention_distill_layer_sets_the_teacher(tiny_tokenizer, tmp_path):
    first = train_selector(tiny_tokenizer, tmp_path / "a", fixed_keep_ratio=0.25, attention_distill_weight=0.5)
    later = train_selector(tiny_tokenizer, tmp_path / "b", fixed_keep_ratio=0.25, attention_distill_weight=0.5,
                           attention_distill_layer=2)
    distill = [[e["attention_distill"] for e in t.state.log_history if "attention_distill" in e]
               for t in (first, later)]
    assert distill[0][0] != pytest.approx(distill[1][0])  # same start, another teacher
    assert [e["answer_ce"] for e in first.state.log_history if "answer_ce" in e][0] == pytest.approx(
        [e["answer_ce"] for e in later.state.log_history if "answer_ce" in e][0])  # same features, same selection
    with pytest.raises(ValueError, match="attention_distill_layer"):
        QuerySelectorConfig(output_dir=str(tmp_path / "c"), use_cpu=True, bf16=False, feature_layer=2,
                            attention_distill_layer=1)
    with pytest.raises(ModelError, match="attention_distill_layer is 3, but the model has 3 decoder layers"):
        train_selector(tiny_tokenizer, tmp_path / "d", attention_distill_weight=0.5, attention_distill_layer=3)


def test_export_loads_in_a_fresh_process_and_bad_exports_fail(tiny_tokenizer, tmp_path):
    base = tmp_path / "base"
    fresh_model(tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    args = QuerySelectorConfig(output_dir=str(tmp_path / "sel"), max_steps=2, per_device_train_batch_size=8,
                               selector_heads=2, budget_hidden=16, report_to="none", use_cpu=True, bf16=False,
                               activation_checkpointing=False, save_strategy="no", selector_pool=3)
    trainer = QuerySelectorTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args,
                                   train_dataset=Dataset.from_list(rows()), processing_class=tiny_tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "export"))
    assert json.loads((tmp_path / "export/selector.json").read_text())["selector"]["pool"] == 3
    model = trainer.model.eval()
    pipe = SelectorPipeline(model, tiny_tokenizer, model.query_selector, 1)
    contexts, queries = ["record 3 : key k3 maps to v2 and filler words here"], [" ? copy k3"]
    expected, keep = pipe.answer(contexts, queries, max_new_tokens=3, ratio=0.5)
    script = ("import torch; from tokensieve.launch.export import load_selector_pipeline;"
              f"p = load_selector_pipeline({str(tmp_path / 'export')!r});"
              f"out, keep = p.answer({contexts!r}, {queries!r}, max_new_tokens=3, ratio=0.5);"
              "import json; print(json.dumps([out.tolist(), keep.tolist()]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [expected.tolist(), keep.tolist()]
    from tokensieve.launch.export import load_selector_pipeline

    # Trained at a fixed share: the loaded pipeline keeps that share by default (its budget head never trained).
    trainer.args.fixed_keep_ratio = 0.25
    trainer.save_model(str(tmp_path / "export-fixed"))
    fixed = load_selector_pipeline(tmp_path / "export-fixed")
    batch = fixed.encode(contexts, queries)
    assert fixed.default_ratio == 0.25
    assert torch.equal(fixed.select(batch), fixed.select(batch, ratio=0.25))
    assert load_selector_pipeline(tmp_path / "export").default_ratio is None
    # Exports written while the (removed) re-encoder option existed carry reencoder_layers: 0 loads, > 0 is refused.
    config_file = tmp_path / "export-fixed/selector.json"
    config = json.loads(config_file.read_text())
    for layers in (0, 1):
        config["selector"]["reencoder_layers"] = layers
        config_file.write_text(json.dumps(config))
        if layers:
            with pytest.raises(ModelError, match="re-encoder layers, which tokensieve no longer supports"):
                load_selector_pipeline(tmp_path / "export-fixed")
        else:
            assert load_selector_pipeline(tmp_path / "export-fixed").default_ratio == 0.25

    with pytest.raises(ModelError, match="no selector.json"):
        load_selector_pipeline(tmp_path / "nothing")
    data = (tmp_path / "export/selector.safetensors").read_bytes()
    (tmp_path / "export/selector.safetensors").write_bytes(data[:100])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_selector_pipeline(tmp_path / "export")


def test_recipe_and_generate_cli(tiny_tokenizer, tmp_path, repo_root, capsys):
    from tokensieve.launch.cli import main
    from tokensieve.launch.recipe import load_recipe
    from tokensieve.launch.run import run_training

    base = tmp_path / "base"
    fresh_model(tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    out = tmp_path / "selector"
    run_training(load_recipe(repo_root / "recipes/tiny/query_selector.yaml", [
        "--model.name_or_path", str(base), "--data.datasets", json.dumps([{"path": str(data)}]),
        "--training.output_dir", str(out), "--max_steps", "2", "--report_to", "none", "--save_strategy", "no",
        "--per_device_train_batch_size", "4", "--budget_hidden", "8"]))
    assert (out / "selector.json").exists() and (out / "selector.safetensors").exists()
    assert main(["generate", str(out), "--selector", "--prompt", "record 2 : key k2 maps to v6 ? copy k2",
                 "--keep", "3", "--max-new-tokens", "2"]) == 0
    assert "[kept 3 of" in capsys.readouterr().err
    assert main(["generate", str(out), "--selector", "--prompt", "no separator here"]) == 2
    assert "separator" in capsys.readouterr().err
    # tokensieve eval --selector: exact match of answers from the kept context tokens, and the kept share
    result = tmp_path / "eval.json"
    assert main(["eval", str(out), "--selector", "--data", str(data), "--keep", "3", "--output", str(result)]) == 0
    scores = json.loads(result.read_text())["results"][str(data)]
    assert scores["examples"] == 32 and 0 <= scores["exact_match"] <= 1
    assert scores["kept_share"] == pytest.approx(sum(3 / len(tiny_tokenizer(r["prompt"][:r["prompt"].rfind(" ?")],
                                                                         add_special_tokens=False)["input_ids"])
                                                     for r in rows()) / 32)


def _reference_logits(model, ids: torch.Tensor, positions: torch.Tensor, after_layer: int | None = None,
                      kept: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' own forward for one unpadded row: the next-token logits after `ids` at `positions`; with
    `after_layer`, the hidden states leaving that layer over the whole row, restricted to `kept` indices, go on
    through the remaining layers alone (PromptDistill)."""
    if after_layer is None:
        return model(input_ids=ids[None], position_ids=positions[None]).logits[0, -1]
    hidden = model(input_ids=ids[None], position_ids=positions[None], output_hidden_states=True).hidden_states
    decoder = model.get_decoder()
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(layers)[after_layer + 1:])
    try:
        # An explicit attention mask: without one, transformers reads gaps in position_ids as packed sequences.
        out = decoder(inputs_embeds=hidden[after_layer + 1][:, kept], position_ids=positions[kept][None],
                      attention_mask=torch.ones(1, len(kept), dtype=torch.long), use_cache=False).last_hidden_state
    finally:
        decoder.layers = layers
    return model.lm_head(out[0, -1])


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_promptdistill_and_gemfilter_prefill_match_transformers_forward(tiny_tokenizer, architecture):
    model = fresh_model(tiny_tokenizer, architecture)  # 3 layers
    pipe = SelectorPipeline(model, tiny_tokenizer, feature_layer=1)
    contexts = ["record 1 : key k1 maps to v3 ; record 2 : key k2 maps to v1 ;", "key k2 maps to v7 ;"]
    queries = [" ? copy k1", " ? copy it now"]
    batch = pipe.encode(contexts, queries)
    for layer in (0, 1):
        pipe.selection_layer = layer
        state = pipe.prefill(batch, "promptdistill", ratio=0.4)
        assert torch.equal(state.keep, pipe.select(batch, "gemfilter", ratio=0.4))  # same scores, same layer
        for b in range(2):
            n, q = int(batch["context_mask"][b].sum()), int(batch["query_mask"][b].sum())
            ids = torch.cat([batch["context_ids"][b, :n], batch["query_ids"][b, :q]])
            kept = torch.cat([state.keep[b, :n].nonzero().squeeze(-1), torch.arange(n, n + q)])
            assert 0 < state.keep[b].sum() < n
            expected = _reference_logits(model, ids, torch.arange(n + q), layer, kept)
            torch.testing.assert_close(state.logits[b], expected, atol=1e-4, rtol=1e-4)
            # GemFilter: the kept tokens and the query as a prompt of their own, from position 0.
            gem = pipe.prefill(batch, "gemfilter", ratio=0.4)
            torch.testing.assert_close(gem.logits[b], _reference_logits(model, ids[kept], torch.arange(len(kept))),
                                       atol=1e-4, rtol=1e-4)
        # Layers 0..layer cache the whole prompt, the later ones only the kept tokens and the query.
        full_width = int((batch["context_mask"].sum(-1) + batch["query_mask"].sum(-1)).max())
        kept_width = int((state.keep.sum(-1) + batch["query_mask"].sum(-1)).max())
        lengths = [state.cache.layers[i].keys.shape[2] for i in range(3)]
        assert lengths == [full_width] * (layer + 1) + [kept_width] * (2 - layer)
        assert state.kv_bytes() < pipe.prefill(batch, "full").kv_bytes()
    with pytest.raises(ValueError, match=r"selection layer must be in \[0, 1\]"):
        pipe.selection_layer = 2
        pipe.prefill(batch, "promptdistill", ratio=0.4)


def test_every_method_decodes_like_generate_when_it_keeps_everything(tiny_tokenizer):
    model = fresh_model(tiny_tokenizer)
    pipe = SelectorPipeline(model, tiny_tokenizer, feature_layer=1)
    contexts, queries = ["record 1 : key k1 maps to v3 ; more words", "key k2 ;"], [" ? copy", " ? copy it"]
    batch = pipe.encode(contexts, queries)
    expected = []
    for b in range(2):
        n, q = int(batch["context_mask"][b].sum()), int(batch["query_mask"][b].sum())
        ids = torch.cat([batch["context_ids"][b, :n], batch["query_ids"][b, :q]])[None]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=tiny_tokenizer.pad_token_id)
        expected.append(out[0, ids.shape[1]:].tolist())
    for method in ("full", "promptdistill", "gemfilter", "qk-top", "first"):
        ids, keep = pipe.answer(contexts, queries, 5, method=method, **({} if method == "full" else {"ratio": 1.0}))
        assert ids.tolist() == expected, method
        assert torch.equal(keep, batch["context_mask"].bool())
    # Keeping less, PromptDistill's first token still sees the whole prompt through layer 0.
    ids, keep = pipe.answer(contexts, queries, 5, method="promptdistill", ratio=0.3)
    assert (keep.sum(-1) < batch["context_mask"].sum(-1)).all() and ids.shape == (2, 5)


def test_selector_exact_match_judges_each_rows_metric(tiny_tokenizer):
    from tokensieve.launch.evaluate import CONTAINS_SLACK, selector_exact_match

    pipe = SelectorPipeline(fresh_model(tiny_tokenizer), tiny_tokenizer, feature_layer=1)
    prompts = ["record 1 : key k1 maps to v3 ; more words ? copy", "key k2 ; words ? copy it"]
    contexts, queries = zip(*(p.split(" ?") for p in prompts))
    ids, _ = pipe.answer(list(contexts), [" ?" + q for q in queries], 1 + CONTAINS_SLACK, method="full")
    texts = [tiny_tokenizer.decode(row, skip_special_tokens=True) for row in ids.tolist()]
    late = [t.strip().split(" ")[-1] for t in texts]  # a piece from late in each generation
    score, share = selector_exact_match(pipe, prompts, late, method="full", metrics=["contains"] * 2)
    assert score == 1.0 and share == 1.0
    first = [tiny_tokenizer.decode(row[:1]) for row in ids.tolist()]  # exact: the answer's tokens come first
    assert selector_exact_match(pipe, prompts, first, method="full") == (1.0, 1.0)
    assert selector_exact_match(pipe, prompts, ["zzzz", "zzzz"], method="full", metrics=["contains"] * 2)[0] == 0.0


def test_selector_states_reads_the_selectors_choice_as_promptdistill_reads_its_own(tiny_tokenizer):
    model = fresh_model(tiny_tokenizer)
    torch.manual_seed(1)
    selector = QuerySelector(model.config.hidden_size, num_heads=2, budget_hidden=8).eval()
    pipe = SelectorPipeline(model, tiny_tokenizer, selector, feature_layer=1)
    contexts = ["record 1 : key k1 maps to v3 ; more words here and there", "key k2 ; value v4 ;"]
    queries = [" ? copy", " ? copy it now"]
    batch = pipe.encode(contexts, queries)
    # The same tokens as the selector on lm_features: the residual stream entering layer 1 either way.
    for ratio in (0.3, 0.6):
        states = pipe.prefill(batch, "selector-states", ratio=ratio)
        assert torch.equal(states.keep, pipe.select(batch, "selector", ratio=ratio).bool())
        # Layer 0 caches the whole prompt, layers 1-2 only the kept tokens and the query.
        full_width = int((batch["context_mask"].sum(-1) + batch["query_mask"].sum(-1)).max())
        kept_width = int((states.keep.sum(-1) + batch["query_mask"].sum(-1)).max())
        assert [states.cache.layers[i].keys.shape[2] for i in range(3)] == [full_width, kept_width, kept_width]
        assert states.kv_bytes() < pipe.prefill(batch, "full").kv_bytes()
    # Keeping everything, it decodes as the full prompt does.
    ids, keep = pipe.answer(contexts, queries, 4, method="selector-states", ratio=1.0)
    assert torch.equal(keep, batch["context_mask"].bool())
    assert ids.tolist() == pipe.answer(contexts, queries, 4, method="full")[0].tolist()
    with pytest.raises(ValueError, match="need a trained selector"):
        SelectorPipeline(model, tiny_tokenizer, feature_layer=1).prefill(batch, "selector-states", ratio=0.5)

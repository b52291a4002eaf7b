"""The token-level selection and weighting math (selectors/token_scores.py) against hand-computed values."""

import math

import pytest
import torch

from tokensieve.selectors.token_scores import (
    attention_per_label,
    attention_to_prompt,
    capture_attention_inputs,
    dft_weights,
    excess_loss_select,
    kept_count,
    prior_weights,
    sstoken_score,
    sstoken_select,
)
from tokensieve.trainers.token_loss import TokenLossConfig

F, T_ = False, True


def test_sstoken_select_hand_computed():
    # Row 0: response at 1..4. REL = [1, 0, 2, -0.5] -> minmax [0.6, 0.2, 1.0, 0.0];
    # attention [0.1, 0.8, 0.1, 0.6]; score (gamma 0.5) = [0.35, 0.5, 0.55, 0.3]; keep ceil(0.6 * 4) = 3.
    # Row 1: response at 0..1. REL = [1, 3] -> [0, 1]; attention [0.9, 0.0]; score [0.45, 0.5]; keep ceil(1.2) = 2.
    history = torch.tensor([[0.0, 2, 1, 3, 0.5, 0], [2.0, 4, 0, 0, 0, 0]])
    current = torch.tensor([[0.0, 1, 1, 1, 1, 0], [1.0, 1, 0, 0, 0, 0]])
    attn = torch.tensor([[0.5, 0.1, 0.8, 0.1, 0.6, 0.5], [0.9, 0.0, 0.3, 0.3, 0.3, 0.3]])
    mask = torch.tensor([[F, T_, T_, T_, T_, F], [T_, T_, F, F, F, F]])
    score = sstoken_score(history, current, attn, mask, gamma=0.5)
    assert torch.allclose(score[0, 1:5], torch.tensor([0.35, 0.5, 0.55, 0.3]), atol=1e-6)
    assert torch.allclose(score[1, :2], torch.tensor([0.45, 0.5]), atol=1e-6)
    keep = sstoken_select(history, current, attn, mask, gamma=0.5, rho=0.6)
    assert keep.tolist() == [[F, T_, T_, T_, F, F], [T_, T_, F, F, F, F]]
    assert not (keep & ~mask).any()
    # gamma = 0 (the warm-up): attention only -> row 0 keeps positions 2, 4, 1.
    keep = sstoken_select(history, current, attn, mask, gamma=0.0, rho=0.6)
    assert keep[0].tolist() == [F, T_, T_, F, T_, F]


def test_sstoken_select_counts_and_batch_level():
    torch.manual_seed(0)
    mask = torch.rand(4, 50) > 0.3
    args = (torch.rand(4, 50), torch.rand(4, 50), torch.rand(4, 50), mask)
    for rho in (0.1, 0.6, 1.0):
        keep = sstoken_select(*args, rho=rho)
        assert keep.sum(1).tolist() == [math.ceil(rho * n) for n in mask.sum(1).tolist()]
        assert int(keep.sum()) == kept_count(mask, rho, "sample")
        keep = sstoken_select(*args, rho=rho, level="batch")
        assert int(keep.sum()) == math.ceil(rho * int(mask.sum())) == kept_count(mask, rho, "batch")
        assert not (keep & ~mask).any()
    with pytest.raises(ValueError, match="rho"):
        sstoken_select(*args, rho=0.0)


def test_excess_loss_select_is_batch_level():
    current = torch.tensor([[3.0, 1.0, 2.0], [5.0, 0.0, 1.0]])
    reference = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 2.0]])  # excess [[2, 0, 1], [4, 0, -1]]
    mask = torch.tensor([[T_, T_, T_], [T_, F, T_]])
    keep = excess_loss_select(current, reference, mask, ratio=0.6)  # ceil(0.6 * 5) = 3 of the batch
    assert keep.tolist() == [[T_, F, T_], [T_, F, F]]


def test_prior_weights_hand_computed():
    p = torch.tensor([[0.5, 0.75, 0.9], [0.2, 1.0, 1.0]])
    mask = torch.tensor([[T_, T_, F], [T_, T_, T_]])
    w = prior_weights(p.log(), mask, alpha=1.0)
    # Row 0: raw [0.5, 0.25] -> mean 1: [4/3, 2/3]; row 1: raw [0.8, 0, 0] -> [3, 0, 0].
    assert torch.allclose(w, torch.tensor([[4 / 3, 2 / 3, 0.0], [3.0, 0.0, 0.0]]), atol=1e-6)
    w2 = prior_weights(p.log(), mask, alpha=2.0)  # raw [0.25, 0.0625] -> [1.6, 0.4]
    assert torch.allclose(w2[0, :2], torch.tensor([1.6, 0.4]), atol=1e-6)
    certain = prior_weights(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
    assert certain.tolist() == [[1.0, 1.0, 1.0]]  # nothing to prefer: plain NTP


def test_dft_weights_are_detached_probabilities():
    logp = torch.tensor([[-0.1, -2.0]], requires_grad=True)
    w = dft_weights(logp, torch.tensor([[T_, F]]))
    assert not w.requires_grad
    assert torch.allclose(w, torch.tensor([[math.exp(-0.1), 0.0]]))


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="current_loss"):
        excess_loss_select(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), 0.5)


@pytest.mark.parametrize("sink_tokens", [0, 1])
def test_attention_to_prompt_matches_eager_attention(tiny_model, sink_tokens):
    """The one-layer recompute equals the prompt share of the eager attention map of that layer, head-mean."""
    architecture, model = tiny_model
    torch.manual_seed(1)
    ids = torch.randint(3, 250, (2, 12))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 9:] = 0  # right padding in row 1
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[0, :5], prompt[1, :3] = True, True
    layer = model.config.num_hidden_layers - 1
    attention = model.model.layers[layer].self_attn

    model.set_attn_implementation("sdpa")
    with capture_attention_inputs(attention) as captured:
        model(input_ids=ids, attention_mask=attention_mask)
    got = attention_to_prompt(attention, captured["hidden_states"], captured["position_embeddings"], prompt,
                              attention_mask, sink_tokens=sink_tokens, chunk_size=5)

    model.set_attn_implementation("eager")
    try:
        maps = model(input_ids=ids, attention_mask=attention_mask, output_attentions=True).attentions[layer]
    finally:
        model.set_attn_implementation("sdpa")
    keys = prompt.clone()
    keys[:, :sink_tokens] = False
    expected = (maps * keys[:, None, None, :]).sum(-1).mean(1)
    real = attention_mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5), architecture
    if sink_tokens == 0:
        assert torch.allclose(got[0, :5], torch.ones(5))  # a prompt token attends only to the prompt
    # The trainer's default alignment: label position t (token t + 1) gets token t + 1's own row (the authors').
    assert TokenLossConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none").attention_row == "own"
    per_label = attention_per_label(got, "own")
    assert torch.allclose(per_label[0, 4:8], expected[0, 5:9], atol=1e-5)  # the response tokens of row 0
    assert torch.allclose(attention_per_label(got, "predicting")[0, 4:8], expected[0, 4:8], atol=1e-5)
    assert not torch.allclose(per_label[0, 4:8], attention_per_label(got, "predicting")[0, 4:8])
    # Rows from first_row on only (the prompt's rows are never scored): the same values there, 0 before.
    partial = attention_to_prompt(attention, captured["hidden_states"], captured["position_embeddings"], prompt,
                                  attention_mask, sink_tokens=sink_tokens, chunk_size=5, first_row=4)
    assert torch.equal(partial[:, :4], torch.zeros(2, 4)) and torch.allclose(partial[:, 4:], got[:, 4:], atol=1e-6)

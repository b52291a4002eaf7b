"""On CPU, TRL's fused LM head projects only labelled positions (tokensieve.trainers.fused_head) and gives the
same loss, metrics and gradients as projecting every position."""

import copy

import torch
import trl.trainer.utils
from trl.trainer.utils import add_fused_lm_head

from tokensieve.trainers import fused_head


def fused_step(model, input_ids, labels, compact: bool, monkeypatch):
    monkeypatch.setattr(trl.trainer.utils, "_use_triton", lambda device: compact)
    model.zero_grad()
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_patch_is_active_on_cpu():
    assert trl.trainer.utils._use_triton is fused_head.score_labelled_positions_only
    assert fused_head.score_labelled_positions_only(torch.device("cpu"))


def test_labelled_positions_only_gives_the_same_loss_and_gradients(tiny_llama, monkeypatch):
    model = copy.deepcopy(tiny_llama)  # the fixture is shared: patch a copy
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    torch.manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 20))
    labels = input_ids.clone()
    labels[0, :12] = -100
    labels[1, :5] = -100
    labels[2, 15:] = -100
    compact, compact_grads = fused_step(model, input_ids, labels, True, monkeypatch)
    full, full_grads = fused_step(model, input_ids, labels, False, monkeypatch)
    torch.testing.assert_close(compact.loss, full.loss)
    for field in ("log_probs", "entropy", "is_top1", "label_mask"):
        torch.testing.assert_close(getattr(compact, field), getattr(full, field))
    assert compact_grads.keys() == full_grads.keys() and compact_grads
    for name in full_grads:
        torch.testing.assert_close(compact_grads[name], full_grads[name], rtol=1e-5, atol=1e-6)

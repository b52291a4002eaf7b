"""TRIM-KV: bias and capacity loss by hand, gates on real architectures, the bounded cache, the trainer, export."""

import json
import math
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tokensieve.errors import ModelError
from tokensieve.launch.export import GATES_FILE, load_gates, load_retention_model, save_gates
from tokensieve.launch.model import FromScratchArguments, build_config
from tokensieve.selectors.attention import (TRAINING_KERNELS, RetentionState, _biased_attention, attach_gates,
                                            attention_modules, chunked_gated_attention, collected_log_beta,
                                            dense_gated_attention, detach_gates, evicted_bias, flex_gated_attention,
                                            fused_gated_attention,
                                            gates_disabled, gates_of, retention_state, set_training_kernel,
                                            train_with_eviction)
from tokensieve.selectors.kv_cache import RetentionCache, RetentionLayer
from tokensieve.selectors.retention import RetentionGate, capacity_loss, retention_bias
from tokensieve.trainers.retention import RetentionConfig, RetentionTrainer
from tokensieve.upstream import with_cache


def fresh_model(tokenizer, architecture="qwen3", seed=0, **sizes):
    torch.manual_seed(seed)
    spec = FromScratchArguments(architecture=architecture, max_position_embeddings=256, **sizes)
    return AutoModelForCausalLM.from_config(build_config(spec, tokenizer)).eval()


def test_retention_bias_hand_computed():
    log_beta = torch.log(torch.tensor([[[0.5, 0.25, 1.0]]]))
    bias = retention_bias(log_beta)[0, 0]
    l5, l25 = math.log(0.5), math.log(0.25)
    expected = torch.tensor([[0.0, -math.inf, -math.inf], [l5, 0.0, -math.inf], [2 * l5, l25, 0.0]])
    assert torch.allclose(bias, expected)


def test_evicted_bias_keeps_the_top_keys_of_every_row():
    log_beta = torch.log(torch.tensor([[[0.9, 0.5, 0.99, 0.2, 0.8]]]))
    kept = evicted_bias(retention_bias(log_beta), 2)[0, 0] > -math.inf
    # Row 3 scores keys 0..3 at 3 log 0.9, 2 log 0.5, log 0.99, 0: keys 2 and 3 stay; row 4 keeps 2 (0.99^2) and 4.
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 0, 1]])
    assert torch.equal(kept, expected.bool())
    assert torch.equal(evicted_bias(retention_bias(log_beta), 5), retention_bias(log_beta))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kernel", TRAINING_KERNELS)
@pytest.mark.parametrize("memory", [None, 20])
def test_biased_attention_keeps_the_bias_in_fp32_under_bf16(memory, kernel):
    """A bf16 model's gated attention equals the fp32 computation on the same (bf16) inputs, output and log-beta
    gradient within fp32 tolerance: the bias (t - i) log beta_i is never rounded to bf16."""
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, h, 64, 8).bfloat16() for h in (4, 2, 2))
    log_beta = (-torch.rand(2, 2, 64) * 0.3).requires_grad_()  # the gate's output, fp32
    upstream = torch.randn(2, 64, 4, 8).bfloat16().float()  # representable in bf16: the same in both paths
    module = torch.nn.Module()
    state = module.retention_state = RetentionState()
    state.train_memory, state.kernel, state.chunk = memory, kernel, 16

    def run(q, k, v, dtype):
        beta = log_beta.detach().clone().requires_grad_()
        output = _biased_attention(module, q, k, v, None, beta, 8**-0.5, 0.0)[0].to(dtype)
        gradient, = torch.autograd.grad((output.float() * upstream).sum(), beta)
        return output, gradient

    output, gradient = run(query, key, value, torch.bfloat16)
    reference, reference_gradient = run(query.float(), key.float(), value.float(), torch.bfloat16)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, reference, rtol=0, atol=0)
    torch.testing.assert_close(gradient, reference_gradient)  # fp32 tolerance


def test_training_with_eviction_attends_to_the_kept_keys_with_soft_gradients():
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)  # 2 groups
    log_beta = (-torch.rand(2, 2, 9) * 2).requires_grad_()
    upstream = torch.randn(2, 9, 4, 8)

    def run(memory):
        module = torch.nn.Module()
        module.retention_state = RetentionState()
        module.retention_state.train_memory = memory
        output = _biased_attention(module, query, key, value, None, log_beta, 8**-0.5, 0.0)[0]
        gradient, = torch.autograd.grad((output * upstream).sum(), log_beta)
        return output.detach(), gradient

    soft, soft_gradient = run(None)
    hard, hard_gradient = run(3)
    bias = evicted_bias(retention_bias(log_beta.detach()), 3).repeat_interleave(2, dim=1)
    scores = query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * 8**-0.5 + bias
    expected = (scores.softmax(-1) @ value.repeat_interleave(2, dim=1)).transpose(1, 2)
    torch.testing.assert_close(hard, expected)
    assert not torch.allclose(hard, soft, atol=1e-3)
    torch.testing.assert_close(hard_gradient, soft_gradient)  # straight-through: the soft bias's gradient
    assert torch.equal(run(9)[0], soft)  # a budget the sequence fits in changes nothing


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("memory", [None, 9])
def test_chunked_and_flex_kernels_equal_the_dense_bias(memory):
    """Forward and log-beta gradient of the blockwise and FlexAttention kernels equal the dense [B, H, T, T] bias,
    with grouped heads, left padding, blocks that do not divide T, and with eviction."""
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 70, 8
    query, key, value = torch.randn(batch, heads, length, dim), *torch.randn(2, batch, kv_heads, length, dim)
    log_beta = -torch.rand(batch, kv_heads, length) * 0.3
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    mask[1, 0, :5, :5] |= torch.eye(5, dtype=torch.bool)  # padding rows see themselves, as transformers' mask has it
    upstream = torch.randn(batch, heads, length, dim)

    def run(kernel, **options):
        beta = log_beta.clone().requires_grad_()
        output = kernel(query, key, value, mask, beta, dim**-0.5, memory=memory, **options)
        gradient, = torch.autograd.grad((output * upstream).sum(), beta)
        return output.detach(), gradient

    reference, reference_gradient = run(dense_gated_attention)
    for kernel, options in ((fused_gated_attention, {"chunk": 16}), (fused_gated_attention, {"chunk": 1000}),
                            (chunked_gated_attention, {"chunk": 16}), (chunked_gated_attention, {"chunk": 1000}),
                            (flex_gated_attention, {"chunk": 16})):
        output, gradient = run(kernel, **options)
        torch.testing.assert_close(output, reference, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(gradient, reference_gradient, atol=1e-4, rtol=1e-5)
    if memory is not None:  # eviction changes the forward
        assert not torch.allclose(reference, dense_gated_attention(query, key, value, mask, log_beta, dim**-0.5))


@pytest.mark.parametrize("memory", [None, 9])
def test_fused_kernel_uses_the_causal_kernel_where_it_may(memory):
    """The fused kernel hands sdpa its own causal mask when padding only trails (then the real rows equal the dense
    reference, padding rows may differ), and the model's mask otherwise; its folded bias stays accurate at long
    lengths with strongly forgetting gates."""
    from tokensieve.selectors.attention import _only_causal

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 300, 8
    query, key, value = torch.randn(batch, heads, length, dim), *torch.randn(2, batch, kv_heads, length, dim)
    log_beta = -torch.rand(batch, kv_heads, length) ** 3 * 8  # beta down to e^-8
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    trailing = torch.ones(batch, length, dtype=torch.bool)
    trailing[1, 250:] = False
    right = causal & trailing[:, None, None, :]
    left = causal & trailing.flip(-1)[:, None, None, :]
    packed = causal.clone().repeat(batch, 1, 1, 1)
    packed[:, :, 100:, :100] = False  # two sequences in one row
    assert _only_causal(None) and _only_causal(causal) and _only_causal(right)
    assert not _only_causal(left) and not _only_causal(packed)
    upstream = torch.randn(batch, heads, length, dim)
    rows = trailing[:, None, :, None]  # the real query rows
    for mask in (right, packed):
        def run(kernel):
            beta = log_beta.clone().requires_grad_()
            output = kernel(query, key, value, mask, beta, dim**-0.5, memory=memory)
            gradient, = torch.autograd.grad((output * upstream * rows).sum(), beta)
            return (output * rows).detach(), gradient

        reference, reference_gradient = run(dense_gated_attention)
        output, gradient = run(fused_gated_attention)
        torch.testing.assert_close(output, reference, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(gradient, reference_gradient, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_gated_models_train_alike_with_every_kernel(tiny_tokenizer, architecture):
    """A gated tiny model with padding: logits and gate gradients of the fused, chunked and flex kernels equal the
    dense reference, soft and with eviction (right padding: the fused kernel's causal path; left: the model's mask)."""
    model = fresh_model(tiny_tokenizer, architecture)
    attach_gates(model, intermediate_size=16, bias_init=2.0)
    torch.manual_seed(1)
    for gate in gates_of(model):
        torch.nn.init.normal_(gate.down.weight, std=0.5)
    for name, parameter in model.named_parameters():  # as the trainer has it: the gates train, the model is frozen
        parameter.requires_grad_("retention_gate" in name)
    ids = torch.randint(3, 250, (2, 37))
    right = torch.ones_like(ids)
    right[1, 30:] = 0
    left = right.flip(-1)

    def run(kernel, memory, mask):
        set_training_kernel(model, kernel, chunk=8)
        train_with_eviction(model, memory)
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (logits[mask.bool()].float() ** 2).mean().backward()
        return logits.detach()[mask.bool()], [g.down.weight.grad.clone() for g in gates_of(model)]

    for memory, mask in ((None, right), (6, right), (None, left), (6, left)):
        reference, reference_grads = run("dense", memory, mask)
        for kernel in ("fused", "chunked"):
            logits, grads = run(kernel, memory, mask)
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
            for grad, expected in zip(grads, reference_grads):
                torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
        set_training_kernel(model, "dense")
        with torch.no_grad():
            reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # every row
        set_training_kernel(model, "flex")  # forward only: FlexAttention has no backward on CPU
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, reference,
                                       atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="'flex' training attention needs CUDA"):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    with pytest.raises(ValueError, match="training kernel must be one of fused, chunked, flex, dense"):
        set_training_kernel(model, "sparse")


def test_capacity_loss_hand_computed():
    log_beta = torch.full((1, 1, 4), math.log(0.5))
    # S = [1, 1.5, 1.75, 1.875]; M = 1: terms 0.5/1, 0.75/1, 0.875/2 over 3 positive terms.
    assert capacity_loss(log_beta, 1).item() == pytest.approx((0.5 + 0.75 + 0.4375) / 3)
    assert capacity_loss(log_beta, 4).item() == 0.0  # nothing above the budget
    # Two heads, one keeps everything (S_t = t + 1), one forgets at once (S_t = 1); M = 2.
    heads = torch.stack([torch.zeros(4), torch.full((4,), -30.0)])[None]
    per_head = capacity_loss(heads, 2)  # head 0: t=2: 1/1, t=3: 2/1 -> mean 1.5
    assert per_head.item() == pytest.approx(1.5)
    shared = capacity_loss(heads, 2, global_budget=True)  # sum S = [2, 3, 4, 5] vs 4: t=3: (5-4)/(2*1)
    assert shared.item() == pytest.approx(0.5)
    # Padding: the last two tokens of row 0 are padding; row 0 then has S = [1, 2] <= M = 2.
    valid = torch.tensor([[True, True, False, False]])
    assert capacity_loss(torch.zeros(1, 1, 4), 2, valid=valid).item() == 0.0


def test_capacity_loss_chunks_agree_and_have_gradients():
    torch.manual_seed(0)
    log_beta = (-torch.rand(2, 3, 50) * 0.3).requires_grad_()
    whole = capacity_loss(log_beta, 8, chunk_size=1000)
    chunked = capacity_loss(log_beta, 8, chunk_size=7)
    assert torch.allclose(whole, chunked, atol=1e-6)
    # The factored sums (row steps of ~sqrt(chunk)) against the definition, in float64, with padding.
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 41:] = False
    age = torch.arange(50)[:, None] - torch.arange(50)[None]  # [t, i]
    terms = torch.exp(age.clamp(min=0) * log_beta.detach().double()[..., None, :]) * ((age >= 0) & valid[:, None, None])
    retained = terms.sum(-1)  # S_t, [B, H, T]
    excess = ((retained - 8) / (torch.arange(50) - 8).clamp(min=1)).clamp(min=0) * valid[:, None]
    expected = excess.sum() / (excess > 0).sum()
    for chunk in (1, 7, 16, 49, 1000):
        assert capacity_loss(log_beta, 8, chunk_size=chunk, valid=valid).item() == pytest.approx(expected.item(), rel=1e-5)
    chunked.backward()
    assert torch.isfinite(log_beta.grad).all() and log_beta.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="memory_size"):
        capacity_loss(log_beta, 0)


def test_gate_output_is_its_modules_composed():
    torch.manual_seed(0)
    gate = RetentionGate(hidden_size=16, num_kv_heads=2, intermediate_size=8, bias_init=1.0)
    torch.nn.init.normal_(gate.down.weight, std=0.5)
    x = torch.randn(3, 5, 16)
    expected = torch.nn.functional.logsigmoid(gate.down(gate.act(gate.up(x))) + gate.bias).transpose(1, 2)
    torch.testing.assert_close(gate(x), expected)


def test_gate_starts_near_one():
    gate = RetentionGate(hidden_size=16, num_kv_heads=2, intermediate_size=8)
    log_beta = gate(torch.randn(3, 5, 16))
    assert log_beta.shape == (3, 2, 5)
    assert (log_beta.exp() > 0.9999).all()


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_gate_off_forward_equals_the_base_model(tiny_tokenizer, architecture):
    model = fresh_model(tiny_tokenizer, architecture)
    ids = torch.randint(3, 250, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    reference = model(input_ids=ids, attention_mask=mask).logits
    attach_gates(model, intermediate_size=16)
    with gates_disabled(model):
        assert torch.equal(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, reference)
    on = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()  # (padding rows: the fused kernel lets trailing padding see more keys; they carry nothing)
    assert torch.allclose(on[real], reference[real], atol=1e-4)  # beta ~ 1 at init: almost no decay
    assert collected_log_beta(model).shape == (2, model.config.num_hidden_layers * model.config.num_key_value_heads, 17)
    for gate in gates_of(model):  # a strong decay changes the output
        torch.nn.init.constant_(gate.bias, -2.0)
    assert not torch.allclose(model(input_ids=ids, use_cache=False).logits, reference[:, :], atol=1e-3)
    detach_gates(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference)


def test_eviction_keeps_the_top_scores_per_head_in_order():
    torch.manual_seed(0)
    layer = RetentionLayer(memory_size=5, buffer_size=3, policy="gates")
    keys = torch.randn(2, 3, 8, 4)
    log_beta = -torch.rand(2, 3, 8)
    layer.pending_log_beta = log_beta
    layer.update(keys, keys + 1)
    scores = layer.scores()
    age = (8 - torch.arange(8)).float()
    assert torch.allclose(scores, age * log_beta)
    expected = scores.topk(5, dim=-1).indices.sort(dim=-1).values
    layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))  # 8 >= 5 + 3: evicts to 5, then appends
    assert layer.physical_length() == 6 and layer.get_seq_length() == 9
    assert torch.equal(layer.positions[..., :5], expected)
    assert torch.equal(layer.keys[:, :, :5], keys.gather(2, expected[..., None].expand(-1, -1, -1, 4)))
    assert (layer.positions.diff(dim=-1) > 0).all()  # temporal order


@pytest.mark.parametrize("policy", ["gates", "streaming", "h2o", "snapkv", "knorm", "random"])
def test_every_policy_generates_within_budget(tiny_tokenizer, policy):
    model = fresh_model(tiny_tokenizer)
    attach_gates(model, intermediate_size=16)
    prompt = torch.randint(3, 250, (2, 40))
    cache = RetentionCache.for_model(model, memory_size=8, buffer_size=4, policy=policy)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         **with_cache(model, cache))
    assert out.shape == (2, 52)
    assert cache.get_seq_length() == 51
    assert all(layer.physical_length() <= 8 + 4 for layer in cache.layers)


def test_cache_runs_the_gate_lazily_with_the_same_log_beta(tiny_tokenizer):
    model = fresh_model(tiny_tokenizer)
    attach_gates(model, intermediate_size=16, bias_init=2.0)
    torch.manual_seed(1)
    for gate in gates_of(model):  # a gate whose output varies from token to token
        torch.nn.init.normal_(gate.down.weight, std=0.5)
    prompt = torch.randint(3, 250, (2, 21))
    cache = RetentionCache.for_model(model, memory_size=None, buffer_size=4)  # never evicts
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, do_sample=False,
                         **with_cache(model, cache))
    assert all(sum(h.shape[1] for _, h in layer._deferred) < 4 for layer in cache.layers)  # bounded gate inputs
    # With a cache the attention has no bias: each layer sees the hidden states of the model without gates.
    with torch.no_grad(), gates_disabled(model):
        hidden = model(out[:, :-1], use_cache=False, output_hidden_states=True).hidden_states
    decoder = model.get_decoder()
    for index, (layer, gate) in enumerate(zip(cache.layers, gates_of(model))):
        with torch.no_grad():
            eager = gate(decoder.layers[index].input_layernorm(hidden[index]))  # every token at once
        torch.testing.assert_close(layer.log_beta, eager, atol=1e-5, rtol=1e-4)


def test_generate_with_the_cache_equals_full_cache_below_the_budget(tiny_tokenizer):
    model = fresh_model(tiny_tokenizer)
    attach_gates(model, intermediate_size=16)
    prompt = torch.randint(3, 250, (2, 20))
    mask = torch.ones_like(prompt)
    prompt[1, :6], mask[1, :6] = tiny_tokenizer.pad_token_id, 0  # left padding
    full = model.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False)
    cache = RetentionCache.for_model(model, memory_size=64)
    bounded = model.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, **with_cache(model, cache))
    assert torch.equal(full, bounded)


def test_decayed_attention_with_room_for_every_token_equals_the_soft_training_forward(tiny_tokenizer):
    from tokensieve.launch.generate import bounded_logits

    model = fresh_model(tiny_tokenizer, architecture="llama", num_attention_heads=4, num_key_value_heads=2)
    attach_gates(model, intermediate_size=16, bias_init=2.0)
    torch.manual_seed(1)
    for gate in gates_of(model):  # retention that differs from token to token and head to head
        torch.nn.init.normal_(gate.down.weight, std=0.5)
    ids = torch.randint(3, 250, (2, 23))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = tiny_tokenizer.pad_token_id, 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        soft = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    for chunk in (4, 1):  # prefill in chunks, and token by token as decoding reads
        cache = RetentionCache.for_model(model, memory_size=None, buffer_size=4, decayed_attention=True)
        read = bounded_logits(model, ids, mask, cache, chunk_size=chunk)
        torch.testing.assert_close(read[mask.bool()], soft[mask.bool()], atol=1e-4, rtol=1e-4)
    plain = bounded_logits(model, ids, mask, RetentionCache.for_model(model, memory_size=None, buffer_size=4))
    assert (plain[mask.bool()] - soft[mask.bool()]).abs().max() > 1e-2  # the bias matters with these gates
    with pytest.raises(ValueError, match="decayed_attention needs the gates"):
        RetentionCache.for_model(model, memory_size=8, policy="h2o", decayed_attention=True)


@pytest.mark.parametrize("policy", ["gates", "random", "knorm"])
def test_left_padding_is_evicted_first(tiny_tokenizer, policy):
    model = fresh_model(tiny_tokenizer)
    attach_gates(model, intermediate_size=16, bias_init=2.0)
    for gate in gates_of(model):
        torch.nn.init.normal_(gate.down.weight, std=0.5)
    prompt = torch.randint(3, 250, (2, 20))
    mask = torch.ones_like(prompt)
    prompt[1, :6], mask[1, :6] = tiny_tokenizer.pad_token_id, 0  # left padding
    options = dict(max_new_tokens=10, do_sample=False, min_new_tokens=10)
    cache = RetentionCache.for_model(model, memory_size=8, buffer_size=4, policy=policy)
    batch = model.generate(prompt, attention_mask=mask, **with_cache(model, cache), **options)
    assert all(layer.valid.all() for layer in cache.layers)  # 14 real tokens > 8 kept: no padding left
    if policy == "gates":  # and the padded row decodes as it does alone
        alone = model.generate(prompt[1:, 6:], attention_mask=mask[1:, 6:], **options,
                               **with_cache(model, RetentionCache.for_model(model, memory_size=8, buffer_size=4)))
        assert torch.equal(batch[1, 6:], alone[0])


def tiny_rows(n=24):
    return [{"prompt": f"record {i} : key k{i % 5} maps to v{(i * 3) % 7} ; copy", "completion": f" v{(i * 3) % 7}"}
            for i in range(n)]


def train_gates(tokenizer, tmp_path, steps=3, **kwargs):
    model = fresh_model(tokenizer)
    options = dict(output_dir=str(tmp_path / "gates"), max_steps=steps, per_device_train_batch_size=8,
                   learning_rate=1e-2, memory_size=4, gate_intermediate_size=16, gate_bias_init=2.0, report_to="none",
                   use_cpu=True, bf16=False, activation_checkpointing=False, save_strategy="no", logging_steps=1)
    args = RetentionConfig(**{**options, **kwargs})
    trainer = RetentionTrainer(model=model, args=args, train_dataset=Dataset.from_list(tiny_rows()),
                               processing_class=tokenizer)
    trainer.gates_at_start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    return trainer


def test_trainer_trains_only_the_gates_and_logs(tiny_tokenizer, tmp_path):
    start = fresh_model(tiny_tokenizer).state_dict()
    trainer = train_gates(tiny_tokenizer, tmp_path)
    after = trainer.model.state_dict()
    assert all(torch.equal(after[n], start[n]) for n in start)  # the base is frozen
    assert trainer.gates_at_start and all("retention_gate" in n for n in trainer.gates_at_start)
    assert all(not torch.equal(after[n], p) for n, p in trainer.gates_at_start.items() if n.endswith("bias"))
    logs = [e for e in trainer.state.log_history if "capacity_loss" in e]
    for key in ("ce", "kl", "retained_over_memory", "beta_mean", "forgotten_fraction", "beta_mean_layer_min"):
        assert key in logs[0], key
    assert logs[0]["capacity_loss"] > 0  # bias 2 -> beta 0.88 keeps ~8 tokens > M = 4


def test_trainer_can_train_with_eviction(tiny_tokenizer, tmp_path):
    trainer = train_gates(tiny_tokenizer, tmp_path, steps=2, train_with_eviction=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert {retention_state(m).train_memory for m in attention_modules(model)} == {4}
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    train_with_eviction(model, None)
    ids = torch.randint(3, 250, (1, 12))
    soft = model(input_ids=ids, use_cache=False).logits
    train_with_eviction(model, 4)
    assert not torch.allclose(model(input_ids=ids, use_cache=False).logits, soft)
    detach_gates(model)
    assert all(retention_state(m) is None and not hasattr(m, "retention_gate") for m in attention_modules(model))


def test_loss_from_response_logits_equals_the_full_logits_loss(tiny_tokenizer, tmp_path):
    import torch.nn.functional as F

    from tokensieve.selectors.retention import capacity_loss

    args = RetentionConfig(output_dir=str(tmp_path), memory_size=4, gate_intermediate_size=16, gate_bias_init=2.0,
                           report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=4)
    trainer = RetentionTrainer(model=fresh_model(tiny_tokenizer), args=args,
                               train_dataset=Dataset.from_list(tiny_rows()), processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with gates_disabled(model):
            teacher = model(**inputs).logits[:, :-1]
        student = model(**inputs).logits[:, :-1]
        log_beta = collected_log_beta(model)
    mask = batch["labels"][:, 1:] != -100
    ce = F.cross_entropy(student[mask], batch["labels"][:, 1:][mask], reduction="sum")
    kl = F.kl_div(student[mask].log_softmax(-1), teacher[mask].log_softmax(-1), log_target=True, reduction="sum")
    expected = 0.5 * (ce + kl) / mask.sum() + capacity_loss(log_beta, 4, valid=batch["attention_mask"].bool())
    torch.testing.assert_close(loss, expected)


def test_teacher_runs_without_the_lora_it_trains(tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = fresh_model(tiny_tokenizer)
    inputs = tiny_tokenizer(["record 3 : key k3 maps to v2 ; copy v2"], return_tensors="pt")
    with torch.no_grad():
        expected = base(**inputs).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    args = RetentionConfig(output_dir=str(tmp_path), train_lora=True, memory_size=4, gate_intermediate_size=16,
                           report_to="none", use_cpu=True, bf16=False)
    trainer = RetentionTrainer(model=model, args=args, train_dataset=Dataset.from_list(tiny_rows()),
                               processing_class=tiny_tokenizer)
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad(), gates_disabled(model), trainer._adapters_off_if_trained(model):
        teacher = model(**inputs).logits
    with torch.no_grad(), gates_disabled(model):
        student_without_gates = model(**inputs).logits
    torch.testing.assert_close(teacher, expected)
    assert not torch.allclose(student_without_gates, expected)  # the adapter (random init here) changes the model


def test_training_can_start_from_exported_gates(tiny_tokenizer, tmp_path):
    source = fresh_model(tiny_tokenizer)
    attach_gates(source, intermediate_size=8, bias_init=3.0)
    for gate in gates_of(source):
        torch.nn.init.normal_(gate.down.weight, std=0.5)
    save_gates(source, tmp_path / "export", memory_size=4)

    def trainer_from(init_gates, model):
        args = RetentionConfig(output_dir=str(tmp_path / "out"), init_gates=str(init_gates), memory_size=4,
                               gate_intermediate_size=16, report_to="none", use_cpu=True, bf16=False)
        return RetentionTrainer(model=model, args=args, train_dataset=Dataset.from_list(tiny_rows()),
                                processing_class=tiny_tokenizer)

    fresh = fresh_model(tiny_tokenizer)
    trainer_from(tmp_path / "export", fresh)  # gates attached from the export (its size 8, not the config's 16)
    already = fresh_model(tiny_tokenizer)
    attach_gates(already, intermediate_size=8)
    trainer_from(tmp_path / "export", already)  # gates already attached: weights loaded into them
    for model in (fresh, already):
        for ours, theirs in zip(gates_of(model), gates_of(source)):
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    with pytest.raises(ModelError, match="init_gates: .*no gates.json"):
        trainer_from(tmp_path / "missing", fresh_model(tiny_tokenizer))
    with pytest.raises(ModelError, match="init_gates: .*num_key_value_heads"):
        trainer_from(tmp_path / "export", fresh_model(tiny_tokenizer, num_key_value_heads=1))


def test_export_loads_in_a_fresh_process(tiny_tokenizer, tmp_path):
    base = tmp_path / "base"
    fresh_model(tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    attach_gates(model, intermediate_size=16, bias_init=3.0)
    for gate in gates_of(model):
        torch.nn.init.normal_(gate.down.weight, std=0.5)
    save_gates(model, tmp_path / "export", memory_size=8, buffer_size=4)
    ids = torch.randint(3, 250, (1, 30))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False,
                              **with_cache(model, RetentionCache.for_model(model, memory_size=8, buffer_size=4)))
    script = (
        "import sys, torch; from tokensieve.launch.export import load_retention_model;"
        "from tokensieve.selectors.kv_cache import RetentionCache; from tokensieve.upstream import with_cache;"
        f"m, t = load_retention_model({str(tmp_path / 'export')!r});"
        f"ids = torch.tensor({ids.tolist()});"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False, **with_cache(m, RetentionCache.for_model(m, 8, 4)));"
        "print(out.tolist())"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected.tolist()


def test_a_shipped_export_finds_its_base_relative_to_itself(tiny_tokenizer, tmp_path, monkeypatch):
    """A relative base path in gates.json that names a folder beside the export is read from the export, so a
    shipped export works from any working directory; a missing base folder is one clear error."""
    base = tmp_path / "models" / "base"
    fresh_model(tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    attach_gates(model, intermediate_size=16, bias_init=3.0)
    save_gates(model, tmp_path / "shipped" / "gates", memory_size=8, buffer_size=4)
    config_file = tmp_path / "shipped" / "gates" / "gates.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "../../models/base"
    config_file.write_text(json.dumps(config))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded, _ = load_retention_model(tmp_path / "shipped" / "gates")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    config["base_model_name_or_path"] = "../../models/not-prepared"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="base model folder ../../models/not-prepared does not exist.*model prepare"):
        load_retention_model(tmp_path / "shipped" / "gates")


def test_bad_gate_exports_are_clear_errors(tiny_tokenizer, tmp_path):
    model = fresh_model(tiny_tokenizer)
    attach_gates(model, intermediate_size=16)
    save_gates(model, tmp_path / "ok")
    with pytest.raises(ModelError, match="architecture"):
        load_gates(fresh_model(tiny_tokenizer, "llama"), tmp_path / "ok")
    with pytest.raises(ModelError, match="hidden_size"):
        load_gates(fresh_model(tiny_tokenizer, hidden_size=32, intermediate_size=64), tmp_path / "ok")
    with pytest.raises(ModelError, match="no gates.json"):
        load_gates(fresh_model(tiny_tokenizer), tmp_path / "missing")
    data = (tmp_path / "ok" / GATES_FILE).read_bytes()
    (tmp_path / "ok" / GATES_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_gates(fresh_model(tiny_tokenizer), tmp_path / "ok")
    with pytest.raises(ModelError, match="no gates.json"):
        load_retention_model(tmp_path / "nothing-here")


def test_recipe_trains_exports_and_generate_cli_runs(tiny_tokenizer, tmp_path, repo_root, capsys):
    from tokensieve.launch.cli import main
    from tokensieve.launch.recipe import load_recipe
    from tokensieve.launch.run import run_training

    base = tmp_path / "base"
    fresh_model(tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows()))
    out = tmp_path / "gates"
    recipe = load_recipe(repo_root / "recipes/tiny/trim_kv.yaml", [
        "--model.name_or_path", str(base), "--data.datasets", json.dumps([{"path": str(data)}]),
        "--training.output_dir", str(out), "--max_steps", "2", "--report_to", "none", "--save_strategy", "no",
        "--per_device_train_batch_size", "4", "--gate_intermediate_size", "8"])
    run_training(recipe)
    config = json.loads((out / "gates.json").read_text())
    assert config["memory_size"] == 22 and config["base_model_name_or_path"] == str(base)
    assert not (out / "model.safetensors").exists()  # the frozen base is not copied
    assert main(["generate", str(out), "--prompt", "record 3 : key k3 maps to", "--memory-size", "4",
                 "--buffer-size", "2", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "tokens seen" in captured.err and "kept per layer" in captured.err
    assert main(["generate", str(base), "--prompt", "x", "--policy", "gates"]) == 2
    assert "needs a retention-gate export" in capsys.readouterr().err
    # tokensieve eval on a gates export generates from a bounded cache (the export's M unless --memory-size)
    result = tmp_path / "eval.json"
    assert main(["eval", str(out), "--data", str(data), "--max-examples", "8", "--output", str(result)]) == 0
    scores = json.loads(result.read_text())["results"][str(data)]
    assert scores["examples"] == 8
    assert (scores["memory_size"], scores["buffer_size"], scores["policy"]) == (22, 8, "gates")
    assert config["attention"] == "plain" and scores["attention"] == "plain"  # the recipe's, as in the paper
    config["attention"] = "decayed"  # an export trained with inference_attention: decayed
    (out / "gates.json").write_text(json.dumps(config))
    assert main(["eval", str(out), "--data", str(data), "--max-examples", "8", "--output", str(result)]) == 0
    assert json.loads(result.read_text())["results"][str(data)]["attention"] == "decayed"
    assert main(["eval", str(out), "--data", str(data), "--max-examples", "8", "--attention", "plain",
                 "--output", str(result)]) == 0
    assert json.loads(result.read_text())["results"][str(data)]["attention"] == "plain"
    assert main(["eval", str(base), "--data", str(data), "--memory-size", "4", "--policy", "streaming",
                 "--output", str(result)]) == 0
    assert json.loads(result.read_text())["results"][str(data)]["memory_size"] == 4
    assert main(["eval", str(base), "--data", str(data), "--memory-size", "4"]) == 2
    assert "needs a retention-gate export" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["gates", "h2o"])
def test_the_cache_never_holds_more_than_memory_plus_buffer(tiny_tokenizer, policy):
    """For prefill chunks that do and do not divide M + buffer (and one longer than the buffer), no layer ever holds
    more than M + buffer tokens per kv head, and positions stay right: with a budget above the prompt, the bounded
    cache generates exactly what the full cache does."""
    from tokensieve.launch.generate import bounded_generate

    model = fresh_model(tiny_tokenizer)
    attach_gates(model, intermediate_size=16, bias_init=2.0)
    prompt = torch.randint(3, 250, (2, 61))
    mask = torch.ones_like(prompt)
    memory, buffer = 21, 4
    for chunk in (1, 4, 5, 7, 25):
        cache = RetentionCache.for_model(model, memory_size=memory, buffer_size=buffer, policy=policy)
        peaks = []
        for layer in cache.layers:
            original = layer.update

            def update(*args, layer=layer, original=original, **kwargs):
                out = original(*args, **kwargs)
                peaks.append(layer.physical_length())
                return out

            layer.update = update
        out = bounded_generate(model, prompt, mask, cache, chunk_size=chunk, max_new_tokens=6, do_sample=False)
        assert out.shape == (2, 67) and cache.get_seq_length() == 66
        assert max(peaks) <= memory + buffer, (chunk, max(peaks))
        assert max(peaks) >= memory  # it does fill up
    roomy = RetentionCache.for_model(model, memory_size=80, buffer_size=4, policy=policy)
    full = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(bounded_generate(model, prompt, mask, roomy, chunk_size=7, max_new_tokens=6, do_sample=False),
                       full)


@pytest.mark.parametrize("method", ["sft", "trim_kv"])
def test_eos_loss_false_removes_exactly_the_appended_eos_label(tiny_tokenizer, tmp_path, method, caplog):
    from tokensieve.trainers.guards import GuardedSFTTrainer, SFTBaselineConfig

    def batch(eos_loss):
        common = dict(output_dir=str(tmp_path / str(eos_loss)), per_device_train_batch_size=8, report_to="none",
                      use_cpu=True, bf16=False, activation_checkpointing=False, save_strategy="no",
                      train_sampling_strategy="sequential", eos_loss=eos_loss)
        data = Dataset.from_list(tiny_rows())
        if method == "sft":
            trainer = GuardedSFTTrainer(model=fresh_model(tiny_tokenizer), args=SFTBaselineConfig(**common),
                                        train_dataset=data, processing_class=tiny_tokenizer)
        else:
            trainer = RetentionTrainer(model=fresh_model(tiny_tokenizer), train_dataset=data,
                                       processing_class=tiny_tokenizer,
                                       args=RetentionConfig(**common, memory_size=4, gate_intermediate_size=16))
        return trainer, next(iter(trainer.get_train_dataloader()))

    trainer, with_eos = batch(True)
    _, without_eos = batch(False)
    assert torch.equal(with_eos["input_ids"], without_eos["input_ids"])
    changed = with_eos["labels"] != without_eos["labels"]
    assert changed.sum(-1).tolist() == [1] * len(changed)  # one label per row
    assert (with_eos["labels"][changed] == tiny_tokenizer.eos_token_id).all()
    assert (without_eos["labels"][changed] == -100).all()
    # The last real label of each row was that end-of-sequence token.
    last = (with_eos["labels"] != -100).long().cumsum(-1).argmax(-1)
    assert changed[torch.arange(len(last)), last].all()
    if method == "trim_kv":  # the fresh model cannot produce that label: the gate trainer says so, once
        trainer.model.train()
        with caplog.at_level("WARNING"):
            trainer.compute_loss(trainer.model, dict(with_eos))
            trainer.compute_loss(trainer.model, dict(with_eos))
        assert sum("eos_loss: false" in r.getMessage() for r in caplog.records) == 1


def test_retention_map_labels_tokens_and_counts_slots(tiny_tokenizer, tmp_path):
    from tokensieve.data.synthetic import mqar, needle_qa
    from tokensieve.trainers.retention_map import (plot_retention_map, recall_token_kinds, retention_snapshot,
                                                   slot_shares)

    model = fresh_model(tiny_tokenizer)
    attach_gates(model, intermediate_size=16, bias_init=2.0)
    row = mqar.generate("test", 1, 0, mqar.OPTIONS(context_words=40, num_pairs=4))[0]
    ids, kinds, names, asked = recall_token_kinds(row, tiny_tokenizer)
    assert len(kinds) == len(ids) and set(kinds) <= set(names)
    words = row["prompt"].split(" ")
    key_words = {words[p] for p in row["pair_positions"]}
    decoded_keys = "".join(tiny_tokenizer.decode(ids[i]) for i, k in enumerate(kinds) if k == "key").split()
    assert set(decoded_keys) == key_words  # every key token, and nothing else, is labelled key
    assert tiny_tokenizer.decode(ids[asked]).split() == [row["queries"][0], row["answers"][0]]
    memory, buffer = 6, 2
    snapshot = retention_snapshot(model, ids, memory, buffer)
    held = snapshot.kept.sum(-1)
    assert (held <= memory + buffer - 1).all() and (held >= memory).all()  # room for the answer token
    found = slot_shares(snapshot, kinds, names, asked)
    total = sum(found["shares"].values())
    assert torch.allclose(total, torch.ones_like(total))
    path = plot_retention_map(snapshot, kinds, tmp_path / "map.png")
    assert path.stat().st_size > 1000 and [p.name for p in tmp_path.iterdir()] == ["map.png"]  # no temporary left
    needle = needle_qa.generate("test", 1, 0, needle_qa.OPTIONS())[0]
    ids, kinds, names, asked = recall_token_kinds(needle, tiny_tokenizer)
    assert tiny_tokenizer.decode(ids[asked]).strip() == needle["answer"] and "needle" in kinds
    words = needle["prompt"].split(" ")
    values = {words[i] for i in range(2, words.index("?"), 4)}  # every fact's value (values repeat)
    assert set("".join(tiny_tokenizer.decode(ids[i]) for i, k in enumerate(kinds) if k == "value").split()) <= values


def test_trainer_logs_the_retention_map_to_wandb(tiny_tokenizer, tmp_path, monkeypatch):
    from tokensieve.data.synthetic import mqar

    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # wandb keeps its settings once set up (another test may have changed them): read ours
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(mqar.generate("test", 1, 0, mqar.OPTIONS(context_words=30, num_pairs=3))[0]) + "\n")
    trainer = train_gates(tiny_tokenizer, tmp_path, steps=2, retention_map_steps=1, retention_map_data=str(rows),
                          report_to=["wandb"])
    wandb.finish()
    assert sorted(p.name for p in (tmp_path / "gates/retention_maps").iterdir()) == ["step_1.png", "step_2.png"]
    logged = list(tmp_path.glob("wandb/offline-run-*/files/media/images/retention_map_*.png"))
    assert len(logged) == 2, list(tmp_path.rglob("*"))[:50]
    with pytest.raises(ValueError, match="retention_map_data must be a JSONL file"):
        RetentionConfig(output_dir=str(tmp_path), retention_map_steps=5, use_cpu=True, bf16=False)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_a_model_without_gates_runs_the_cache_with_its_own_attention(tiny_tokenizer, tmp_path, policy):
    """`load_for_generation` on a plain model (the baseline policies of `tokensieve eval/generate`): the retention
    attention is attached without gates, so h2o / snapkv see attention probabilities (with the model's own attention
    they saw none and ranked every token alike) and a left-padded batch answers as each row alone."""
    from tokensieve.launch.generate import bounded_generate, load_for_generation
    from tokensieve.selectors.attention import ATTENTION_NAME, detach_gates

    folder = tmp_path / "plain"
    fresh_model(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model, _, config = load_for_generation(str(folder), policy)
    assert config == {} and model.config._attn_implementation == ATTENTION_NAME
    torch.manual_seed(0)
    rows = [torch.randint(3, 250, (n,)) for n in (40, 33)]
    padded = torch.stack([torch.cat([torch.zeros(40 - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(40 - len(r)), torch.ones(len(r))]).long() for r in rows])

    def generate(ids, attention_mask):
        cache = RetentionCache.for_model(model, memory_size=10, buffer_size=4, policy=policy)
        out = bounded_generate(model, ids, attention_mask, cache, max_new_tokens=5, do_sample=False)
        return out[:, ids.shape[1]:], cache

    batched, cache = generate(padded, mask)
    for index, row in enumerate(rows):
        alone, _ = generate(row[None], torch.ones(1, len(row), dtype=torch.long))
        assert torch.equal(batched[index], alone[0]), (policy, index)
    if policy in ("h2o", "snapkv"):
        assert all((layer.scores_seen > 0).any() for layer in cache.layers)
    detach_gates(model)
    assert model.config._attn_implementation != ATTENTION_NAME

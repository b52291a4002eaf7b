"""The CUDA and bf16 paths: one bf16 training step of every trainer, the RetentionCache on CUDA, export -> reload.

Marked `gpu` and skipped without CUDA (`python benchmarks/gpu_check.py` runs them on a GPU). To check the tests
themselves on a machine without one, `TOKENSIEVE_GPU_TESTS_DEVICE=cpu pytest -m gpu` runs them on the CPU (bf16
autocast works there too).
"""

import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tokensieve.launch.model import FromScratchArguments, apply_peft, build_config

DEVICE = os.environ.get("TOKENSIEVE_GPU_TESTS_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs CUDA")]
BF16_TOLERANCE = 3e-2  # relative: a loss from bf16 matmuls vs the fp32 one


def fresh_model(tokenizer, architecture="qwen3"):
    torch.manual_seed(0)
    spec = FromScratchArguments(architecture=architecture, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(build_config(spec, tokenizer))


def rows(n=16):
    return [{"prompt": f"record {i} : key k{i % 5} maps to v{(i * 3) % 7} and filler words ? copy k{i % 5}",
             "completion": f" v{(i * 3) % 7}", "prompt_without_context": f"? copy k{i % 5}"} for i in range(n)]


def common(tmp_path, bf16: bool) -> dict:
    return {"output_dir": str(tmp_path / ("bf16" if bf16 else "fp32")), "per_device_train_batch_size": 8,
            "max_steps": 1, "report_to": "none", "save_strategy": "no", "use_cpu": DEVICE == "cpu", "bf16": bf16,
            "activation_checkpointing": False, "train_sampling_strategy": "sequential", "seed": 0,
            "dataset_num_proc": None}


def build(method: str, tokenizer, tmp_path, bf16: bool, **options):
    """A trainer of `method` on a fresh tiny model (the same weights every time)."""
    from tokensieve.trainers.guards import GuardedSFTTrainer, SFTBaselineConfig
    from tokensieve.trainers.query_selector import QuerySelectorConfig, QuerySelectorTrainer
    from tokensieve.trainers.retention import RetentionConfig, RetentionTrainer
    from tokensieve.trainers.token_loss import TokenLossConfig, TokenLossTrainer

    model, data, args = fresh_model(tokenizer), Dataset.from_list(rows()), common(tmp_path, bf16)
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
    if method == "sft":
        return GuardedSFTTrainer(model=apply_peft(model, lora), args=SFTBaselineConfig(**args), train_dataset=data,
                                 processing_class=tokenizer)
    if method == "token_loss":
        if options.get("token_scorer") == "rho1":
            reference = tmp_path / "reference"
            fresh_model(tokenizer).save_pretrained(reference)
            options["reference_model"] = str(reference)
        return TokenLossTrainer(model=apply_peft(model, lora), args=TokenLossConfig(**args, **options),
                                train_dataset=data, processing_class=tokenizer)
    if method == "trim_kv":
        config = RetentionConfig(**args, memory_size=8, gate_intermediate_size=16, gate_bias_init=2.0, **options)
        return RetentionTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    if method == "query_selector":
        config = QuerySelectorConfig(**args, feature_layer=1, selector_heads=2, budget_hidden=16, **options)
        return QuerySelectorTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    raise ValueError(method)


def first_loss(trainer) -> float:
    """The loss of the first training batch (no update), in the trainer's precision."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    with torch.no_grad(), trainer.compute_loss_context_manager():
        return float(trainer.compute_loss(model, batch))


RUNS = [("sft", {}), ("token_loss", {"token_scorer": "none"}), ("token_loss", {"token_scorer": "sstoken"}),
        ("token_loss", {"token_scorer": "rho1"}), ("token_loss", {"token_scorer": "prior"}),
        ("token_loss", {"token_scorer": "random"}), ("trim_kv", {}), ("trim_kv", {"train_with_eviction": True}),
        ("query_selector", {"fixed_keep_ratio": 0.25})]


@pytest.mark.parametrize("method, options", RUNS, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}"
                                                       for m, o in RUNS])
def test_one_bf16_step_of_every_trainer(tiny_tokenizer, tmp_path, method, options):
    reference = first_loss(build(method, tiny_tokenizer, tmp_path, bf16=False, **options))
    trainer = build(method, tiny_tokenizer, tmp_path, bf16=True, **options)
    assert trainer.args.device.type == DEVICE
    loss = first_loss(trainer)
    assert abs(loss - reference) <= BF16_TOLERANCE * abs(reference), (loss, reference)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_retention_cache_generates_on_cuda_as_on_cpu(tiny_tokenizer):
    from tokensieve.selectors.attention import attach_gates, gates_of
    from tokensieve.selectors.kv_cache import RetentionCache
    from tokensieve.upstream import with_cache

    model = fresh_model(tiny_tokenizer).eval()
    attach_gates(model, intermediate_size=16, bias_init=2.0)
    torch.manual_seed(1)
    for gate in gates_of(model):
        torch.nn.init.normal_(gate.down.weight, std=0.5)
    prompt = torch.randint(3, 250, (2, 40))
    outputs = []
    for device in ("cpu", DEVICE):
        model.to(device)
        cache = RetentionCache.for_model(model, memory_size=8, buffer_size=4)
        out = model.generate(prompt.to(device), attention_mask=torch.ones_like(prompt).to(device), max_new_tokens=12,
                             do_sample=False, **with_cache(model, cache))
        outputs.append(out.cpu())
    assert torch.equal(outputs[0], outputs[1])


def test_gate_export_reloads_on_cuda(tiny_tokenizer, tmp_path):
    from tokensieve.launch.export import load_retention_model

    trainer = build("trim_kv", tiny_tokenizer, tmp_path, bf16=True)
    base = tmp_path / "base"
    fresh_model(tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    trainer.train()
    trainer.save_model(str(tmp_path / "export"))
    model, _ = load_retention_model(str(tmp_path / "export"), base_model=str(base), device=DEVICE)
    assert next(model.parameters()).device.type == DEVICE
    ids = torch.randint(3, 250, (1, 12), device=DEVICE)
    assert torch.isfinite(model(input_ids=ids, use_cache=False).logits).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_kernels_equal_the_dense_bias_on_the_device(dtype):
    """The fused (and on CUDA the flex) training attention against the dense reference on the device, in the model's
    dtype: output and log-beta gradient, grouped heads, right padding (the causal kernel) and left padding (the mask)."""
    from tokensieve.selectors.attention import (chunked_gated_attention, dense_gated_attention,
                                                flex_gated_attention, fused_gated_attention)

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 8, 2, 200, 64
    query = torch.randn(batch, heads, length, dim, device=DEVICE, dtype=dtype)
    key, value = torch.randn(2, batch, kv_heads, length, dim, device=DEVICE, dtype=dtype)
    log_beta = -torch.rand(batch, kv_heads, length, device=DEVICE) ** 3 * 4
    causal = torch.ones(length, length, dtype=torch.bool, device=DEVICE).tril()[None, None]
    real = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    real[1, 150:] = False
    upstream = torch.randn(batch, heads, length, dim, device=DEVICE)
    kernels = [fused_gated_attention, chunked_gated_attention] + ([flex_gated_attention] if DEVICE == "cuda" else [])
    for valid in (real, real.flip(-1)):
        mask = causal & valid[:, None, None, :]
        rows = valid[:, None, :, None]

        def run(kernel):
            beta = log_beta.clone().requires_grad_()
            output = kernel(query, key, value, mask, beta, dim**-0.5).float() * rows
            gradient, = torch.autograd.grad((output * upstream).sum(), beta)
            return output.detach(), gradient

        reference, reference_gradient = run(dense_gated_attention)
        for kernel in kernels:
            output, gradient = run(kernel)
            torch.testing.assert_close(output, reference, atol=1e-4, rtol=1e-4, msg=kernel.__name__)
            torch.testing.assert_close(gradient, reference_gradient, atol=1e-3, rtol=1e-3, msg=kernel.__name__)

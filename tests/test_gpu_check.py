"""benchmarks/gpu_check.py cannot rot while no GPU is lent: its CPU smoke run measures every section, and the
real-size configs it ships build with `from_config` to the published parameter counts."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM


@pytest.mark.parametrize("name, architecture, parameters", [("qwen3-1.7b", "Qwen3ForCausalLM", 1.72e9),
                                                            ("llama-3.2-1b", "LlamaForCausalLM", 1.24e9)])
def test_shipped_real_size_configs_build_with_from_config(repo_root, name, architecture, parameters):
    config = AutoConfig.for_model(**json.loads((repo_root / f"benchmarks/configs/{name}.json").read_text()))
    with torch.device("meta"):  # shapes only, nothing allocated
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == architecture
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.01)


def test_cpu_smoke_measures_every_section(repo_root, tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = results["sections"]
    assert set(sections) == {"gate_training", "decode", "sstoken", "prefill"}  # the gpu tests need CUDA
    assert not [name for name, section in sections.items() if "error" in section]
    assert set(sections["gate_training"]["arms"]) == {"lora_sft", "gates_fused", "gates_chunked", "gates_dense"}
    for section in ("gate_training", "sstoken"):
        assert all(arm["seconds"] > 0 for arm in sections[section]["arms"].values())
    rows = sections["decode"]["rows"]
    assert rows and all(row["full_tokens_per_s"] > 0 and row["retention_tokens_per_s"] > 0 for row in rows)
    prefill = sections["prefill"]["methods"]
    assert prefill["selector"]["kv_ratio"] < 1 and prefill["promptdistill"]["kv_ratio"] > prefill["gemfilter"]["kv_ratio"]
    assert "| gates_fused |" in (tmp_path / "gpu_check.md").read_text()

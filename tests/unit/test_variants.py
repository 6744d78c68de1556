"""Inference variants: names, what each backend runs in, and the settings that name them."""

from __future__ import annotations

import pytest
import torch

from pipeline import variants
from pipeline.config import load_settings
from pipeline.errors import ConfigError
from pipeline.variants import Variant, candidates

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("text, backend, precision", [
    ("torch", "torch", "fp32"),
    ("onnxruntime:int8", "onnxruntime", "int8"),
    ("torch-compile:bf16", "torch-compile", "bf16"),
    (" torchscript:fp32 ", "torchscript", "fp32"),
])
def test_parse_reads_backend_and_precision(text, backend, precision):
    variant = Variant.parse(text)
    assert (variant.backend, variant.precision) == (backend, precision)
    assert Variant.parse(str(variant)) == variant


def test_fp32_is_written_as_the_bare_backend():
    assert str(Variant("onnxruntime")) == "onnxruntime"
    assert str(Variant("torch", "bf16")) == "torch:bf16"


@pytest.mark.parametrize("text, message", [
    ("tensorrt", "unknown inference backend 'tensorrt'"),
    ("torchscript:bf16", "torchscript does not run in 'bf16'"),
    ("onnxruntime:fp16", "onnxruntime does not run in 'fp16' (it runs in fp32, int8)"),
    ("torch:int4", "torch does not run in 'int4'"),
])
def test_unknown_combinations_are_refused_by_name(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Variant.parse(text)


def test_fp16_needs_a_gpu_and_int8_the_cpu():
    assert "needs a CUDA device" in str(Variant("torch", "fp16").unavailable(CPU))
    assert Variant("torch", "fp16").unavailable(GPU) is None
    assert "CPU only" in str(Variant("onnxruntime", "int8").unavailable(GPU))


@pytest.mark.parametrize("bf16_instructions", [True, False])
def test_the_default_sweep_holds_what_each_device_runs(monkeypatch, bf16_instructions):
    monkeypatch.setattr(variants, "native_bf16", lambda: bf16_instructions)
    on_cpu = {str(v) for v in candidates(CPU)}
    on_gpu = {str(v) for v in candidates(GPU)}
    bf16 = {"torch:bf16", "torch-compile:bf16"}
    assert on_cpu == {"torch", "torch-compile", "torchscript", "onnxruntime",
                      "onnxruntime:int8"} | (bf16 if bf16_instructions else set())
    assert on_gpu == {"torch", "torch-compile", "torchscript", "onnxruntime",
                      "torch:fp16", "torch-compile:fp16", "torch-graphs", "torch-graphs:bf16",
                      "torch-graphs:fp16"} | bf16


def test_bf16_on_a_cpu_that_would_emulate_it_is_refused_naming_why(monkeypatch):
    monkeypatch.setattr(variants, "native_bf16", lambda: False)
    assert "CPU with bf16 instructions" in str(Variant("torch", "bf16").unavailable(CPU))
    assert Variant("torch", "bf16").unavailable(GPU) is None


def test_settings_name_a_variant_and_refuse_impossible_ones():
    settings = load_settings(overrides={"model.backend": "onnxruntime",
                                        "model.precision": "int8"})
    assert (settings.model.backend, settings.model.precision) == ("onnxruntime", "int8")
    with pytest.raises(ConfigError, match="torchscript does not run in 'fp16'"):
        load_settings(overrides={"model.backend": "torchscript", "model.precision": "fp16"})
    with pytest.raises(ConfigError, match="precision comes from imgpipe optimize"):
        load_settings(overrides={"model.precision": "bf16"})

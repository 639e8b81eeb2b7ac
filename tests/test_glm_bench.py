"""`python -m bianque.bench glm` runs end to end (on a tiny shape) and prints the promised JSON."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from bianque import bench
from bianque.glm.config import GLMConfig

TINY = GLMConfig(vocab_size=300, hidden_size=32, num_attention_heads=4, num_layers=2, inner_hidden_size=48,
                 mask_token_id=290, gmask_token_id=291, bos_token_id=294, eos_token_id=295)
KEYS = {"prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_memory_gb", "effective_gbps", "matvec_gbps"}


@pytest.mark.parametrize("dtype, reported", [("float32", "float32"), ("bfloat16", "bfloat16"), ("bf16", "bfloat16")])
def test_bench_json_has_the_promised_fields(monkeypatch, capsys, dtype, reported):
    monkeypatch.setitem(bench.PRESETS, "mid", TINY)
    assert bench.main(["glm", "--preset", "mid", "--dtype", dtype, "--prompt-tokens", "8", "--new-tokens", "4",
                       "--repeats", "1", "--matvec-mb", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    assert result["dtype"] == reported
    assert all(result[k] > 0 for k in KEYS)
    assert result["matvec_gbps_best"] >= result["matvec_gbps"]  # the median is what decoding is held to
    assert result["decode_vs_matvec"] == pytest.approx(result["effective_gbps"] / result["matvec_gbps"])
    assert result["parameters"] == 300 * 32 + 2 * (4 * 32 + 4 * 32 * 33 + 48 * 33 + 32 * 49) + 64


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("FP16", torch.float16), ("bf16", torch.bfloat16),
                                         ("half", torch.float16), ("bfloat16", torch.bfloat16)])
def test_bench_accepts_the_same_dtype_names_as_convert_and_the_settings(name, dtype):
    cfg, _ = bench.parse_args(["glm", "--dtype", name])
    assert bench.DTYPES[cfg.dtype] is dtype


def test_weight_bytes_counts_each_tied_parameter_once():
    model = bench.random_model(TINY, torch.float32, torch.device("cpu"), pack=False)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    unique = {id(p): p for p in model.parameters()}.values()
    assert bench.weight_bytes(model) == sum(p.numel() * p.element_size() for p in unique)
    assert torch.isfinite(model(bench.prompt_ids(TINY, 6, torch.device("cpu"))).logits).all()


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs g++")
def test_bench_compile_times_the_compiled_step_and_reports_the_limit(monkeypatch, capsys):
    monkeypatch.setitem(bench.PRESETS, "mid", TINY)
    argv = ["glm", "--preset", "mid", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
            "--matvec-mb", "8", "--compile", "--bandwidth-gbps", "50", "--json"]
    try:
        assert bench.main(argv) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["compile"] is True and result["compiled"] is True and result["compile_s"] > 0
        assert KEYS <= set(result) and all(result[k] > 0 for k in KEYS)
        assert result["bandwidth_limit_gbps"] == 50
        assert result["decode_vs_limit"] == pytest.approx(result["effective_gbps"] / 50)
        text = bench.report(result)
        assert "compiled decode step" in text and "of the memory-bandwidth limit 50 GB/s" in text and "compile " in text
    finally:
        torch._dynamo.reset()


def test_bandwidth_limit_from_device_properties():
    h100 = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)  # kHz, bits (H100 SXM)
    assert bench.bandwidth_from_properties(h100) == pytest.approx(3352.32)
    assert bench.bandwidth_from_properties(SimpleNamespace(memory_clock_rate=0, memory_bus_width=5120)) is None
    assert bench.bandwidth_from_properties(object()) is None
    assert bench.bandwidth_limit_gbps(torch.device("cpu")) is None


def test_bench_without_a_limit_keeps_it_out_of_the_report(monkeypatch, capsys):
    monkeypatch.setitem(bench.PRESETS, "mid", TINY)
    assert bench.main(["glm", "--preset", "mid", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
                       "--matvec-mb", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bandwidth_limit_gbps"] is None and result["decode_vs_limit"] is None
    assert result["compile"] is False and result["compiled"] is None and result["compile_s"] is None


@pytest.mark.parametrize("quantize", [None, 4])
def test_bench_on_a_checkpoint_names_its_shape_and_counts_parameters_not_bytes(tmp_path, capsys, quantize):
    from tests.tiny_glm import SHAPE, build_tiny_glm

    ckpt = build_tiny_glm(tmp_path / "tiny")
    argv = ["glm", "--checkpoint", str(ckpt), "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
            "--matvec-mb", "8", "--json"] + (["--quantize", str(quantize)] if quantize else [])
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    config = json.loads((ckpt / "config.json").read_text())
    h, f, v, n = SHAPE["hidden_size"], SHAPE["inner_hidden_size"], config["vocab_size"], SHAPE["num_layers"]
    assert result["preset"] == "checkpoint" and result["load_s"] > 0 and result["quantize"] == quantize
    assert result["parameters"] == v * h + n * (4 * h + 4 * h * (h + 1) + f * (h + 1) + h * (f + 1)) + 2 * h
    full = result["parameters"] * 4  # float32 bytes
    assert result["weights_gb"] * 1e9 == pytest.approx(full) if quantize is None else result["weights_gb"] * 1e9 < full
    assert bench.preset_name(GLMConfig()) == "6b"


def test_bench_on_an_int4_converted_checkpoint_reports_quantize_4(tmp_path, capsys):
    from bianque.convert import convert
    from tests.tiny_glm import build_tiny_glm

    int4 = convert(build_tiny_glm(tmp_path / "tiny"), tmp_path / "int4", quantize=4)
    argv = ["glm", "--checkpoint", str(int4), "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
            "--matvec-mb", "8", "--json"]  # no --quantize: the checkpoint itself is int4
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantize"] == 4


def test_save_checkpoint_writes_the_hub_layout_that_the_loader_reads_back(tmp_path, monkeypatch, capsys):
    from bianque.glm.loader import load_model

    monkeypatch.setitem(bench.PRESETS, "mid", TINY)
    assert bench.main(["glm", "--preset", "mid", "--save-checkpoint", str(tmp_path / "ckpt")]) == 0
    assert str(tmp_path / "ckpt") in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin",
                     "pytorch_model-00003-of-00003.bin", "pytorch_model.bin.index.json"]
    index = json.loads((tmp_path / "ckpt" / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert index["transformer.word_embeddings.weight"].startswith("pytorch_model-00001")
    assert index["transformer.final_layernorm.weight"].startswith("pytorch_model-00003")
    loaded = load_model(tmp_path / "ckpt", dtype=torch.float16)
    expected = bench.random_model(TINY, torch.float16, torch.device("cpu"), pack=False)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), name

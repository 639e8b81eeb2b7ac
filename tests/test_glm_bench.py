"""`python -m bianque.bench glm` runs end to end (on a tiny shape) and prints the promised JSON."""
from __future__ import annotations

import json

import pytest
import torch

from bianque import bench
from bianque.glm.config import GLMConfig

TINY = GLMConfig(vocab_size=300, hidden_size=32, num_attention_heads=4, num_layers=2, inner_hidden_size=48,
                 mask_token_id=290, gmask_token_id=291, bos_token_id=294, eos_token_id=295)
KEYS = {"prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_memory_gb", "effective_gbps", "matvec_gbps"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_json_has_the_promised_fields(monkeypatch, capsys, dtype):
    monkeypatch.setitem(bench.PRESETS, "mid", TINY)
    assert bench.main(["glm", "--preset", "mid", "--dtype", dtype, "--prompt-tokens", "8", "--new-tokens", "4",
                       "--repeats", "1", "--matvec-mb", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    assert all(result[k] > 0 for k in KEYS)
    assert result["matvec_gbps_best"] >= result["matvec_gbps"]  # the median is what decoding is held to
    assert result["decode_vs_matvec"] == pytest.approx(result["effective_gbps"] / result["matvec_gbps"])
    assert result["parameters"] == 300 * 32 + 2 * (4 * 32 + 4 * 32 * 33 + 48 * 33 + 32 * 49) + 64


def test_weight_bytes_counts_each_tied_parameter_once():
    model = bench.random_model(TINY, torch.float32, torch.device("cpu"), pack=False)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    unique = {id(p): p for p in model.parameters()}.values()
    assert bench.weight_bytes(model) == sum(p.numel() * p.element_size() for p in unique)
    assert torch.isfinite(model(bench.prompt_ids(TINY, 6, torch.device("cpu"))).logits).all()

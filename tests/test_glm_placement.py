"""Multi-device placement (bianque/glm/placement.py): plans on fake budgets, meta models only."""
from __future__ import annotations

import pytest
import torch
from accelerate.utils import compute_module_sizes

from bianque.errors import ModelLoadError
from bianque.glm import GLMConfig
from bianque.glm.loader import load_model
from bianque.glm.placement import empty_model, module_device, parse_devices, pieces, plan_device_map
from tests.tiny_glm import build_tiny_glm

SIX_B = GLMConfig()   # BianQue-2's real shape; only meta tensors are ever built
GB = 10 ** 9


@pytest.fixture(autouse=True)
def _quiet_accelerate(monkeypatch):
    # accelerate warns that fake GPU indices are absent on this machine: expected here.
    import accelerate.utils.modeling as modeling
    monkeypatch.setattr(modeling.logger, "warning", lambda *a, **k: None)


def weight_bytes_per_device(device_map, dtype, quantize=None):
    sizes = compute_module_sizes(empty_model(SIX_B, dtype, quantize), dtype=dtype)
    totals: dict[str, int] = {}
    for piece, device in device_map.items():
        if piece != "lm_head":   # tied: the embedding's tensor, counted once
            totals[device] = totals.get(device, 0) + sizes[piece]
    return totals


def assert_whole_blocks_in_order(device_map, devices):
    assert list(device_map) == pieces(SIX_B)            # every piece placed, nothing split
    assert device_map["lm_head"] == device_map["transformer.word_embeddings"]
    order = [devices.index(device_map[p]) for p in pieces(SIX_B)[:-1]]
    assert order == sorted(order)                        # blocks follow the forward order


def test_fp16_6b_over_two_small_gpus():
    budgets = {"cuda:0": 8 * GB, "cuda:1": 8 * GB}
    device_map = plan_device_map(SIX_B, "cuda:0,cuda:1", max_memory=budgets, dtype=torch.float16)
    assert_whole_blocks_in_order(device_map, ["cuda:0", "cuda:1"])
    totals = weight_bytes_per_device(device_map, torch.float16)
    assert set(totals) == {"cuda:0", "cuda:1"}
    assert all(totals[d] <= budgets[d] for d in totals)
    assert sum(totals.values()) == pytest.approx(12.35 * GB, rel=1e-3)   # 6.17e9 params x 2 bytes


def test_three_devices_and_string_budgets():
    devices = ["cuda:0", "cuda:1", "cuda:2"]
    device_map = plan_device_map(SIX_B, devices, max_memory={d: "5GB" for d in devices}, dtype=torch.bfloat16)
    assert_whole_blocks_in_order(device_map, devices)
    assert set(device_map.values()) == set(devices)


def test_quantisation_is_counted():
    budgets = {"cuda:0": 3 * GB, "cuda:1": 3 * GB}
    with pytest.raises(ValueError, match=r"does not fit on cuda:0, cuda:1 .*--quantize"):
        plan_device_map(SIX_B, ["cuda:0", "cuda:1"], max_memory=budgets, dtype=torch.float16)
    device_map = plan_device_map(SIX_B, ["cuda:0", "cuda:1"], max_memory=budgets, dtype=torch.float16, quantize=4)
    assert_whole_blocks_in_order(device_map, ["cuda:0", "cuda:1"])
    totals = weight_bytes_per_device(device_map, torch.float16, quantize=4)
    assert sum(totals.values()) == pytest.approx(3.89 * GB, rel=1e-2)     # embedding fp16 + int4 blocks
    single = plan_device_map(SIX_B, ["cuda:0"], max_memory={"cuda:0": "7GB"}, dtype=torch.float16, quantize=8)
    assert set(single.values()) == {"cuda:0"}


def test_parse_devices():
    assert parse_devices("cuda:0, cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert parse_devices(["cuda"]) == [torch.device("cuda", 0)]
    if not torch.cuda.is_available():
        assert parse_devices("auto") == [torch.device("cpu")]
    for bad, message in (("cuda:0,cuda:0", "twice"), ("gpu0", "not a device"), ("", "no devices"), ("meta", "only cuda")):
        with pytest.raises(ValueError, match=message):
            parse_devices(bad)
    with pytest.raises(ValueError, match="not in the list"):
        plan_device_map(SIX_B, "cuda:0", max_memory={"cuda:1": "8GB"})


def test_module_device_uses_the_longest_prefix():
    device_map = {"": "cpu", "transformer.layers.1": "cuda:1", "transformer.layers.10": "cuda:2"}
    assert module_device(device_map, "transformer.layers.1.mlp.dense_h_to_4h.weight") == torch.device("cuda", 1)
    assert module_device(device_map, "transformer.layers.10") == torch.device("cuda", 2)
    assert module_device(device_map, "lm_head") == torch.device("cpu")
    with pytest.raises(KeyError):
        module_device({"transformer.layers.1": "cpu"}, "transformer.layers.12")


def test_loader_places_by_the_plan_and_reports_too_small_budgets(tmp_path):
    path = build_tiny_glm(tmp_path)
    plain = load_model(path)
    placed = load_model(path, devices="cpu", max_memory={"cpu": "1GB"})
    ids = torch.tensor([[7, 8, 9, plain.config.gmask_token_id, plain.config.bos_token_id]])
    assert torch.equal(placed(ids).logits, plain(ids).logits)
    with pytest.raises(ModelLoadError, match="does not fit on cpu"):
        load_model(path, devices="cpu", max_memory={"cpu": 1000})


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_split_a_tiny_model(tmp_path):
    path = build_tiny_glm(tmp_path)
    reference = load_model(path)
    sizes = compute_module_sizes(empty_model(reference.config, torch.float32), dtype=torch.float32)
    half = sizes[""] // 2 + sizes["transformer.layers.0"]
    model = load_model(path, devices="cuda:0,cuda:1", max_memory={"cuda:0": half, "cuda:1": 10 * half})
    devices = {p.device for p in model.parameters()}
    assert devices == {torch.device("cuda", 0), torch.device("cuda", 1)}
    ids = torch.tensor([[7, 8, 9, reference.config.gmask_token_id, reference.config.bos_token_id]])
    torch.testing.assert_close(model(ids.cuda()).logits.cpu(), reference(ids).logits, atol=1e-4, rtol=1e-4)
    caches = model.new_caches(1, 16)
    for layer, cache in zip(model.transformer.layers, caches):
        assert cache.keys.device == layer.input_layernorm.weight.device   # the cache follows its layer
    assert torch.equal(model.generate(ids.cuda(), max_new_tokens=4).cpu(), reference.generate(ids, max_new_tokens=4))


# --- long dialogues: memory is bounded by max_length -------------------------------------------

def test_consultation_memory_stops_growing_once_the_budget_is_reached(tmp_path):
    """12 turns through the real advisor (the benchmark runs 30): after the dialogue first fills
    max_length, no later turn's peak memory is higher. An unbounded prompt would add ~50 tokens
    of KV cache per turn (2 x 4 layers x 256 x 4 bytes = 8 kB per token, ~4 MB over the later
    turns); what remains is allocator noise and shape-keyed kernel caches (< 0.5 MB measured)."""
    from bianque import bench

    checkpoint = build_tiny_glm(tmp_path)
    tiny = GLMConfig.from_json(checkpoint)
    config = GLMConfig(**{**{f: getattr(tiny, f) for f in ("vocab_size", "bos_token_id", "eos_token_id",
                                                            "mask_token_id", "gmask_token_id", "pad_token_id")},
                          "hidden_size": 256, "num_attention_heads": 4, "num_layers": 4, "inner_hidden_size": 256})
    model = bench.random_model(config, torch.float32, torch.device("cpu"), pack=False)
    result = bench.run_consultation(model, str(checkpoint), turns=12, max_length=128, device=torch.device("cpu"))
    assert 1 < result["budget_first_reached_turn"] < 6
    growth = result["memory_after_budget_gb"] - result["memory_at_budget_gb"]
    assert growth * GB < 1.5e6, f"memory grew by {growth * GB / 1e6:.1f} MB after the budget was reached"
    assert len(result["memory_per_turn_gb"]) == 12

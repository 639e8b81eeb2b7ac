"""Prepacked CPU weights (bianque/glm/cpu_pack.py): same numbers as plain bfloat16 / float32."""
from __future__ import annotations

import pytest
import torch

from bianque.errors import ModelLoadError
from bianque.glm import GLMForCausalLM, GLMTokenizer
from bianque.glm import cpu_pack
from bianque.glm.cpu_pack import PackedHead, PackedLayout, PackedLinear, PackedRows, packing_available, packing_pays
from tests.tiny_glm import build_tiny_glm

# Decided from torch, not by the code under test: where oneDNN has bfloat16, packing must happen.
ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_onednn = pytest.mark.skipif(not ONEDNN_BF16, reason="this CPU/torch has no oneDNN bfloat16 support")
ONEDNN = torch.backends.mkldnn.is_available()
needs_onednn_fp32 = pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN")
F_linear = torch.nn.functional.linear


def test_packing_is_available_exactly_where_onednn_has_the_dtype():
    assert packing_available("cpu", torch.bfloat16) is bool(ONEDNN_BF16)
    assert packing_available("cpu", torch.float32) is bool(ONEDNN)
    assert not packing_available("cpu", torch.float16)
    assert not packing_available("meta", torch.bfloat16) and not packing_available("meta", torch.float32)


@needs_onednn_fp32
def test_float32_is_packed_by_default_only_where_the_probe_finds_it_faster(monkeypatch):
    probed = []
    monkeypatch.setattr(cpu_pack, "_float32_packing_pays", lambda hidden: probed.append(hidden) or True)
    assert not packing_pays("cpu", torch.float32, 64) and probed == []  # tiny models: no probe, no packing
    assert packing_pays("cpu", torch.float32, 1024) and probed == [1024]
    assert not packing_pays("meta", torch.float32, 1024)
    monkeypatch.setattr(cpu_pack, "_float32_packing_pays", lambda hidden: False)
    assert not packing_pays("cpu", torch.float32, 1024)
    assert packing_pays("cpu", torch.bfloat16, 64) is bool(ONEDNN_BF16)  # bfloat16: wherever available


@needs_onednn_fp32
def test_float32_probe_packs_only_when_packed_products_are_faster(monkeypatch):
    import time
    from types import SimpleNamespace

    from bianque import cpu_linear

    def slowed(fn):
        def slow(*args, **kwargs):
            time.sleep(0.002)
            return fn(*args, **kwargs)
        return slow

    probe = cpu_pack._float32_packing_pays
    probe.cache_clear()
    try:
        monkeypatch.setattr(cpu_pack, "_linear", slowed(cpu_pack._linear))
        assert probe(64) is False
        probe.cache_clear()
        monkeypatch.undo()
        monkeypatch.setattr(cpu_pack, "F", SimpleNamespace(linear=slowed(F_linear)))
        monkeypatch.setattr(cpu_linear, "weight_first", slowed(cpu_linear.weight_first))
        assert probe(64) is True
        assert probe(64) is True and probe.cache_info().hits == 1  # timed once per hidden size
    finally:
        probe.cache_clear()



@needs_onednn_fp32
def test_float32_packed_rows_and_linears_give_float32_numbers():
    weight = torch.randn(9000, 64, generator=torch.Generator().manual_seed(0))
    rows = PackedRows.from_weight(weight, rows=4096)  # 3 chunks, the last one short
    every = torch.arange(9000)
    assert torch.equal(rows.lookup(every.view(1, -1)), weight.view(1, 9000, 64))
    assert torch.equal(rows.lookup(torch.tensor([[8999]])), weight[-1].view(1, 1, -1))
    assert rows.layouts and all(layout is not None for layout in rows.layouts.values())  # read from the packed bytes
    h = torch.randn(2, 3, 64)
    torch.testing.assert_close(rows.project(h), F_linear(h, weight), atol=1e-5, rtol=1e-5)
    linear = torch.nn.Linear(64, 96)
    packed = PackedLinear(linear)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    assert packed.weight.dtype == torch.float32 and list(packed.state_dict()) == ["bias"]  # packing is no checkpoint format


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_glm(tmp_path_factory.mktemp("tiny_glm"))


@needs_onednn
def test_packed_rows_lookup_and_projection_match_plain():
    weight = torch.randn(70, 16).bfloat16()
    rows = PackedRows.from_weight(weight, rows=32)  # 3 chunks, the last one short
    ids = torch.tensor([[0, 31, 32, 69], [69, 5, 40, 0]])
    assert torch.equal(rows.lookup(ids), weight[ids])
    h = torch.randn(2, 3, 16).bfloat16()
    torch.testing.assert_close(rows.project(h), torch.nn.functional.linear(h, weight), atol=0, rtol=0)


@needs_onednn
@pytest.mark.parametrize("shape", [(300, 64), (9000, 1024), (70, 16)])
def test_lookup_reads_rows_out_of_the_packed_bytes(shape):
    """Default chunking (~16 MB) and shapes oneDNN pads: every row comes out exact, and it is the
    learned layout that serves it (the unpacking fallback stays unused)."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    rows = PackedRows.from_weight(weight)
    every = torch.arange(shape[0])
    assert torch.equal(rows.lookup(every.view(1, -1)), weight[every].view(1, *shape))
    assert torch.equal(rows.lookup(torch.tensor([[shape[0] - 1]])), weight[-1].view(1, 1, -1))  # a decode step
    assert rows.layouts and all(layout is not None for layout in rows.layouts.values())


@needs_onednn
def test_a_layout_is_only_used_where_it_reproduces_the_chunk():
    weight = torch.randn(64, 32).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    layout = PackedLayout.learn(64, 32)
    assert layout is not None and layout.matches(packed)
    swapped = PackedLayout(layout.row_offsets.flip(0), layout.col_offsets)
    assert not swapped.matches(packed)


@needs_onednn
def test_packed_model_gives_the_plain_bfloat16_numbers(tiny_dir):
    plain = GLMForCausalLM.from_pretrained(tiny_dir, dtype="bfloat16", pack=False)
    packed = GLMForCausalLM.from_pretrained(tiny_dir, dtype="bfloat16")  # packs by default here
    assert isinstance(packed.lm_head, PackedHead)
    assert isinstance(packed.transformer.layers[0].mlp.dense_h_to_4h, PackedLinear)
    ids = torch.tensor([GLMTokenizer.from_pretrained(tiny_dir).encode("病人：我头疼三天了\n医生：")])
    torch.testing.assert_close(packed(ids).logits.float(), plain(ids).logits.float(), atol=1e-2, rtol=0)
    assert torch.equal(packed.generate(ids, max_new_tokens=12), plain.generate(ids, max_new_tokens=12))


@needs_onednn_fp32
def test_packing_is_refused_where_it_cannot_work(tiny_dir):
    with pytest.raises(ModelLoadError, match="packed weights need one CPU with oneDNN"):
        GLMForCausalLM.from_pretrained(tiny_dir, dtype="float16", pack=True)
    assert not isinstance(GLMForCausalLM.from_pretrained(tiny_dir, dtype="float32").lm_head, PackedHead)  # tiny: plain


@needs_onednn_fp32
def test_float32_model_packed_where_it_pays_gives_the_plain_float32_numbers(tiny_dir, monkeypatch):
    plain = GLMForCausalLM.from_pretrained(tiny_dir, dtype="float32", pack=False)
    monkeypatch.setattr(cpu_pack, "FLOAT32_MIN_HIDDEN", 0)  # the tiny model counts as big enough
    monkeypatch.setattr(cpu_pack, "_float32_packing_pays", lambda hidden: True)
    packed = GLMForCausalLM.from_pretrained(tiny_dir, dtype="float32")
    assert isinstance(packed.lm_head, PackedHead)
    assert isinstance(packed.transformer.layers[0].attention.query_key_value, PackedLinear)
    ids = torch.tensor([GLMTokenizer.from_pretrained(tiny_dir).encode("病人：我头疼三天了\n医生：")])
    torch.testing.assert_close(packed(ids).logits, plain(ids).logits, atol=1e-4, rtol=0)
    assert torch.equal(packed.generate(ids, max_new_tokens=12), plain.generate(ids, max_new_tokens=12))
    monkeypatch.setattr(cpu_pack, "_float32_packing_pays", lambda hidden: False)
    assert not isinstance(GLMForCausalLM.from_pretrained(tiny_dir, dtype="float32").lm_head, PackedHead)


@needs_onednn
def test_lookup_unpacks_when_the_packed_bytes_cannot_be_reached(monkeypatch):
    from bianque.glm import cpu_pack
    monkeypatch.setattr(cpu_pack, "_bytes_of", lambda packed: None)
    weight = torch.randn(100, 32).bfloat16()
    rows = PackedRows.from_weight(weight, rows=64)
    assert torch.equal(rows.lookup(torch.tensor([[3, 99]])), weight[[3, 99]].view(1, 2, 32))
    assert list(rows.layouts.values()) == [None, None]

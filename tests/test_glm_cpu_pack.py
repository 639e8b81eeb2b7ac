"""Prepacked bfloat16 CPU weights (bianque/glm/cpu_pack.py): same numbers as plain bfloat16."""
from __future__ import annotations

import pytest
import torch

from bianque.errors import ModelLoadError
from bianque.glm import GLMForCausalLM, GLMTokenizer
from bianque.glm.cpu_pack import PackedHead, PackedLayout, PackedLinear, PackedRows, packing_available
from tests.tiny_glm import build_tiny_glm

# Decided from torch, not by the code under test: where oneDNN has bfloat16, packing must happen.
ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_onednn = pytest.mark.skipif(not ONEDNN_BF16, reason="this CPU/torch has no oneDNN bfloat16 support")


def test_packing_is_available_exactly_where_onednn_has_bfloat16():
    assert packing_available("cpu", torch.bfloat16) is bool(ONEDNN_BF16)
    assert not packing_available("cpu", torch.float32) and not packing_available("cpu", torch.float16)
    assert not packing_available("meta", torch.bfloat16)


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


@needs_onednn
def test_packing_is_refused_where_it_cannot_work(tiny_dir):
    with pytest.raises(ModelLoadError, match="packed weights need bfloat16"):
        GLMForCausalLM.from_pretrained(tiny_dir, dtype="float32", pack=True)
    assert not isinstance(GLMForCausalLM.from_pretrained(tiny_dir, dtype="float32").lm_head, PackedHead)


@needs_onednn
def test_lookup_unpacks_when_the_packed_bytes_cannot_be_reached(monkeypatch):
    from bianque.glm import cpu_pack
    monkeypatch.setattr(cpu_pack, "_bytes_of", lambda packed: None)
    weight = torch.randn(100, 32).bfloat16()
    rows = PackedRows.from_weight(weight, rows=64)
    assert torch.equal(rows.lookup(torch.tensor([[3, 99]])), weight[[3, 99]].view(1, 2, 32))
    assert list(rows.layouts.values()) == [None, None]

"""Prepacked bfloat16 CPU weights (bianque/glm/cpu_pack.py): same numbers as plain bfloat16."""
from __future__ import annotations

import pytest
import torch

from bianque.errors import ModelLoadError
from bianque.glm import GLMForCausalLM, GLMTokenizer
from bianque.glm.cpu_pack import PackedHead, PackedLinear, PackedRows, packing_available
from tests.tiny_glm import build_tiny_glm

pytestmark = pytest.mark.skipif(not packing_available("cpu", torch.bfloat16),
                                reason="this CPU/torch has no oneDNN bfloat16 support")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_glm(tmp_path_factory.mktemp("tiny_glm"))


def test_packed_rows_lookup_and_projection_match_plain():
    weight = torch.randn(70, 16).bfloat16()
    rows = PackedRows.from_weight(weight, rows=32)  # 3 chunks, the last one short
    ids = torch.tensor([[0, 31, 32, 69], [69, 5, 40, 0]])
    assert torch.equal(rows.lookup(ids), weight[ids])
    h = torch.randn(2, 3, 16).bfloat16()
    torch.testing.assert_close(rows.project(h), torch.nn.functional.linear(h, weight), atol=0, rtol=0)


def test_packed_model_gives_the_plain_bfloat16_numbers(tiny_dir):
    plain = GLMForCausalLM.from_pretrained(tiny_dir, dtype="bfloat16", pack=False)
    packed = GLMForCausalLM.from_pretrained(tiny_dir, dtype="bfloat16")  # packs by default here
    assert isinstance(packed.lm_head, PackedHead)
    assert isinstance(packed.transformer.layers[0].mlp.dense_h_to_4h, PackedLinear)
    ids = torch.tensor([GLMTokenizer.from_pretrained(tiny_dir).encode("病人：我头疼三天了\n医生：")])
    torch.testing.assert_close(packed(ids).logits.float(), plain(ids).logits.float(), atol=1e-2, rtol=0)
    assert torch.equal(packed.generate(ids, max_new_tokens=12), plain.generate(ids, max_new_tokens=12))


def test_packing_is_refused_where_it_cannot_work(tiny_dir):
    with pytest.raises(ModelLoadError, match="packed weights need bfloat16"):
        GLMForCausalLM.from_pretrained(tiny_dir, dtype="float32", pack=True)
    assert not isinstance(GLMForCausalLM.from_pretrained(tiny_dir, dtype="float32").lm_head, PackedHead)

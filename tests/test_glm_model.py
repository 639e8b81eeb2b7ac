"""The native ChatGLM without reference fixtures: position/mask rules, KV cache, generator, loader errors."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from bianque.errors import ModelLoadError
from bianque.glm import GLMConfig, GLMForCausalLM, GLMTokenizer
from bianque.glm.generate import decode_mask_row, generate_tokens, grow_mask_row, next_position_ids
from bianque.glm.loader import TensorIndex
from bianque.glm.model import (KVCache, build_inputs, find_context_and_mask, glm_attention_mask, glm_position_ids,
                               rotary_inv_freq)
from bianque.sampling import SamplingParams
from tests.tiny_glm import build_tiny_glm

CONFIG = GLMConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_layers=3, inner_hidden_size=48,
                   bos_token_id=60, eos_token_id=61, mask_token_id=62, gmask_token_id=63, pad_token_id=3)
BOS, EOS, MASK, GMASK = 60, 61, 62, 63


@pytest.fixture(scope="module")
def model() -> GLMForCausalLM:
    torch.manual_seed(0)
    net = GLMForCausalLM(CONFIG).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_glm(tmp_path_factory.mktemp("tiny_glm"))


# --- the position and mask rules ---------------------------------------------------------------

def test_position_ids_share_the_mask_position_after_sop():
    assert glm_position_ids(6, 4, 3).tolist() == [[0, 1, 2, 3, 3, 3], [0, 0, 0, 0, 1, 2]]
    assert glm_position_ids(4, 4, None).tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]  # no <sop>: all context


def test_attention_mask_prefix_is_bidirectional_and_blind_to_sop():
    mask = glm_attention_mask(5, 3)[0].int().tolist()
    assert mask == [[0, 0, 0, 1, 1],
                    [0, 0, 0, 1, 1],
                    [0, 0, 0, 1, 1],
                    [0, 0, 0, 0, 1],
                    [0, 0, 0, 0, 0]]


def test_model_prefers_gmask_and_requires_sop_and_a_mask_token():
    assert find_context_and_mask([5, MASK, 7, GMASK, BOS], CONFIG) == (4, 3)
    assert find_context_and_mask([5, MASK, 7, GMASK, BOS], CONFIG, prefer_gmask=False) == (4, 1)
    with pytest.raises(ValueError, match="<sop>"):
        find_context_and_mask([5, GMASK], CONFIG)
    with pytest.raises(ValueError, match=r"\[gMASK\]"):
        find_context_and_mask([5, BOS], CONFIG)


def test_build_inputs_rows_differ():
    ids = torch.tensor([[5, 6, GMASK, BOS, 9], [5, GMASK, BOS, 8, 9]])
    mask, positions = build_inputs(ids, CONFIG)
    assert positions.tolist() == [[[0, 1, 2, 2, 2], [0, 0, 0, 1, 2]], [[0, 1, 1, 1, 1], [0, 0, 1, 2, 3]]]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool


def test_forward_builds_the_mask_even_when_positions_are_given(model):
    ids = torch.tensor([[5, 9, 11, GMASK, BOS, 7]])
    _, positions = build_inputs(ids, CONFIG)
    assert torch.equal(model(ids, position_ids=positions).logits, model(ids).logits)
    with pytest.raises(ValueError, match="position_ids"):
        caches = model.new_caches(1, 8)
        model(ids, caches=caches)
        model(ids[:, -1:], caches=caches)


def test_decode_step_positions_and_mask_rows():
    assert next_position_ids(torch.tensor([[[7], [3]]])).tolist() == [[[7], [4]]]
    assert decode_mask_row(glm_attention_mask(4, 2)[None]) is None  # unpadded: no mask needed
    padded = torch.nn.functional.pad(glm_attention_mask(3, 2), (1, 0, 1, 0), value=True)[None]
    row = decode_mask_row(padded)
    assert row.int().tolist() == [[[[1, 0, 0, 0]]]]
    assert grow_mask_row(row).int().tolist() == [[[[1, 0, 0, 0, 0]]]]


def test_inv_freq_rounded_to_fp16():
    assert rotary_inv_freq(8).tolist() == [1.0, 0.0999755859375, 0.01000213623046875, 0.0010004043579101562]


# --- the KV cache ------------------------------------------------------------------------------

def test_kv_cache_grows_and_keeps_contents():
    cache = KVCache(1, 2, 2, 4, torch.float32, torch.device("cpu"))
    first = torch.randn(1, 2, 2, 4)
    cache.update(first, first)
    keys, values = cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    assert keys.shape == (1, 2, 5, 4) and cache.length == 5
    assert torch.equal(keys[:, :, :2], first) and torch.equal(values[:, :, 2:], torch.ones(1, 2, 3, 4))


def test_cached_decoding_equals_full_forward(model):
    ids = torch.tensor([[5, 9, 11, 7, GMASK, BOS], [8, 2, 4, 6, GMASK, BOS]])
    tokens = list(generate_tokens(model, ids, 8))
    full_ids = torch.cat([ids, torch.stack(tokens, 1)], dim=1)
    full = model(full_ids).logits
    caches = model.new_caches(2, 2)  # deliberately small: exercises growth
    mask, positions = build_inputs(ids, CONFIG)
    step = model(ids, mask, positions, caches=caches).logits
    torch.testing.assert_close(step, full[:, :6], atol=1e-5, rtol=1e-5)
    pos = positions[:, :, -1:]
    for i, token in enumerate(tokens[:-1]):
        pos = next_position_ids(pos)
        step = model(token[:, None], None, pos, caches=caches).logits[:, -1]
        torch.testing.assert_close(step, full[:, 6 + i], atol=1e-5, rtol=1e-5)
        assert torch.equal(step.argmax(-1), tokens[i + 1])


def test_generation_stops_at_eos_and_pads_finished_rows(model):
    ids = torch.tensor([[5, 9, GMASK, BOS], [8, 2, GMASK, BOS]])

    def row0_says_eos_at_once(seq, scores):  # row 1 never does
        scores = scores.clone()
        if seq.shape[1] == ids.shape[1]:
            scores[0, EOS] = 1e4
        scores[1, EOS] = -1e4
        return scores

    tokens = torch.stack(list(generate_tokens(model, ids, 5, processors=[row0_says_eos_at_once])), 1)
    assert tokens[0].tolist() == [EOS] + [CONFIG.pad_token_id] * 4
    assert EOS not in tokens[1].tolist()


def test_generation_ends_when_every_row_said_eos(model):
    only_eos = lambda seq, scores: torch.where(torch.arange(scores.shape[-1]) == EOS, 1e4, -1e4).expand_as(scores)  # noqa: E731
    ids = torch.tensor([[5, 9, GMASK, BOS]])
    assert [t.tolist() for t in generate_tokens(model, ids, 10, processors=[only_eos])] == [[EOS]]
    assert model.generate(ids, max_new_tokens=3).shape == (1, 7)


def test_nan_logits_emit_the_fallback_token(model):
    ids = torch.tensor([[5, 9, GMASK, BOS]])
    nan = lambda seq, scores: torch.full_like(scores, float("nan"))  # noqa: E731
    assert [t.item() for t in generate_tokens(model, ids, 2, processors=[nan])] == [5, 5]


def test_sampling_is_seeded_and_respects_top_k(model):
    ids = torch.tensor([[5, 9, 11, GMASK, BOS]])
    params = SamplingParams(True, 0.95, 0.7, 50)
    runs = [[t.item() for t in generate_tokens(model, ids, 12, params, generator=torch.Generator().manual_seed(3))]
            for _ in range(2)]
    assert runs[0] == runs[1]
    greedy = [t.item() for t in generate_tokens(model, ids, 12)]
    top1 = [t.item() for t in generate_tokens(model, ids, 12, SamplingParams(True, 1.0, 1.0, 1),
                                              generator=torch.Generator().manual_seed(3))]
    assert top1 == greedy  # top-k 1 sampling is greedy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_float32(model, dtype):
    ids = torch.tensor([[5, 9, 11, 7, GMASK, BOS]])
    half = GLMForCausalLM(CONFIG).to(dtype).eval()
    half.load_state_dict(model.state_dict())
    ref = model(ids).logits
    got = half(ids).logits.float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


# --- the loader --------------------------------------------------------------------------------

def test_tiny_checkpoint_loads_with_tied_head(tiny_dir):
    model = GLMForCausalLM.from_pretrained(tiny_dir, device="cpu", dtype="float32")
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert not any(p.requires_grad for p in model.parameters())
    tokenizer = GLMTokenizer.from_pretrained(tiny_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (model.config.bos_token_id, model.config.eos_token_id)
    assert (tokenizer.mask_token_id, tokenizer.gmask_token_id) == (model.config.mask_token_id, model.config.gmask_token_id)
    assert tokenizer.encode("病人：头疼\n医生：")[-2:] == [model.config.gmask_token_id, model.config.bos_token_id]


def _rewrite(tiny_dir, tmp_path, edit) -> str:
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


def test_loader_lists_missing_unexpected_and_misshaped(tiny_dir, tmp_path):
    def damage(t):
        del t["transformer.layers.1.mlp.dense_4h_to_h.bias"]
        t["transformer.layers.0.extra.weight"] = torch.zeros(2)
        t["transformer.layers.0.attention.dense.weight"] = torch.zeros(3, 3)

    with pytest.raises(ModelLoadError) as err:
        GLMForCausalLM.from_pretrained(_rewrite(tiny_dir, tmp_path, damage))
    message = str(err.value)
    assert "missing (1): transformer.layers.1.mlp.dense_4h_to_h.bias" in message
    assert "unexpected (1): transformer.layers.0.extra.weight" in message
    assert "transformer.layers.0.attention.dense.weight: checkpoint [3, 3] vs model [32, 32]" in message


def test_loader_ignores_inv_freq_and_accepts_a_head_only_embedding(tiny_dir, tmp_path):
    reference = GLMForCausalLM.from_pretrained(tiny_dir)

    def head_only(t):
        t["lm_head.weight"] = t.pop("transformer.word_embeddings.weight")
        t["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)

    model = GLMForCausalLM.from_pretrained(_rewrite(tiny_dir, tmp_path, head_only))
    ids = torch.tensor([GLMTokenizer.from_pretrained(tiny_dir).encode("头疼")])
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_loader_reads_sharded_bin_with_index(tiny_dir, tmp_path):
    out = tmp_path / "sharded"
    out.mkdir()
    for name in ("config.json", "ice_text.model", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, out)
    tensors = load_file(tiny_dir / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.word_embeddings.weight"]
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, members in shards.items():
        torch.save({n: tensors[n].clone() for n in members}, out / shard)
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = torch.tensor([GLMTokenizer.from_pretrained(tiny_dir).encode("头疼")])
    assert torch.equal(GLMForCausalLM.from_pretrained(out)(ids).logits, GLMForCausalLM.from_pretrained(tiny_dir)(ids).logits)
    (out / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ModelLoadError, match="shard pytorch_model-00002-of-00002.bin"):
        GLMForCausalLM.from_pretrained(out)


def test_loader_clear_errors_for_missing_files(tmp_path, tiny_dir):
    with pytest.raises(ModelLoadError, match="no config.json"):
        GLMForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        GLMForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="ice_text.model"):
        GLMTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="quantize must be 4 or 8"):
        GLMForCausalLM.from_pretrained(tiny_dir, quantize=3)


def test_bin_loading_refuses_pickled_code(tiny_dir, tmp_path):
    out = tmp_path / "evil"
    out.mkdir()
    shutil.copy(tiny_dir / "config.json", out)
    torch.save({"transformer.word_embeddings.weight": torch.zeros(1), "payload": print}, out / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="cannot safely read pytorch_model.bin"):
        GLMForCausalLM.from_pretrained(out)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS via /proc and MADV_DONTNEED are Linux-only")
def test_bin_shard_pages_are_released_once_copied(tmp_path):
    """Copying tensors out of a memory-mapped .bin must not leave the shard's pages resident
    next to the copies (the 6B .bin load peaked 3 GB above its safetensors load): the file pages
    of each copied tensor are dropped at once, and the data stays correct."""
    reference = {f"w{i}": torch.randn(512, 8192, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference, path)
    size_mb = 16.0  # each tensor
    growth = {}
    for release in (False, True):
        index = TensorIndex()
        index.add_bin(path)
        names, copies, start, peak = list(index.shapes), [], _rss_mb(), 0.0
        for name in names[:-1]:  # the last tensor keeps the mapping alive while we measure
            copies.append(index.take(name, torch.clone) if release else index.take(name).clone())
            peak = max(peak, _rss_mb() - start)
        copies.append(index.take(names[-1], torch.clone))
        assert all(torch.equal(copy, reference[name]) for name, copy in zip(names, copies))
        growth[release] = peak
        del copies, index
    copied = 5 * size_mb
    assert growth[False] > 1.7 * copied      # the copies plus the shard's pages
    assert growth[True] < 1.3 * copied       # just the copies


# --- reference rules checked without the fixtures (they also run where ../shared is absent) ----

def test_blank_runs_and_tabs_become_the_reference_pieces_and_back():
    from bianque.glm.tokenizer import postprocess, preprocess

    assert preprocess("a b") == "a b"  # one space stays a space
    assert preprocess("a  b\n\tc") == "a<|blank_2|>b<n><|tab|>c"
    assert preprocess("x" + " " * 83 + "y") == "x<|blank_80|><|blank_3|>y"
    assert preprocess("x" + " " * 81 + "y") == "x<|blank_80|> y"  # a leftover single space
    assert postprocess("a<|blank_2|>b<n><|tab|>c<|blank_80|><|blank_3|>d") == "a  b\n\tc" + " " * 83 + "d"


def test_rotary_pairs_each_half_neox_style():
    """rotate_half pairs dimension i with i + r/2 (not even/odd neighbours); with angle θ the pair
    (a, b) turns to (a·cosθ − b·sinθ, b·cosθ + a·sinθ); the first half of a head turns with
    channel 0 (token positions), the second with channel 1 (block positions)."""
    from bianque.glm.model import apply_rotary_2d, rotate_half

    assert rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-3.0, -4.0, 1.0, 2.0]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).view(1, 1, 1, 8)
    cos = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).view(1, 2, 1, 4)  # 90° on channel 0 only
    sin = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]).view(1, 2, 1, 4)
    assert apply_rotary_2d(x, cos, sin).flatten().tolist() == [-3.0, -4.0, 1.0, 2.0, 5.0, 6.0, 7.0, 8.0]


def test_attention_with_layer_coeff_is_plain_scaled_dot_product_in_float32():
    """The reference divides q by sqrt(hd)·(l+1) and multiplies the scores by (l+1) again: in
    float32 the result is ordinary softmax(q·kᵀ/√hd)·v, computed here by hand for layer 3."""
    from bianque.glm.model import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(CONFIG, layer_index=2).eval().requires_grad_(False)
    assert attn.layer_coeff == 3.0
    b, s, heads, hd = 1, 5, CONFIG.num_attention_heads, CONFIG.hidden_size // CONFIG.num_attention_heads
    x = torch.randn(b, s, CONFIG.hidden_size)
    cos, sin = torch.ones(b, 2, s, hd // 2), torch.zeros(b, 2, s, hd // 2)  # no rotation
    qkv = attn.query_key_value(x).view(b, s, heads, 3, hd)  # q, k, v interleaved per head
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    probs = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1)
    expected = attn.dense((probs @ v).transpose(1, 2).reshape(b, s, -1))
    torch.testing.assert_close(attn(x, cos, sin, None, None), expected, atol=1e-5, rtol=1e-5)

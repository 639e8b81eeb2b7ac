"""`python -m bianque convert`: sharded safetensors, dtype change, int8/int4 storage, and loading it back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bianque import convert as convert_module
from bianque.cli import main as cli_main
from bianque.convert import convert, main, parse_size, plan_tensors, split_shards
from bianque.errors import ModelLoadError
from bianque.glm import GLMForCausalLM
from bianque.glm.quant import QuantLinear, pack_int4, quantize_weight
from tests.tiny_glm import build_tiny_glm

LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_glm(tmp_path_factory.mktemp("tiny_glm"))


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text(encoding="utf-8"))
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(directory / shard)))
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def logits(model: GLMForCausalLM, config: dict) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99, 7, config["gmask_token_id"], config["bos_token_id"]]])
    return model(ids).logits


def test_plain_conversion_keeps_names_values_and_side_files(tiny, tmp_path):
    (tiny / "modeling_chatglm.py").write_text("raise SystemExit('remote code must not travel')\n")
    out = convert(tiny, tmp_path / "out")
    source = load_file(str(tiny / "model.safetensors"))
    written = read_checkpoint(out)
    assert set(written) == set(source)
    for name, tensor in source.items():
        assert written[name].dtype == torch.float16 and torch.equal(written[name], tensor), name
    for name in ("ice_text.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny / name).read_bytes()
    assert not (out / "modeling_chatglm.py").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny / "config.json").read_text())
    config = json.loads((tiny / "config.json").read_text())
    torch.testing.assert_close(logits(GLMForCausalLM.from_pretrained(out), config),
                               logits(GLMForCausalLM.from_pretrained(tiny), config), atol=0, rtol=0)


def test_bin_source_drops_tied_head_and_inv_freq(tiny, tmp_path):
    source = load_file(str(tiny / "model.safetensors"))
    pickled = dict(source, **{"lm_head.weight": source["transformer.word_embeddings.weight"].clone(),
                              "transformer.layers.0.attention.rotary_emb.inv_freq": torch.ones(2)})
    src = tmp_path / "bin"
    src.mkdir()
    torch.save(pickled, src / "pytorch_model.bin")
    for name in ("config.json", "ice_text.model", "tokenizer_config.json"):
        (src / name).write_bytes((tiny / name).read_bytes())
    written = read_checkpoint(convert(src, tmp_path / "out"))
    assert set(written) == set(source)
    assert all(torch.equal(written[n], t) for n, t in source.items())


def test_dtype_bf16(tiny, tmp_path):
    out = convert(tiny, tmp_path / "out", dtype="bf16")
    written = read_checkpoint(out)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    source = load_file(str(tiny / "model.safetensors"))
    assert torch.equal(written["transformer.final_layernorm.bias"], source["transformer.final_layernorm.bias"].bfloat16())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_conversion_stores_the_reference_format(tiny, tmp_path, bits):
    out = convert(tiny, tmp_path / "out", dtype="fp16", quantize=bits)
    source = load_file(str(tiny / "model.safetensors"))
    written = read_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_bit"] == bits
    quantized = {f"transformer.layers.{i}.{name}.weight" for i in range(config["num_layers"]) for name in LINEARS}
    assert set(written) == set(source) | {n + "_scale" for n in quantized}
    for name in quantized:
        q, scale = quantize_weight(source[name], bits, torch.float16)
        assert torch.equal(written[name], pack_int4(q) if bits == 4 else q), name
        assert torch.equal(written[name + "_scale"], scale), name
    h = config["hidden_size"]
    assert written["transformer.layers.0.attention.query_key_value.weight"].shape == (3 * h, h // 2 if bits == 4 else h)
    assert torch.equal(written["transformer.word_embeddings.weight"], source["transformer.word_embeddings.weight"])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_loads_like_quantizing_at_load_time(tiny, tmp_path, bits):
    """A checkpoint written with quantization_bit gives exactly the numbers of loading the
    full-precision checkpoint with quantize=bits (float32 scales on both sides)."""
    out = convert(tiny, tmp_path / "out", dtype="fp32", quantize=bits)
    stored = GLMForCausalLM.from_pretrained(out)
    at_load = GLMForCausalLM.from_pretrained(tiny, quantize=bits)
    assert isinstance(stored.transformer.layers[1].mlp.dense_4h_to_h, QuantLinear)
    config = json.loads((tiny / "config.json").read_text())
    torch.testing.assert_close(logits(stored, config), logits(at_load, config), atol=0, rtol=0)
    with pytest.raises(ModelLoadError, match=f"stored as int{bits}"):
        GLMForCausalLM.from_pretrained(out, quantize=12 - bits)


def test_shards_respect_the_size_limit(tiny, tmp_path, monkeypatch):
    """Streaming: every save holds at most one shard's worth of tensors."""
    saved_sizes = []
    real_save = convert_module.save_file

    def recording_save(tensors, path, metadata=None):
        saved_sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(convert_module, "save_file", recording_save)
    config = json.loads((tiny / "config.json").read_text())
    embedding_bytes = config["vocab_size"] * config["hidden_size"] * 2
    limit = 10_000   # the embedding alone exceeds it; a block's tensors (~16 kB) need two shards
    assert embedding_bytes > limit
    out = convert(tiny, tmp_path / "out", max_shard_bytes=limit)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) == len(saved_sizes) >= 3
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert saved_sizes[0] == embedding_bytes and all(size <= limit for size in saved_sizes[1:])
    with safe_open(str(out / shards[0]), framework="pt") as f:
        assert list(f.keys()) == ["transformer.word_embeddings.weight"]
    assert set(read_checkpoint(out)) == set(load_file(str(tiny / "model.safetensors")))


def test_plan_and_split():
    shapes = {"lm_head.weight": (10, 4), "transformer.word_embeddings.weight": (10, 4),
              "transformer.layers.10.attention.dense.weight": (4, 4), "transformer.layers.2.attention.dense.weight": (4, 4),
              "transformer.layers.2.attention.rotary_emb.inv_freq": (1,), "transformer.final_layernorm.weight": (4,)}
    plan = plan_tensors(shapes, dtype_size=2, bits=4)
    assert [p.name for p in plan] == ["transformer.word_embeddings.weight", "transformer.layers.2.attention.dense.weight",
                                      "transformer.layers.10.attention.dense.weight", "transformer.final_layernorm.weight"]
    assert [p.nbytes for p in plan] == [80, 4 * 2 + 4 * 2, 16, 8]   # int4 [4, 2] + fp16 scale [4]
    assert [[p.nbytes for p in shard] for shard in split_shards(plan, 32)] == [[80], [16, 16], [8]]
    assert parse_size("2GB") == 2 * 1024 ** 3 and parse_size("500mb") == 500 * 1024 ** 2 and parse_size("123") == 123


def test_cli_and_errors(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["convert", str(tiny), str(out), "--quantize", "8"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main([str(tiny), str(out)]) == 2
    assert "already holds weights" in capsys.readouterr().err
    assert main([str(out), str(tmp_path / "again"), "--quantize", "4"]) == 2
    assert "already quantised to int8" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main([str(tiny), str(tiny)]) == 2
    assert "differ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tiny), str(tmp_path / "y"), "--dtype", "int3"])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_converted_tensors_never_alias_the_source(dtype):
    """The source's file pages are released right after conversion, so outputs must be copies,
    contiguous, even when no dtype change is asked for."""
    source = torch.randn(8, 6)[:, ::2]  # a non-contiguous view
    item = convert_module.Planned("x", "x", tuple(source.shape), None, 0)
    (name, out), = convert_module.converted(item, source, dtype)
    assert name == "x" and out.is_contiguous()
    assert out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
    torch.testing.assert_close(out.float(), source.to(dtype or source.dtype).float())
    ids = torch.arange(6).view(2, 3)
    (_, same), = convert_module.converted(item, ids, dtype)
    assert torch.equal(same, ids) and same.untyped_storage().data_ptr() != ids.untyped_storage().data_ptr()


def test_missing_source_names_the_src_argument_not_an_env_var(tmp_path):
    from bianque.convert import convert
    from bianque.errors import ModelLoadError

    with pytest.raises(ModelLoadError) as err:
        convert(tmp_path / "no-such-checkpoint", tmp_path / "out")
    assert f"no such directory {tmp_path}/no-such-checkpoint; set the SRC argument to" in str(err.value)
    assert "BIANQUE_V2_MODEL" not in str(err.value)


def test_converted_shards_are_readable_by_others(tmp_path):
    import os
    import stat

    from bianque.convert import convert
    from tests.tiny_glm import build_tiny_glm

    old = os.umask(0o022)
    try:
        out = convert(build_tiny_glm(tmp_path / "tiny"), tmp_path / "out", quantize=8)
    finally:
        os.umask(old)
    shards = sorted(out.glob("*.safetensors"))
    assert shards and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in shards)

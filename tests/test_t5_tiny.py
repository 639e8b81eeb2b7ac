"""The tiny BianQue-1.0 builder: hub layout, ChatYuan's special-piece layout, deterministic bytes."""
from __future__ import annotations

import json

import sentencepiece as spm
from safetensors import safe_open

from tiny_t5 import TOKENIZER_CONFIG, build_tiny_t5


def test_layout_and_special_pieces(tmp_path):
    path = build_tiny_t5(tmp_path / "t5")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"]
    sp = spm.SentencePieceProcessor(model_file=str(path / "spiece.model"))
    assert [sp.id_to_piece(i) for i in range(9)] == ["<pad>", "</s>", "<unk>", "，", "？", "：", "。", "\\n", "\\t"]
    assert sp.bos_id() == -1
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert config["vocab_size"] == sp.get_piece_size()
    assert config["tie_word_embeddings"] is False
    assert json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")) == TOKENIZER_CONFIG
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {"shared.weight", "lm_head.weight"} <= set(f.keys())


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a, b, c = (build_tiny_t5(tmp_path / name, seed=s) for name, s in (("a", 0), ("b", 0), ("c", 1)))
    for name in ("config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()

"""A tiny BianQue-1.0-like checkpoint for tests: random T5 weights and a SentencePiece model trained here.

`build_tiny_t5(dir)` writes the hub layout of `scutcyr/BianQue-1.0` (config.json, model.safetensors,
spiece.model, tokenizer_config.json) so tests drive the real loader without any network access.
The T5 has the real architecture (gated-gelu, untied head, as ChatYuan-large-v2) at a toy size,
and the tokenizer is trained with the real SentencePiece settings (pad 0, eos 1, unk 2, no bos,
the six user-defined symbols at ids 3-8, nmt_nfkc) on a generated Chinese medical dialogue corpus.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

# ChatYuan-large-v2's tokenizer_config.json, byte for byte what the 2023 app loaded.
TOKENIZER_CONFIG = {
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "extra_ids": 0,
    "additional_special_tokens": None,
    "model_max_length": 2048,
    "name_or_path": "t5-large",
}
USER_SYMBOLS = ["，", "？", "：", "。", "\\n", "\\t"]  # the last two are backslash-n / backslash-t
VOCAB_SIZE = 320

_SYMPTOMS = ["头疼", "头晕", "咳嗽", "发热", "失眠", "腹痛", "恶心", "乏力", "胸闷", "腰痛", "拉肚子", "嗓子疼",
             "皮肤痒", "心慌", "牙疼", "便秘", "流鼻涕", "关节痛", "呕吐", "发烧"]
_DURATIONS = ["三天了", "一周了", "两个月了", "半年了", "今天早上开始", "好几年了", "昨天晚上开始"]
_QUESTIONS = ["多久了？", "有没有发热？", "是否伴有咳嗽？", "有无过敏史？", "吃过什么药吗？", "疼痛在什么部位？",
              "请描述一下疼痛的部位。", "晚上睡得怎么样？", "大便正常吗？", "以前有过类似情况吗？"]
_ADVICE = ["建议多喝水，注意休息。", "建议到医院做个检查。", "可以口服布洛芬，体温38.5°C以上再用。",
           "饮食清淡，避免辛辣刺激。", "如果症状加重请及时就医。"]
_PATIENT_EXTRA = ["我", "最近", "经常", "有点", "孩子", "老人", "一直", "晚上", "吃了药也不好", "不知道怎么办"]


def tiny_corpus(seed: int = 0, lines: int = 400) -> list[str]:
    """Escaped dialogues in the app's prompt format (`病人：…\\n医生：…`), generated deterministically."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        turns = []
        for _ in range(rng.randint(1, 3)):
            patient = rng.choice(_PATIENT_EXTRA) + rng.choice(_SYMPTOMS) + rng.choice(_DURATIONS)
            doctor = rng.choice(_QUESTIONS + _ADVICE)
            turns.append(f"病人：{patient}\\n医生：{doctor}")
        out.append("\\n".join(turns) + ("\\t" if rng.random() < 0.1 else ""))
    return out


def train_tiny_spiece(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> bytes:
    """Serialized unigram SentencePiece model with the ChatYuan special layout; same bytes for the same seed."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        user_defined_symbols=USER_SYMBOLS,
        normalization_rule_name="nmt_nfkc",
        num_threads=1,  # one thread keeps training deterministic
        minloglevel=2,
    )
    return model.getvalue()


def tiny_t5_config(vocab_size: int) -> dict:
    """ChatYuan-large-v2's config.json (gated-gelu, untied lm_head) shrunk to a toy size."""
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": vocab_size, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
        "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
        "tie_word_embeddings": False, "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "use_cache": True,
    }


def untied_state_dict(model: T5ForConditionalGeneration, seed: int) -> dict[str, torch.Tensor]:
    """Weights as the real checkpoint stores them: `shared.weight` plus its own `lm_head.weight`.

    transformers 5.x always ties `lm_head` to `shared` when it builds a T5, but ChatYuan/BianQue-1.0
    (T5 v1.1 style) has a separate head, and 5.x keeps both when both are in the checkpoint. The tiny
    model must exercise that same path, so the head gets its own seeded random values here.
    """
    tensors = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()
               if name not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
    head = torch.Generator().manual_seed(seed + 1)
    tensors["lm_head.weight"] = torch.randn(tensors["shared.weight"].shape, generator=head) * 0.3
    return tensors


def build_tiny_t5(dir: str | Path, seed: int = 0) -> Path:
    """Write a BianQue-1.0 hub-layout checkpoint with random weights into `dir` and return its path."""
    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    spiece = train_tiny_spiece(seed)
    (path / "spiece.model").write_bytes(spiece)
    vocab_size = spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    fields = tiny_t5_config(vocab_size)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**fields)).eval()
    save_file(untied_state_dict(model, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    # `tie_word_embeddings: false`, as in the real config.json, is also what makes transformers 5.x
    # skip the T5 v1.0 output scaling; ChatYuan (T5 v1.1) must not scale.
    _write_json(path / "config.json", fields)
    _write_json(path / "tokenizer_config.json", TOKENIZER_CONFIG)
    return path


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")

"""A tiny BianQue-2-like checkpoint for tests: random ChatGLM weights and a SentencePiece model trained here.

`build_tiny_glm(dir)` writes BianQue-2's file layout (config.json, generation_config.json,
model.safetensors in fp16 without the tied lm_head, ice_text.model, tokenizer_config.json,
special_tokens_map.json) so tests drive the real loader, tokenizer and generator offline.
The SentencePiece model has ChatGLM's special pieces (`<n>`, `[MASK]`, `[gMASK]`, `<sop>`,
`<eop>`, `<|tab|>`, `<|blank_2..80|>`, byte fallback, nmt_nfkc) at small ids, and config.json
names those ids, as the real config names 130000+. The final LayerNorm's bias leans towards
`<eop>` so that sampled replies end after a handful of tokens instead of running to max_length.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

# BianQue-2's tokenizer_config.json / special_tokens_map.json / generation_config.json, as shipped.
TOKENIZER_CONFIG = {
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    "bos_token": "<sop>", "clean_up_tokenization_spaces": True, "do_lower_case": False, "end_token": "</s>",
    "eos_token": "<eop>", "gmask_token": "[gMASK]", "mask_token": "[MASK]",
    "model_max_length": 1000000000000000019884624838656, "num_image_tokens": 0, "pad_token": "<pad>",
    "padding_side": "left", "remove_space": False, "tokenizer_class": "ChatGLMTokenizer", "unk_token": "<unk>",
}
SPECIAL_TOKENS_MAP = {"bos_token": "<sop>", "eos_token": "<eop>", "mask_token": "[MASK]", "pad_token": "<pad>",
                      "unk_token": "<unk>"}
CONTROL = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
USER = ["<n>", "<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]
VOCAB_SIZE = 700
SHAPE = {"hidden_size": 32, "num_attention_heads": 4, "num_layers": 2, "inner_hidden_size": 64}
EOS_LEAN = 1.25  # final LayerNorm bias along <eop>'s embedding: short sampled replies
QUIET_SCALE = 0.05

_SYMPTOMS = ["头疼", "头晕", "咳嗽", "发热", "失眠", "腹痛", "恶心", "乏力", "胸闷", "腰痛", "拉肚子", "嗓子疼",
             "皮肤痒", "心慌", "牙疼", "便秘", "流鼻涕", "关节痛", "呕吐", "发烧", "宝宝", "孩子"]
_DURATIONS = ["三天了", "一周了", "两个月了", "半年了", "今天早上开始", "好几年了", "昨天晚上开始"]
_ADVICE = ["建议多喝水，注意休息。", "建议到医院做个检查。", "可以口服布洛芬，体温38.5℃以上再用。",
           "饮食清淡，避免辛辣刺激！", "如果症状加重请及时就医。", "您好，请问还有其他症状吗？",
           "Please see a doctor if the fever lasts more than 3 days."]


def tiny_corpus(seed: int = 0, lines: int = 600) -> list[str]:
    """Dialogues in BianQue-2's prompt format, already preprocessed as the tokenizer does (<n>)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        turns = [f"病人：我{rng.choice(_SYMPTOMS)}{rng.choice(_DURATIONS)}<n>医生：{rng.choice(_ADVICE)}"
                 for _ in range(rng.randint(1, 3))]
        out.append("<n>".join(turns))
    return out


def train_tiny_ice_text(seed: int = 0) -> bytes:
    """A unigram model with ChatGLM's special layout; the same bytes for the same seed."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed)), model_writer=model, model_type="unigram",
        vocab_size=VOCAB_SIZE, hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=CONTROL,
        user_defined_symbols=USER, normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def tiny_glm_config(sp: spm.SentencePieceProcessor) -> dict:
    """BianQue-2's config.json shrunk, with the special ids where the tiny SentencePiece put them."""
    ids = {name: sp.piece_to_id(piece) for name, piece in
           [("mask", "[MASK]"), ("gmask", "[gMASK]"), ("bos", "<sop>"), ("eos", "<eop>"), ("pad", "<pad>")]}
    return {
        "_name_or_path": "tiny_glm", "architectures": ["ChatGLMForConditionalGeneration"],
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "gmask_token_id": ids["gmask"],
        "mask_token_id": ids["mask"], "pad_token_id": ids["pad"], "layernorm_epsilon": 1e-05,
        "max_sequence_length": 2048, "model_type": "chatglm", "position_encoding_2d": True, "pre_seq_len": None,
        "prefix_projection": False, "quantization_bit": 0, "torch_dtype": "float16",
        "transformers_version": "4.29.0.dev0", "use_cache": True, "vocab_size": sp.get_piece_size(), **SHAPE,
    }


def quiet_ids(sp: spm.SentencePieceProcessor) -> list[int]:
    """Pieces a random model should rarely pick: bytes, control pieces (but not <eop>), <unk> and
    the whitespace pieces (`<|blank_k|>`, `<|tab|>`), which otherwise attract random models."""
    return [i for i in range(sp.get_piece_size())
            if (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in USER[1:])
            and sp.id_to_piece(i) != "<eop>"]


def random_weights(config: dict, seed: int, quiet: list[int] = ()) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (fp16, as BianQue-2 stores them); no lm_head.weight (tied, like safetensors).
    Embedding rows of `quiet` ids are scaled down so the tied head seldom emits them."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = config["hidden_size"], config["inner_hidden_size"], config["vocab_size"]

    def normal(*shape: int, std: float = 0.3) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).half()

    embedding = torch.randn(v, h, generator=g)
    embedding[list(quiet)] *= QUIET_SCALE
    tensors = {"transformer.word_embeddings.weight": embedding.half()}
    for i in range(config["num_layers"]):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[p + norm + ".weight"] = (1 + normal(h, std=0.1).float()).half()
            tensors[p + norm + ".bias"] = normal(h, std=0.1)
        for name, (out, inp) in {"attention.query_key_value": (3 * h, h), "attention.dense": (h, h),
                                 "mlp.dense_h_to_4h": (f, h), "mlp.dense_4h_to_h": (h, f)}.items():
            tensors[p + name + ".weight"] = normal(out, inp, std=inp ** -0.5)
            tensors[p + name + ".bias"] = normal(out, std=0.1)
    eos_row = tensors["transformer.word_embeddings.weight"][config["eos_token_id"]].float()
    # A random (not unit) final scale: with a tied head and alpha-scaled residuals, unit scale
    # makes the model echo its last input token forever.
    tensors["transformer.final_layernorm.weight"] = normal(h, std=0.4)
    tensors["transformer.final_layernorm.bias"] = (EOS_LEAN * eos_row / eos_row.norm()).half()
    return tensors


def build_tiny_glm(dir: str | Path, seed: int = 0) -> Path:
    """Write a BianQue-2-layout checkpoint with random weights into `dir` and return its path."""
    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    ice_text = train_tiny_ice_text(seed)
    (path / "ice_text.model").write_bytes(ice_text)
    sp = spm.SentencePieceProcessor(model_proto=ice_text)
    config = tiny_glm_config(sp)
    save_file(random_weights(config, seed, quiet_ids(sp)), str(path / "model.safetensors"), metadata={"format": "pt"})
    _write_json(path / "config.json", config)
    _write_json(path / "tokenizer_config.json", TOKENIZER_CONFIG)
    _write_json(path / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    _write_json(path / "generation_config.json", {"_from_model_config": True, "bos_token_id": config["bos_token_id"],
                                                  "eos_token_id": config["eos_token_id"], "pad_token_id": 3,
                                                  "transformers_version": "4.29.0.dev0"})
    return path


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

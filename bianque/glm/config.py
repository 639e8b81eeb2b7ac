"""ChatGLM-6B configuration, read from the checkpoint's config.json (SPEC §2)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GLMConfig:
    """The fields the model reads. Defaults are BianQue-2's (the "slim" ChatGLM-6B vocabulary),
    never the old 150k-vocabulary defaults of the reference configuration class."""

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_layers: int = 28
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int = 130004
    eos_token_id: int = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int = 3
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    # Everything else in config.json (architectures, auto_map, torch_dtype, ...): kept, not computed with.
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head size {self.head_dim} must be a multiple of 4 for the 2-D rotary encoding")
        if not self.position_encoding_2d:
            raise ValueError("position_encoding_2d=false (1-D rotary) is not supported; BianQue-2 uses the 2-D encoding")
        if self.pre_seq_len:
            raise ValueError("P-tuning prefixes (pre_seq_len) are not supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Each head is split in two halves, one rotated by position, one by block position."""
        return self.head_dim // 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GLMConfig:
        known = {f.name for f in fields(cls)} - {"metadata"}
        kwargs = {k: v for k, v in data.items() if k in known}
        return cls(**kwargs, metadata={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metadata"}
        return {**self.metadata, **out}

"""The ChatGLM-6B tokenizer as BianQue-2 ships it (SPEC §7), on the `sentencepiece` library.

Reference-exact on `ice_text.model`: `<n>`/`<|tab|>`/`<|blank_k|>` preprocessing, special-token
splitting with whitespace stripped around the literal, `[gMASK] <sop>` suffix, left padding with
mask and position tensors, and the 2023-04-14 decode (no English clean-up). Special-token ids are
looked up by piece name in the SentencePiece model, so any model with the same special pieces
(e.g. a tiny one trained in a test) works.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from ..errors import ModelLoadError
from .model import glm_attention_mask, glm_position_ids

VOCAB_FILE = "ice_text.model"
MAX_BLANK = 80
BLANK_RUN = re.compile(" {2,}")
BLANK_TOKEN = re.compile(r"<\|blank_(\d+)\|>")


class BatchEncoding(dict):
    """A dict of lists or tensors with `.to(device)`, like the transformers object chat() code expects."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _blank_pieces(match: re.Match) -> str:
    """A run of n ASCII spaces -> `<|blank_80|>`s then `<|blank_k|>`; one leftover space stays."""
    n, out = len(match.group(0)), []
    while n >= 2:
        k = min(n, MAX_BLANK)
        out.append(f"<|blank_{k}|>")
        n -= k
    return "".join(out) + " " * n


def preprocess(text: str) -> str:
    """SPEC §7.2 steps 1-3, before SentencePiece."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return BLANK_RUN.sub(_blank_pieces, text)


def postprocess(text: str) -> str:
    """Undo the whitespace pieces after SentencePiece decoding."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return BLANK_TOKEN.sub(lambda m: " " * int(m.group(1)), text)


class GLMTokenizer:
    def __init__(self, vocab_file: str | Path, config: dict | None = None):
        config = config or {}
        self.sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
        self.num_image_tokens = int(config.get("num_image_tokens", 0))
        names = {"bos": "<sop>", "eos": "<eop>", "mask": "[MASK]", "gmask": "[gMASK]", "pad": "<pad>", "unk": "<unk>"}
        names.update({k[:-6]: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)})
        self.tokens = names
        ids = {role: self.sp.piece_to_id(piece) for role, piece in names.items() if role != "end"}
        for role, piece in names.items():
            if role != "end" and role != "unk" and ids[role] == self.sp.unk_id():
                raise ModelLoadError(f"{vocab_file} has no {piece!r} piece; it is not a ChatGLM tokenizer model")
        self.ids = {role: i + self.num_image_tokens for role, i in ids.items()}
        self.bos_token_id, self.eos_token_id = self.ids["bos"], self.ids["eos"]
        self.mask_token_id, self.gmask_token_id = self.ids["mask"], self.ids["gmask"]
        self.pad_token_id, self.unk_token_id = self.ids["pad"], self.ids["unk"]
        # Literals cut out of raw text as special tokens: the registered bos/eos/mask/pad/unk.
        # A typed [gMASK] is NOT one of them (it goes through SentencePiece as text), as in the reference.
        specials = [names[r] for r in ("bos", "eos", "mask", "pad", "unk")]
        self._special_ids = {names[r]: self.ids[r] for r in ("bos", "eos", "mask", "pad", "unk")}
        alternation = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special_split = re.compile(f"({alternation})")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GLMTokenizer:
        directory = Path(directory)
        vocab = directory / VOCAB_FILE
        if not vocab.is_file():
            raise ModelLoadError(f"no {VOCAB_FILE} in {directory}; point to a BianQue-2 / ChatGLM-6B directory")
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls(vocab, config)

    def __len__(self) -> int:
        return self.sp.get_piece_size() + self.num_image_tokens

    # -- text -> tokens -------------------------------------------------------------------------

    def _split_specials(self, text: str) -> list[str]:
        """Chunks of plain text and special literals; text next to a literal loses its whitespace
        on that side (transformers' special-token splitting); empty chunks are dropped."""
        parts = self._special_split.split(text)
        chunks = []
        for i, part in enumerate(parts):
            if i % 2:  # odd entries are the matched literals
                chunks.append(part)
                continue
            if i > 0:
                part = part.lstrip()
            if i < len(parts) - 1:
                part = part.rstrip()
            if part:
                chunks.append(part)
        return chunks

    def _sp_tokenize(self, text: str) -> list[str]:
        return self.sp.encode(preprocess(text), out_type=str)

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for chunk in self._split_specials(text):
            tokens.extend([chunk] if chunk in self._special_ids else self._sp_tokenize(chunk))
        return tokens

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.sp.piece_to_id(tokens) + self.num_image_tokens
        return [self.sp.piece_to_id(t) + self.num_image_tokens for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.sp.id_to_piece(ids - self.num_image_tokens)
        return [self.sp.id_to_piece(i - self.num_image_tokens) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return ids + [self.gmask_token_id, self.bos_token_id] if add_special_tokens else ids

    # -- ids -> text ----------------------------------------------------------------------------

    def decode(self, ids: int | Sequence[int] | torch.Tensor, **_ignored) -> str:
        """SPEC §7.4. `skip_special_tokens`/`clean_up_tokenization_spaces` are accepted and ignored,
        as in the version BianQue-2 ships. Ids past the SentencePiece vocabulary (the model has
        130528 rows, the tokenizer 130344 pieces) are SKIPPED here, where the reference raises:
        a sampled stray id must not crash a patient's chat halfway through a reply."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        size = self.sp.get_piece_size()
        pieces = [i - self.num_image_tokens for i in ids if i != self.pad_token_id]
        pieces = [i for i in pieces if 0 <= i < size]
        return postprocess(self.sp.decode(pieces)) if pieces else ""

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    # -- batches --------------------------------------------------------------------------------

    def _mask_and_positions(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence mask `[1, n, n]` and positions `[2, n]`. Unlike the model's own builder,
        the tokenizer prefers `[MASK]` over `[gMASK]`, and tolerates a missing `<sop>` (all
        context) or a missing mask token (plain positions), as the reference does."""
        n = len(ids)
        ctx = ids.index(self.bos_token_id) if self.bos_token_id in ids else n
        mp = next((ids.index(t) for t in (self.mask_token_id, self.gmask_token_id) if t in ids), None)
        return glm_attention_mask(n, ctx), glm_position_ids(n, ctx, mp)

    def pad(self, batch: list[list[int]], return_tensors: str | None = None) -> BatchEncoding:
        """Left-pad to the longest sequence; pad rows/columns of the mask are True (masked),
        pad positions 0. Mask and positions are built on each UNPADDED sequence first."""
        width = max(len(ids) for ids in batch)
        input_ids, masks, positions = [], [], []
        for ids in batch:
            pad = width - len(ids)
            mask, pos = self._mask_and_positions(ids)
            input_ids.append([self.pad_token_id] * pad + ids)
            masks.append(torch.nn.functional.pad(mask, (pad, 0, pad, 0), value=True))
            positions.append(torch.nn.functional.pad(pos, (pad, 0), value=0))
        out = BatchEncoding(input_ids=torch.tensor(input_ids), attention_mask=torch.stack(masks),
                            position_ids=torch.stack(positions))
        if return_tensors != "pt":
            out = BatchEncoding({k: v.tolist() for k, v in out.items()})
        return out

    def __call__(self, texts: str | Sequence[str], padding: bool | str = False, return_tensors: str | None = None,
                 add_special_tokens: bool = True, **_ignored) -> BatchEncoding:
        """`input_ids` only without padding (what chat() uses); with `padding=True` also the
        boolean `attention_mask` `[b, 1, S, S]` and `position_ids` `[b, 2, S]`."""
        single = isinstance(texts, str)
        batch = [self.encode(t, add_special_tokens) for t in ([texts] if single else texts)]
        if padding and padding != "do_not_pad":
            out = self.pad(batch, return_tensors)
            return BatchEncoding({k: v[0] for k, v in out.items()}) if single else out
        if return_tensors == "pt":
            if len({len(b) for b in batch}) > 1:
                raise ValueError("sequences differ in length; pass padding=True to batch them")
            return BatchEncoding(input_ids=torch.tensor(batch))
        return BatchEncoding(input_ids=batch[0] if single else batch)

"""Prepacked bfloat16 weights for CPU decoding (oneDNN), swapped in like quantised linears.

Why: decoding one token is a matrix-vector product per weight, so its speed is memory
bandwidth. For bfloat16 on CPU, `F.linear` re-lays the weight out for oneDNN on every call,
which roughly halves the bandwidth it reaches (measured: ~14 vs ~30 GB/s on one core of this
machine). Packing each weight once at load time removes that. The tied embedding/head is packed
in row chunks: the head multiplies every chunk, and an embedding lookup unpacks just the chunk
that holds the row, so the model never keeps a plain and a packed copy of the 1 GB matrix.

Only used on CPU in bfloat16 when oneDNN supports it (`packing_available`); numerics are those
of `F.linear` in bfloat16 (fp32 accumulation, bf16 output). Packed modules have no state_dict
entries: packing is a runtime layout, not a checkpoint format.
"""
from __future__ import annotations

import torch
from torch import nn

HEAD_CHUNK_ROWS = 2048  # ~30 GB/s for the head with a ~0.5 ms row lookup at hidden size 1024


def packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's layout for a [out, in] weight multiplied by one row at a time (batch hint 1)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.bias)


class PackedRows:
    """A [V, H] matrix as packed chunks of HEAD_CHUNK_ROWS rows, shared by embedding and head."""

    def __init__(self, chunks: list[torch.Tensor], rows: int, hidden: int):
        self.chunks, self.rows, self.hidden = chunks, rows, hidden

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rows: int = HEAD_CHUNK_ROWS) -> PackedRows:
        return cls([_pack(chunk) for chunk in weight.split(rows)], rows, weight.shape[1])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for ids of any shape -> [*ids.shape, H]; unpacks only the chunks that are hit."""
        flat = ids.reshape(-1)
        out = torch.empty(flat.numel(), self.hidden, dtype=torch.bfloat16, device=ids.device)
        for chunk in flat.div(self.rows, rounding_mode="floor").unique().tolist():
            hit = (flat // self.rows) == chunk
            out[hit] = self.chunks[chunk].to_dense()[flat[hit] - chunk * self.rows]
        return out.view(*ids.shape, self.hidden)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([_linear(h, chunk, None) for chunk in self.chunks], dim=-1)


class PackedEmbedding(nn.Module):
    def __init__(self, rows: PackedRows):
        super().__init__()
        self.rows = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.lookup(ids)


class PackedHead(nn.Module):
    def __init__(self, rows: PackedRows):
        super().__init__()
        self.rows = rows

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.rows.project(h)


def pack_linears_(module: nn.Module) -> nn.Module:
    """Swap every nn.Linear under `module` for a PackedLinear, in place (one weight at a time)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears_(child)
    return module


def pack_embedding_(model: nn.Module) -> None:
    """Replace the tied word_embeddings / lm_head pair by one packed copy, in place."""
    rows = PackedRows.from_weight(model.transformer.word_embeddings.weight)
    model.transformer.word_embeddings = PackedEmbedding(rows)
    model.lm_head = PackedHead(rows)

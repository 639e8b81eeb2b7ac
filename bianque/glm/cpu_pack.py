"""Prepacked weights for CPU decoding (oneDNN), swapped in like quantised linears.

Why: decoding one token is a matrix-vector product per weight, so its speed is memory
bandwidth. For bfloat16 on CPU, `F.linear` re-lays the weight out for oneDNN on every call,
which roughly halves the bandwidth it reaches (measured: ~14 vs ~30 GB/s on one core of this
machine). Packing each weight once at load time removes that. The tied embedding/head is packed
once, in row chunks of ~16 MB (the size where the head reaches the probe's bandwidth; smaller
chunks lose ~15 % to per-call overhead): the head multiplies every chunk, and an embedding
lookup reads its rows straight out of the packed bytes (see `PackedLayout`), so the model never
keeps a plain and a packed copy of the 1 GB matrix and a decode step never unpacks a chunk.

float32 goes through the BLAS (MKL in torch's wheels), whose matrix-vector and few-row products
are slow on some CPUs: on a 2-CPU AMD EPYC VM (AVX-512, torch 2.13.0+cpu, 2 threads) a
[32128, 768] head took 6.2 ms for one row with `F.linear` and 2.7-3.0 ms packed, a [130528, 1024]
one 26-28 vs 10.6-14.5 ms, a [2048, 768] projection 0.09 vs 0.06 ms, and packed stayed ahead at 8
and 64 rows. So float32 is packed where `packing_pays` times it faster on this CPU.

Used on CPU in bfloat16 when oneDNN has bf16 kernels, and in float32 where it pays
(`packing_available`, `packing_pays`); numerics are those of `F.linear` in that dtype (bf16:
fp32 accumulation, bf16 output; fp32: the same products, summed in another order). Packed
modules have no state_dict entries: packing is a runtime layout, not a checkpoint format, and
packed weights are not trained.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# Measured on one core (bf16, hidden 1024 and 4096): 4 MB chunks ~30 GB/s, 16-32 MB ~34 GB/s,
# larger ones no better. Rows per chunk follow from the hidden size.
HEAD_CHUNK_BYTES = 16 << 20
MARKER_BASE = 128  # marker digits 1..128 are exact in bfloat16 (8 significant bits), so in float32
FLOAT32_MIN_HIDDEN = 512  # smaller models (tests' tiny ones): either way takes microseconds, keep F.linear
# The float32 probe's weight: larger than the caches, so that it streams from memory as every
# weight of a decode step does (a cache-sized one timed within 10 % either way here and flipped).
PROBE_BYTES = 64 << 20


def packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` can be packed here: on CPU with oneDNN, in bfloat16 (where oneDNN
    has bf16 kernels) or float32."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def packing_pays(device: torch.device | str, dtype: torch.dtype, hidden: int) -> bool:
    """Whether the loaders pack by default: bfloat16 wherever it is available; float32 where,
    timed once per hidden size on this CPU on a 64 MB weight, a packed product of one row (a solo
    decode step) plus one of 4 rows (a full CPU batch) takes less time than `F.linear` for one row
    plus the better of `F.linear` and the weight-first product (cpu_linear.py) for four. Measured
    here: packed wins one row by about 2x and loses a little at 2-4 rows to weight-first."""
    if not packing_available(device, dtype):
        return False
    return dtype == torch.bfloat16 or (hidden >= FLOAT32_MIN_HIDDEN and _float32_packing_pays(hidden))


@lru_cache(maxsize=None)
@torch.inference_mode()
def _float32_packing_pays(hidden: int, repeats: int = 5) -> bool:
    from ..cpu_linear import best_time, weight_first

    generator = torch.Generator().manual_seed(0)
    weight = torch.full((max(1, PROBE_BYTES // (4 * hidden)), hidden), 0.01)  # the values do not change the time
    packed = _pack(weight)
    one, four = torch.randn(1, hidden, generator=generator), torch.randn(4, hidden, generator=generator)
    plain_one = best_time(lambda: F.linear(one, weight), repeats)
    packed_one = best_time(lambda: _linear(one, packed, None), repeats)
    plain_four = min(best_time(lambda: F.linear(four, weight), repeats),
                     best_time(lambda: weight_first(four, weight, None), repeats))
    packed_four = best_time(lambda: _linear(four, packed, None), repeats)
    return packed_one + packed_four < plain_one + plain_four


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

    @property
    def weight(self) -> torch.Tensor:
        """The packed (opaque oneDNN) tensor: only its dtype and device mean anything (code that
        asks a linear for its weight's dtype, as transformers' T5 feed-forward does, still can)."""
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.bias)


def _bytes_of(packed: torch.Tensor) -> torch.Tensor | None:
    """The packed tensor's own memory as a flat view in its dtype (no copy), or None where this
    torch cannot say where it lives. The view does not keep `packed` alive: hold both."""
    if not (hasattr(torch.ops.mkldnn, "data_ptr") and hasattr(torch.ops.mkldnn, "_nbytes")):
        return None
    nbytes = torch.ops.mkldnn._nbytes(packed)  # blocks may be padded (with zeros) past the shape
    buffer = (ctypes.c_char * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(buffer, dtype=packed.dtype)


def _marker_offsets(rows: int, cols: int, along_rows: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """Where element (r, 0) (along_rows) or (0, c) lands in the packed bytes of a [rows, cols]
    weight: pack marker matrices that hold the index, digit by digit, in that line only."""
    n = rows if along_rows else cols
    index, found, positions, scale = torch.arange(n), torch.zeros(n, dtype=torch.long), None, 1
    while positions is None or scale < n:
        marker = torch.zeros(rows, cols, dtype=dtype)
        (marker[:, 0] if along_rows else marker[0]).copy_(1 + index // scale % MARKER_BASE)
        packed = _pack(marker)
        flat = _bytes_of(packed)
        if flat is None:
            return None
        where = flat.nonzero().squeeze(1)  # ascending addresses: the same order for every digit
        if where.numel() != n or (positions is not None and not torch.equal(where, positions)):
            return None
        positions = where
        found += (flat[where].long() - 1) * scale
        scale *= MARKER_BASE
    offsets = torch.empty_like(positions)
    offsets[found] = positions
    return offsets


class PackedLayout:
    """Row addresses inside oneDNN's packed bytes for one weight shape.

    oneDNN's blocked weight formats split each dimension into nested blocks with fixed strides,
    so the address of (r, c) is row_offset[r] + col_offset[c]. Both vectors are learned by
    packing marker matrices of the same shape (the format depends on the shape), and the rule
    is then checked against a real chunk (`matches`); a layout that fails it is not used."""

    def __init__(self, row_offsets: torch.Tensor, col_offsets: torch.Tensor):
        self.row_offsets, self.col_offsets = row_offsets, col_offsets

    @classmethod
    def learn(cls, rows: int, cols: int, dtype: torch.dtype = torch.bfloat16) -> PackedLayout | None:
        r = _marker_offsets(rows, cols, along_rows=True, dtype=dtype)
        c = _marker_offsets(rows, cols, along_rows=False, dtype=dtype)
        if r is None or c is None or r[0] != 0 or c[0] != 0:
            return None
        return cls(r, c)

    def rows(self, flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return flat[self.row_offsets[index][:, None] + self.col_offsets]

    def matches(self, packed: torch.Tensor) -> bool:
        """Every row read through the layout equals the unpacked chunk (256 rows at a time:
        the 6B head's index would otherwise be a 64 MB temporary)."""
        flat, dense = _bytes_of(packed), packed.to_dense()
        return flat is not None and all(torch.equal(self.rows(flat, index), dense[index])
                                        for index in torch.arange(packed.shape[0]).split(256))


class PackedRows:
    """A [V, H] matrix as packed chunks of `rows` rows, shared by embedding and head."""

    def __init__(self, chunks: list[torch.Tensor], rows: int, hidden: int):
        self.chunks, self.rows, self.hidden = chunks, rows, hidden
        self.views: list[torch.Tensor | None] = [None] * len(chunks)
        self.layouts: dict[tuple[int, int], PackedLayout | None] = {}  # per chunk shape, learned on first lookup

    def _layout(self, chunk: int) -> PackedLayout | None:
        """The chunk's layout (all chunks but maybe the last share one); None: unpack instead."""
        shape = tuple(self.chunks[chunk].shape)
        if shape not in self.layouts:
            layout = PackedLayout.learn(*shape, dtype=self.chunks[chunk].dtype)
            self.layouts[shape] = layout if layout is not None and layout.matches(self.chunks[chunk]) else None
        if self.layouts[shape] is not None and self.views[chunk] is None:
            self.views[chunk] = _bytes_of(self.chunks[chunk])
        return self.layouts[shape]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rows: int | None = None) -> PackedRows:
        rows = rows or max(1, HEAD_CHUNK_BYTES // (weight.shape[1] * weight.element_size()))
        return cls([_pack(chunk) for chunk in weight.split(rows)], rows, weight.shape[1])

    def _chunk_rows(self, chunk: int, index: torch.Tensor) -> torch.Tensor:
        layout = self._layout(chunk)
        if layout is not None:
            return layout.rows(self.views[chunk], index)
        return self.chunks[chunk].to_dense()[index]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for ids of any shape -> [*ids.shape, H]; reads only those rows."""
        flat = ids.reshape(-1)
        if flat.numel() == 1:  # a decode step: one row, no masks
            i = int(flat)
            return self._chunk_rows(i // self.rows, torch.tensor([i % self.rows])).view(*ids.shape, self.hidden)
        out = torch.empty(flat.numel(), self.hidden, dtype=self.chunks[0].dtype, device=ids.device)
        for chunk in flat.div(self.rows, rounding_mode="floor").unique().tolist():
            hit = (flat // self.rows) == chunk
            out[hit] = self._chunk_rows(chunk, flat[hit] - chunk * self.rows)
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


def pack_or_weight_first_(module: nn.Module, hidden: int) -> bool:
    """A float32 model on CPU, in place: every linear packed where packing pays here (see
    `packing_pays`), else weight-first linears where those do (cpu_linear.py). True if packed."""
    from ..cpu_linear import use_weight_first_

    if packing_pays("cpu", torch.float32, hidden):
        pack_linears_(module)
        return True
    use_weight_first_(module)
    return False


def pack_embedding_(model: nn.Module) -> None:
    """Replace the tied word_embeddings / lm_head pair by one packed copy, in place."""
    rows = PackedRows.from_weight(model.transformer.word_embeddings.weight)
    model.transformer.word_embeddings = PackedEmbedding(rows)
    model.lm_head = PackedHead(rows)

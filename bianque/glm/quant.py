"""Weight-only int8/int4 linears for the four matrices of every GLM block (SPEC §8).

Quantisation is a module swap: `quantize_block_` replaces `nn.Linear` by `QuantLinear` right
after a block's weights are loaded, so a 6B model is never held in full precision all at once.
The storage format (state_dict, checkpoints, `python -m bianque convert`) is the reference's:
symmetric per-output-row, `scale[o] = max|W[o]| / (2^(bits-1) - 1)` in the compute dtype,
int8 `[out, in]`, or int4 two per byte `[out, in/2]` with element 2j in the HIGH nibble.

At run time a module keeps its weights in whichever layout the fastest working kernel wants:
- int8: torch's `_weight_int8pack_mm` for decode-sized inputs, dequantise-then-matmul otherwise;
- int4 on CPU: torch's `_weight_int4pack_mm_for_cpu` (its own tiled nibble layout);
- int4 on CUDA in bf16: torch's `_weight_int4pack_mm` (tinygemm's tiled layout);
- int8 on CUDA in fp16, when the optional `cpm_kernels` (the reference's CUDA kernel package,
  `pip install .[cuda]`) imports: its `gemv_broadcast_mat_int8` on the reference layout, but only
  if it also beats the path it would replace on this GPU (`cpm_int8_ok`);
- anything else: plain PyTorch dequantise-then-matmul on the reference layout (works everywhere).
A kernel is used only after it reproduced the plain path on a small random case on that device
and dtype (`kernel_ok`), so a torch build without it silently falls back instead of failing.
(The reference's own int4/int8 "weight extraction" kernels are not in cpm_kernels: they are a
compiled blob inside the checkpoint's remote quantization.py, which we never execute.)
"""
from __future__ import annotations

import functools
import logging
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# The four linears of a block (SPEC §1 names). Embedding, head and LayerNorms stay unquantised.
BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
SUPPORTED_BITS = (4, 8)
# Measured on this project's 2-core CPU, 16384x4096 bf16: _weight_int8pack_mm takes ~0.55 ms per
# input row (1 row 1.9 ms, 16: 8.5, 128: 69, 512: 280); dequantising into a kept scratch buffer
# (~5 ms) and then one bf16 matmul takes 10.5 ms at 16 rows, 25 at 128, 76 at 512. So decoding
# uses the kernel and prefill the dequantised matmul (a fresh buffer instead would cost ~30 ms of
# page faults per call: glibc returns such sizes to the system on free).
INT8_KERNEL_MAX_ROWS = 24
# torch's int4 kernels take per-group scales; a per-row scale is the same scale repeated over
# every group of the row, so any group size that divides `in_features` gives exact results.
INT4_GROUP_SIZES = (256, 128, 64, 32)
CUDA_INT4_INNER_K_TILES = 8
# Rows quantised at a time: bounds the float32 temporaries to ~64 MB for 6B-sized matrices.
QUANTIZE_CHUNK_ELEMENTS = 1 << 24


def max_level(bits: int) -> int:
    """127 for int8, 7 for int4: symmetric, so -8 never occurs in int4."""
    check_bits(bits)
    return 2 ** (bits - 1) - 1


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantize must be 4 or 8 (bits), not {bits!r}")


# ----------------------------------------------------------------------------------------------
# The reference format: pure tensor functions (also used by bianque.convert)
# ----------------------------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 `[out, in]` in -L..L, scale `[out]` in scale_dtype) with W ≈ q * scale[:, None].

    q is rounded against the scale as it is STORED (after rounding to scale_dtype), so that
    dequantising with the stored scale is as close to W as the grid allows."""
    level = max_level(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {list(weight.shape)}")
    if weight.is_meta:
        raise ValueError("cannot quantise a weight on the meta device: load the weights first")
    rows = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    qs, scales = [], []
    for chunk in weight.split(rows):
        scale = (chunk.abs().amax(dim=1).float() / level).to(scale_dtype)   # max|w| is exact in any dtype
        s = scale.float().unsqueeze(1)
        w = chunk.to(torch.float32, copy=True)   # one float32 copy (never the caller's), then in place
        w.div_(torch.where(s > 0, s, 1.0)).round_().clamp_(-level, level)
        qs.append(w.to(torch.int8))
        scales.append(scale)
    return torch.cat(qs), torch.cat(scales)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 `[out, in]` values in -8..7 -> int8 `[out, in/2]`, element 2j in the high nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of input features, got {q.shape[-1]}")
    nibbles = q.to(torch.int16) & 0xF               # 4-bit two's complement
    packed = (nibbles[..., 0::2] << 4) | nibbles[..., 1::2]
    return packed.to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int8 `[out, in/2]` -> int8 `[out, in]`, sign-extended."""
    wide = packed.to(torch.int16)
    high = wide >> 4                                 # arithmetic shift keeps the sign
    low = ((wide & 0xF) ^ 0x8) - 0x8                 # sign-extend the low nibble
    return torch.stack([high, low], dim=-1).flatten(-2).to(torch.int8)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference-format weight -> `[out, in]` in `dtype` (default: the scale's dtype)."""
    q = unpack_int4(weight) if bits == 4 else weight
    dtype = dtype or scale.dtype
    return q.to(dtype) * scale.to(dtype).unsqueeze(1)


def stored_shape(out_features: int, in_features: int, bits: int) -> tuple[int, int]:
    """Shape of the int8 tensor a checkpoint stores for a quantised `[out, in]` weight."""
    check_bits(bits)
    return (out_features, in_features // 2 if bits == 4 else in_features)


# ----------------------------------------------------------------------------------------------
# Kernel layouts. Each layout has: a check that it applies, a packer (from the reference bytes)
# and matmul. "rows" layouts are the reference format itself.
# ----------------------------------------------------------------------------------------------

def _int4_group_size(in_features: int) -> int | None:
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def _scales_and_zeros(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """`[in/group, out, 2]`: the row scale in every group, zero point 0 (symmetric)."""
    groups = in_features // _int4_group_size(in_features)
    s = scale.unsqueeze(0).expand(groups, -1)
    return torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


# torch's int4 kernels take unsigned nibbles (q + 8). For a 4-bit two's complement nibble,
# XOR 8 is exactly +8, so both packers start from the reference bytes without unpacking to q.

def _pack_cpu_int4(packed: torch.Tensor) -> torch.Tensor:
    """Reference int4 bytes -> the CPU kernel's layout (it takes q + 8 as int32 [out, in])."""
    b = packed.view(torch.uint8)
    offset = torch.stack([(b >> 4) ^ 8, (b & 0xF) ^ 8], dim=-1).flatten(-2)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(offset.to(torch.int32), 1)


def _pack_cuda_int4(packed: torch.Tensor) -> torch.Tensor:
    """Reference int4 bytes -> tinygemm's layout (it takes q + 8 packed high nibble first, uint8)."""
    return torch.ops.aten._convert_weight_to_int4pack(packed.view(torch.uint8) ^ 0x88, CUDA_INT4_INNER_K_TILES)


_PACKERS = {"cpu_int4": _pack_cpu_int4, "cuda_int4": _pack_cuda_int4}


def _matmul_rows(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Dequantise-then-matmul; the scale is applied to the [m, out] result, not to [out, in]."""
    if module.bits == 8 and x.shape[0] <= INT8_KERNEL_MAX_ROWS and kernel_ok("int8", x.device.type, x.dtype):
        return torch.ops.aten._weight_int8pack_mm(x, module.weight, module.weight_scale.to(x.dtype))
    q = unpack_int4(module.weight) if module.bits == 4 else module.weight
    scale = module.weight_scale.to(x.dtype)
    if x.device.type == "cpu" and _SCRATCH_LOCK.acquire(blocking=False):
        try:
            return F.linear(x, _scratch(q.numel(), x.dtype).view(q.shape).copy_(q)) * scale
        finally:
            _SCRATCH_LOCK.release()
    return F.linear(x, q.to(x.dtype)) * scale


# One CPU buffer per compute dtype for dequantised weights, grown to the largest block matrix
# (128 MB for BianQue-2 in bf16) and kept. Used by one caller at a time; others allocate.
_SCRATCH: dict[torch.dtype, torch.Tensor] = {}
_SCRATCH_LOCK = threading.Lock()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    buffer = _SCRATCH.get(dtype)
    if buffer is None or buffer.numel() < numel:
        _SCRATCH.pop(dtype, None)  # free the smaller one first
        buffer = _SCRATCH[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def _matmul_cpu_int4(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, module.weight, _int4_group_size(module.in_features), module.scales_and_zeros.to(x.dtype))


def _matmul_cuda_int4(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm(
        x, module.weight, _int4_group_size(module.in_features), module.scales_and_zeros.to(x.dtype))


def cpm_gemv_int8(weight: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x `[m, in]` fp16 · (weight int8 `[out, in]` · scale fp16 `[out]`)ᵀ with cpm_kernels'
    gemv_broadcast_mat_int8 (all on one CUDA device, contiguous; `in` a multiple of 4)."""
    from cpm_kernels.kernels import gemv_broadcast_mat_int8

    weight, scale, x = weight.contiguous(), scale.to(torch.float16).contiguous(), x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float16, device=x.device)
    with torch.cuda.device(x.device):
        gemv_broadcast_mat_int8(x.shape[0], weight.shape[0], weight.shape[1], scale.data_ptr(), weight.data_ptr(),
                                x.data_ptr(), out.data_ptr(), torch.cuda.current_stream(x.device).cuda_stream)
    return out


def _matmul_cpm_int8(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return cpm_gemv_int8(module.weight, module.weight_scale, x)


_MATMULS = {"rows": _matmul_rows, "cpu_int4": _matmul_cpu_int4, "cuda_int4": _matmul_cuda_int4,
            "cpm_int8": _matmul_cpm_int8}
_LAYOUT_DEVICE = {"cpu_int4": "cpu", "cuda_int4": "cuda", "cpm_int8": "cuda"}


def choose_layout(bits: int, device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> str:
    """The runtime layout for a weight of this shape living on `device` and computing in `dtype`."""
    check_bits(bits)
    if bits == 8:
        if device.type == "cuda" and dtype == torch.float16 and in_features % 4 == 0 and cpm_int8_ok(str(device)):
            return "cpm_int8"
        return "rows"
    if _int4_group_size(in_features) is None:
        return "rows"
    if device.type == "cpu" and kernel_ok("cpu_int4", "cpu", dtype):
        return "cpu_int4"
    if (device.type == "cuda" and dtype == torch.bfloat16 and out_features % 8 == 0
            and in_features % (CUDA_INT4_INNER_K_TILES * 16) == 0 and kernel_ok("cuda_int4", "cuda", dtype)):
        return "cuda_int4"
    return "rows"


@functools.lru_cache(maxsize=None)
def kernel_ok(kind: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's kernel `kind` exists here and matches the plain path on a random case."""
    gen = torch.Generator().manual_seed(0)
    out_features, in_features, bits = 128, 256, 8 if kind == "int8" else 4
    q = torch.randint(-max_level(bits), max_level(bits) + 1, (out_features, in_features), generator=gen, dtype=torch.int8)
    scale = torch.rand(out_features, generator=gen) / 50 + 1e-3
    x = torch.randn(3, in_features, generator=gen)
    expected = x @ (q.float() * scale.unsqueeze(1)).t()
    device = torch.device(device_type)
    try:
        xd, sd = x.to(device, dtype), scale.to(device, dtype)
        if kind == "int8":
            got = torch.ops.aten._weight_int8pack_mm(xd, q.to(device), sd)
        else:
            packed = _PACKERS[kind](pack_int4(q).to(device))
            got = (_matmul_cpu_int4 if kind == "cpu_int4" else _matmul_cuda_int4)(
                _KernelProbe(packed, _scales_and_zeros(sd, in_features), in_features), xd)
    except (RuntimeError, NotImplementedError, AttributeError) as err:
        log.info("weight-only kernel %s unavailable on %s/%s (%s); using dequantise-then-matmul",
                 kind, device_type, dtype, type(err).__name__)
        return False
    # bf16 keeps 8 significant bits: allow 2 % of the output's magnitude for rounding.
    ok = bool((got.float().cpu() - expected).abs().max() <= 2e-2 * expected.abs().max())
    if not ok:
        log.warning("weight-only kernel %s on %s/%s disagrees with the plain path; not using it", kind, device_type, dtype)
    return ok


# The cpm probe: a decode-sized product on a BianQue-2-sized matrix (the MLP's 16384 x 4096).
CPM_PROBE_SHAPE = (16384, 4096)


@functools.lru_cache(maxsize=None)
def cpm_int8_ok(device: str, gemv=None) -> bool:
    """Whether cpm_kernels' int8 gemv should serve int8 fp16 linears on this CUDA device: it must
    import, reproduce the plain path on a random case, and be faster than the plain path on a
    decode step (its launch uses one thread block per input row, which on a large GPU can lose
    to torch). `gemv` replaces cpm_gemv_int8 (tests)."""
    gemv = gemv or cpm_gemv_int8
    try:
        if gemv is cpm_gemv_int8:
            import cpm_kernels.kernels  # noqa: F401  (the optional extra)
    except Exception as err:  # noqa: BLE001  (a broken CUDA/cpm install raises anything at import)
        log.info("cpm_kernels unavailable (%s); int8 uses torch's kernels or dequantise-then-matmul", type(err).__name__)
        return False
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (96, 256), generator=gen, dtype=torch.int8)
    scale = (torch.rand(96, generator=gen) / 50 + 1e-3).half()
    x = torch.randn(3, 256, generator=gen).half()
    expected = x.float() @ (q.float() * scale.float().unsqueeze(1)).t()
    try:
        got = gemv(q.to(device), scale.to(device), x.to(device)).float().cpu()
    except Exception as err:  # noqa: BLE001  (driver and launch errors surface as many types)
        log.warning("cpm_kernels int8 gemv failed its self-check on %s (%s); not using it", device, type(err).__name__)
        return False
    if not bool((got - expected).abs().max() <= 1e-2 * expected.abs().max()):
        log.warning("cpm_kernels int8 gemv disagrees with the plain path on %s; not using it", device)
        return False
    out_features, in_features = CPM_PROBE_SHAPE
    rows = QuantLinear(in_features, out_features, 8, bias=False, device="meta")
    rows.weight = torch.randint(-127, 128, CPM_PROBE_SHAPE, dtype=torch.int8, device=device)  # reference layout
    rows.weight_scale = torch.rand(out_features, device=device).half()
    one = torch.randn(1, in_features, device=device).half()
    ours = _median_seconds(lambda: gemv(rows.weight, rows.weight_scale, one), device)
    theirs = _median_seconds(lambda: _matmul_rows(rows, one), device)
    log.info("int8 decode product on %s: cpm_kernels %.3f ms, torch %.3f ms", device, 1e3 * ours, 1e3 * theirs)
    return ours < theirs


def _median_seconds(fn, device: str, runs: int = 9) -> float:
    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


class _KernelProbe:
    """The few attributes the int4 matmuls read, for the self-check before any module exists."""

    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int):
        self.weight, self.scales_and_zeros, self.in_features = weight, scales_and_zeros, in_features


def _nibble_sources(layout: str, device_type: str, out_features: int, in_features: int) -> torch.Tensor:
    """For a tiled int4 layout: the source element index `o * in + i` of every packed nibble
    (bytes in memory order, low nibble first). Found by packing the index digit by digit, base
    16 — the packers only move nibbles — so no knowledge of the tiling is hard-coded. Not cached:
    for 6B-sized matrices the map is ~0.5 GB, and saving a quantised state_dict is rare."""
    n = out_features * in_features
    index = torch.arange(n, dtype=torch.int64, device=device_type).view(out_features, in_features)
    sources = torch.zeros(n, dtype=torch.int64, device=device_type)
    shift = 0
    while (n - 1) >> shift:
        digit = ((index >> shift) & 0xF).to(torch.int8) - 8   # packers add 8 back
        sources |= _nibbles(_PACKERS[layout](pack_int4(digit))) << shift
        shift += 4
    return sources


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.contiguous().view(torch.uint8).flatten().to(torch.int64)
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten()


def _unpack_tiled(layout: str, packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Tiled int4 -> reference int8 q `[out, in]`."""
    sources = _nibble_sources(layout, packed.device.type, out_features, in_features)
    q = torch.empty(out_features * in_features, dtype=torch.int64, device=packed.device)
    q[sources] = _nibbles(packed) - 8
    return q.view(out_features, in_features).to(torch.int8)


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """y = x · (q · scale)ᵀ + bias with int8/int4 q. state_dict and load_state_dict use the
    reference format (`weight` int8, `weight_scale`, `bias`) whatever the runtime layout."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 needs an even number of input features, got {in_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.layout = "rows"
        self.register_buffer("weight", torch.zeros(stored_shape(out_features, in_features, bits), dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("scales_and_zeros", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantLinear:
        """Quantise a loaded nn.Linear, on its device, computing in its weight's dtype."""
        weight = linear.weight.detach()
        q, scale = quantize_weight(weight, bits, weight.dtype)
        module = cls(linear.in_features, linear.out_features, bits, linear.bias is not None, device="meta", dtype=weight.dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        module.set_weights_(pack_int4(q) if bits == 4 else q, scale, bias)
        return module

    def set_weights_(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take reference-format tensors and store them in the best layout for their device and
        the scale's dtype (the compute dtype)."""
        expected = stored_shape(self.out_features, self.in_features, self.bits)
        if tuple(weight.shape) != expected or weight.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"int{self.bits} weight must be int8 {list(expected)}, got {weight.dtype} {list(weight.shape)}")
        if tuple(scale.shape) != (self.out_features,) or not scale.is_floating_point():
            raise ValueError(f"weight_scale must be a float [{self.out_features}], got {scale.dtype} {list(scale.shape)}")
        weight = weight.view(torch.int8)
        self.layout = choose_layout(self.bits, weight.device, scale.dtype, self.out_features, self.in_features)
        if self.layout == "rows":
            self.weight = weight
        else:
            self.weight = _PACKERS[self.layout](weight)
            self.scales_and_zeros = _scales_and_zeros(scale, self.in_features)
        self.weight_scale = scale
        if bias is not None:
            self.bias = bias.to(device=weight.device, dtype=scale.dtype)

    def reference_weight(self) -> torch.Tensor:
        """The stored weight in the reference format, whatever the runtime layout."""
        if self.layout == "rows":
            return self.weight
        return pack_int4(_unpack_tiled(self.layout, self.weight, self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = _LAYOUT_DEVICE.get(self.layout)
        if device_type is not None and x.device.type != device_type:
            raise RuntimeError(f"this int{self.bits} linear was packed for {device_type} ({self.layout}) but got input "
                               f"on {x.device}; quantise after placing the model on its device")
        lead = x.shape[:-1]
        y = _MATMULS[self.layout](self, x.reshape(-1, self.in_features).contiguous())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.reference_weight()
        destination[prefix + "weight_scale"] = self.weight_scale if keep_vars else self.weight_scale.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        names = ["weight", "weight_scale"] + (["bias"] if self.bias is not None else [])
        absent = [prefix + n for n in names if prefix + n not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        try:
            self.set_weights_(*(state_dict[prefix + n] for n in names), *([None] if self.bias is None else []))
        except ValueError as err:
            error_msgs.append(f"{prefix}: {err}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"layout={self.layout}, bias={self.bias is not None}")


def quantize_block_(block: nn.Module, bits: int) -> nn.Module:
    """Swap the block's four linears for QuantLinear in place (weights must be loaded)."""
    check_bits(bits)
    for name in BLOCK_LINEARS:
        parent_name, child = name.rsplit(".", 1)
        parent = block.get_submodule(parent_name)
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is {type(linear).__name__}, expected nn.Linear (already quantised?)")
        setattr(parent, child, QuantLinear.from_linear(linear, bits))
    return block


def empty_quantized_block_(block: nn.Module, bits: int, dtype: torch.dtype) -> nn.Module:
    """Swap the four linears of a block built on the meta device for empty QuantLinears, so that
    a checkpoint written with `quantization_bit` loads into it with load_state_dict."""
    check_bits(bits)
    for name in BLOCK_LINEARS:
        parent_name, child = name.rsplit(".", 1)
        parent = block.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, QuantLinear(linear.in_features, linear.out_features, bits,
                                           linear.bias is not None, device="meta", dtype=dtype))
    return block

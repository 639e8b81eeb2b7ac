"""Float32 linear layers on CPU for a few rows at a time: the weight-first product.

`F.linear(x, W)` multiplies the rows of ``x`` by the transposed weight (``x @ Wᵀ``). With the few
rows of a serving engine's batched decode step (one per running reply) some BLAS builds run that
far below the speed of the same product written weight first, ``(W @ xᵀ)ᵀ``. Measured with
torch 2.13.0+cpu (MKL) on a 2-CPU AMD EPYC VM (AVX2), 2 threads, float32 (ms per call,
F.linear -> weight first):

    [3072, 1024] at 2 / 4 / 8 rows:      3.6 / 4.9 / 3.8  ->  1.3 / 2.1 / 3.1
    [4096, 1024] at 2 / 4 / 8 rows:      4.0 / 6.5 / 5.4  ->  1.6 / 1.5 / 2.7
    [130528, 1024] (a GLM head) at 2/4/8: 150 / 275 / 235  ->  53 / 60 / 97

and the same at one row (a matrix-vector product either way). Whether it pays is the BLAS's
business, so `weight_first_pays` measures it once at load time on one of the model's own weights,
and `use_weight_first_` swaps only then. The swapped modules hold the very same Parameters (the
state_dict names and tied weights do not change); one row and more than `MAX_ROWS` rows (a long
prefill, a training batch) still go through `F.linear`. Results agree with `F.linear` to float32
rounding (the order of the sums may differ).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MAX_ROWS = 64  # up to here measured faster (2-128 rows) on the machine above; batched decode is within it
PROBE_ROWS = 4
PROBE_MAX_ELEMENTS = 16 << 20  # probe on a block's projection, not on a 130k-row head
MIN_ELEMENTS = 1 << 20  # smaller models (tests' tiny ones): either way takes microseconds, keep F.linear


def weight_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ xᵀ)ᵀ``."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class WeightFirstLinear(nn.Module):
    """An nn.Linear's own weight and bias, multiplied weight first for 2..MAX_ROWS rows."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: tied weights stay tied
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 2 <= rows <= MAX_ROWS:
            return weight_first(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _probe_weight(module: nn.Module) -> torch.Tensor | None:
    """The largest linear weight under `module` that is small enough to time quickly."""
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear) and m.weight.numel() <= PROBE_MAX_ELEMENTS]
    return max(weights, key=lambda w: w.numel(), default=None)


@torch.inference_mode()
def weight_first_pays(weight: torch.Tensor, rows: int = PROBE_ROWS, repeats: int = 5) -> bool:
    """Whether the weight-first product of `rows` rows beats `F.linear` on this weight by 10 %."""
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    plain = best_time(lambda: F.linear(x, weight), repeats)
    first = best_time(lambda: weight_first(x, weight, None), repeats)
    return first < 0.9 * plain


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def use_weight_first_(module: nn.Module, probe: bool = True) -> int:
    """On CPU in float32, swap every nn.Linear under `module` for a WeightFirstLinear in place, if
    its weights are not tiny and the probe finds it faster here (`probe=False`: swap regardless).
    Returns how many were swapped (0: nothing changed)."""
    weight = _probe_weight(module)
    if weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return 0
    if probe and weight.numel() < MIN_ELEMENTS:
        return 0
    if probe and not weight_first_pays(weight):
        log.info("weight-first float32 linears: no faster on this CPU, not used")
        return 0
    swapped = _swap(module)
    log.info("weight-first float32 linears: %d swapped in (faster for %d-%d rows on this CPU)", swapped, 2, MAX_ROWS)
    return swapped


def _swap(module: nn.Module) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, WeightFirstLinear(child))
            count += 1
        else:
            count += _swap(child)
    return count

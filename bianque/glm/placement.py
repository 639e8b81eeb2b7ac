"""Placing BianQue-2 on several devices: whole blocks per device, by memory (`--devices`).

The plan comes from accelerate's big-model utilities run on an empty (meta) model, never from a
home-made scheduler: `get_balanced_memory` spreads the blocks evenly over the devices within
their budgets, `infer_auto_device_map` assigns whole `GLMBlock`s (never split), and the tied
embedding/head share one device. The loader then reads every module straight onto its device
and `dispatch` adds accelerate's hooks that carry activations across device boundaries; each
layer's KV cache lives with that layer (`new_caches` allocates it next to the layer's weights).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .config import GLMConfig

log = logging.getLogger(__name__)

BLOCK_CLASS = "GLMBlock"
# Held back on every accelerator for what is not a weight: the KV cache of its layers
# (fp16 6B: 32 MB per layer at 2048 positions), activations and the last-position logits.
DEFAULT_RESERVE_BYTES = 1 << 30


def parse_devices(spec: str | Sequence[str | torch.device]) -> list[torch.device]:
    """'auto' (every visible CUDA device, else the CPU), 'cuda:0,cuda:1', 'cpu', or a list."""
    if isinstance(spec, str):
        if spec.strip() == "auto":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
        spec = [part for part in spec.split(",") if part.strip()]
    devices = []
    for item in spec:
        try:
            device = torch.device(item.strip() if isinstance(item, str) else item)
        except RuntimeError as err:
            raise ValueError(f"not a device: {item!r} (examples: cuda:0,cuda:1 or auto)") from err
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        devices.append(device)
    if not devices:
        raise ValueError("no devices given (examples: cuda:0,cuda:1 or auto)")
    if len(set(devices)) != len(devices):
        raise ValueError(f"a device is listed twice: {', '.join(map(str, devices))}")
    if any(d.type not in ("cuda", "cpu") for d in devices):
        raise ValueError(f"only cuda:N and cpu can hold blocks, got {', '.join(map(str, devices))}")
    return devices


def _accelerate_key(device: torch.device) -> int | str:
    """accelerate names GPUs by index and the CPU as 'cpu'."""
    return device.index if device.type == "cuda" else "cpu"


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free - DEFAULT_RESERVE_BYTES)
    import psutil

    return psutil.virtual_memory().available


def empty_model(config: GLMConfig, dtype: torch.dtype, quantize: int | None = None) -> nn.Module:
    """The model on the meta device (no memory), with int8/int4 linears when quantising, so its
    sizes are those of what will really be loaded."""
    from .model import GLMForCausalLM
    from .quant import empty_quantized_block_

    with torch.device("meta"):
        model = GLMForCausalLM(config).to(dtype)
    if quantize:
        for block in model.transformer.layers:
            empty_quantized_block_(block, quantize, dtype)
    return model


def plan_device_map(config: GLMConfig, devices: str | Sequence[str | torch.device],
                    max_memory: Mapping[str | torch.device, int | str] | None = None,
                    dtype: torch.dtype = torch.float16, quantize: int | None = None) -> dict[str, str]:
    """Module name -> device ('cuda:1', 'cpu') for every top-level piece of the model: the
    embedding, the tied head, each block, the final LayerNorm.

    max_memory: a budget per device (bytes or '10GB'); by default each GPU's free memory minus
    DEFAULT_RESERVE_BYTES, and the available RAM for 'cpu'. Raises ValueError when the model does
    not fit the budgets, saying by how much."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory

    targets = parse_devices(devices)
    budgets = _budgets(targets, max_memory)
    model = empty_model(config, dtype, quantize)
    if len(targets) > 1:
        # Spread evenly rather than filling the first device: every device keeps headroom for
        # its layers' KV cache. (accelerate keeps the last device's budget whole for spill.)
        budgets = get_balanced_memory(model, max_memory=dict(budgets), no_split_module_classes=[BLOCK_CLASS], dtype=dtype)
    placed = infer_auto_device_map(model, max_memory=dict(budgets), no_split_module_classes=[BLOCK_CLASS], dtype=dtype)
    names = {_accelerate_key(d): str(d) for d in targets}
    overflow = [name for name, where in placed.items() if where not in names]
    if overflow:
        need = compute_module_sizes(model, dtype=dtype)[""]
        have = sum(_budgets(targets, max_memory).values())
        raise ValueError(f"BianQue-2 ({_size(need)} of weights in {str(dtype).removeprefix('torch.')}"
                         f"{f', int{quantize}' if quantize else ''}) does not fit on {', '.join(names.values())} "
                         f"({_size(have)} budget). Add devices, or use --quantize 8 or 4.")
    by_prefix = {name: names[where] for name, where in placed.items()}
    device_map = {piece: str(module_device(by_prefix, piece)) for piece in pieces(config)}
    log.info("device map: %s", _summary(device_map))
    return device_map


def pieces(config: GLMConfig) -> list[str]:
    """The top-level modules a device map assigns, in forward order (the head is tied to the
    embedding, so accelerate keeps the two together)."""
    blocks = [f"transformer.layers.{i}" for i in range(config.num_layers)]
    return ["transformer.word_embeddings", *blocks, "transformer.final_layernorm", "lm_head"]


def _budgets(targets: list[torch.device], max_memory: Mapping | None) -> dict[int | str, int]:
    from accelerate.utils import convert_file_size_to_int

    given = {torch.device(k) if isinstance(k, str) else k: v for k, v in (max_memory or {}).items()}
    given = {(torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d): v for d, v in given.items()}
    unknown = set(given) - set(targets)
    if unknown:
        raise ValueError(f"max_memory names devices not in the list: {', '.join(map(str, unknown))}")
    budgets = {}
    for device in targets:
        value = given.get(device)
        budgets[_accelerate_key(device)] = (_free_memory(device) if value is None
                                            else convert_file_size_to_int(value) if isinstance(value, str) else int(value))
    return budgets


def module_device(device_map: Mapping[str, str], name: str) -> torch.device:
    """The device of module (or tensor) `name` under a device map of module-name prefixes."""
    best = None
    for prefix in device_map:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise KeyError(f"{name} is not covered by the device map")
    return torch.device(device_map[best])


def dispatch(model: nn.Module, device_map: Mapping[str, str]) -> nn.Module:
    """Add accelerate's hooks that move activations to each module's device; the weights must
    already be where the map says (the loader reads them there)."""
    from accelerate import dispatch_model

    if len({*device_map.values()}) == 1:
        return model  # one device: nothing crosses a boundary
    return dispatch_model(model, device_map=dict(device_map))


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def _summary(device_map: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for name, device in device_map.items():
        if name.startswith("transformer.layers."):
            counts[device] = counts.get(device, 0) + 1
    return ", ".join(f"{device}: {n} blocks" for device, n in counts.items())

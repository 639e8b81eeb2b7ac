"""Load a ChatGLM-6B checkpoint directory (BianQue-2 layout, SPEC §1) into GLMForCausalLM.

Small and loud: read config.json, index every tensor in the weight files (safetensors, a single
`pytorch_model.bin` read with weights_only=True, or shards listed in `*.index.json`), check names
and shapes against the model BEFORE reading any data, then fill the model built on the meta
device one layer at a time, so a 6B checkpoint is never held twice in memory.
"""
from __future__ import annotations

import ctypes
import json
import logging
import mmap
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelLoadError
from ..settings import DTYPES
from .config import GLMConfig
from ..cpu_linear import use_weight_first_
from .cpu_pack import pack_embedding_, pack_linears_, packing_available, packing_pays
from .model import GLMForCausalLM

log = logging.getLogger(__name__)

EMBEDDING = "transformer.word_embeddings.weight"
HEAD = "lm_head.weight"
# Recomputed by the model from the config (the reference never loads them either).
IGNORED = re.compile(r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class TensorIndex:
    """name -> a way to read that tensor, across one or many files; shapes known up front."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._readers: dict[str, Callable[[], torch.Tensor]] = {}
        self._mapped: set[str] = set()  # tensors that are views of a memory-mapped `.bin` shard

    def add_safetensors(self, path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                self.shapes[name] = tuple(f.get_slice(name).get_shape())
                self._readers[name] = lambda n=name: _read_safetensor(path, n)

    def add_bin(self, path: Path) -> None:
        # mmap keeps the pickle's storage on disk until a tensor is copied out; weights_only
        # refuses anything but tensors and plain containers.
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            self._mapped.update(state)
        except pickle.UnpicklingError as err:
            raise ModelLoadError(f"cannot safely read {path.name}: {str(err).splitlines()[0]}; "
                                 "it holds more than tensors (convert it to safetensors)") from err
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        for name, tensor in state.items():
            self.shapes[name] = tuple(tensor.shape)
            self._readers[name] = lambda t=tensor: t

    def read(self, name: str) -> torch.Tensor:
        return self._readers[name]()

    def take(self, name: str, copy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Read a tensor and forget it: a memory-mapped `.bin` shard is unmapped as soon as all of
        its tensors are copied out, instead of every shard staying resident until the end.
        With `copy` (which must return a copy), the tensor's file pages are also dropped from this
        process right after copying, so a 4-5 GB shard never sits in memory next to the model
        it is being copied into (measured on the 6B shape: peak 15.9 GB before, see README)."""
        tensor = self._readers.pop(name)()
        if copy is None:
            return tensor
        result = copy(tensor)
        if name in self._mapped:
            release_file_pages(tensor)
        return result

    def keep_only(self, names: set[str]) -> None:
        """Forget tensors that will never be read (inv_freq, a duplicate head) for the same reason."""
        for name in set(self._readers) - names:
            del self._readers[name]


def release_file_pages(tensor: torch.Tensor) -> bool:
    """Tell the kernel this process no longer needs the pages of a tensor that lives in a
    PRIVATE, read-only file mapping (torch.load(mmap=True)). MADV_DONTNEED drops them from the
    process; the data is untouched, since touching them again re-reads the file. Only whole pages
    inside the tensor are released. Linux only; elsewhere (or on failure) it does nothing."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    storage = tensor.untyped_storage()
    page = mmap.PAGESIZE
    start = -(-storage.data_ptr() // page) * page
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    if end <= start:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(start, end - start, mmap.MADV_DONTNEED) == 0


def return_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    Quantising or packing a block frees many mid-sized temporaries that glibc otherwise keeps
    for reuse, so resident memory creeps up block after block (measured on the 6B shape, int4
    from .bin: peak 5.45 GB without, 5.08 GB with a trim after every block)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass


def _read_safetensor(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def index_checkpoint(directory: Path) -> TensorIndex:
    """Index the first weight format found (safetensors preferred)."""
    index = TensorIndex()
    for filename in WEIGHT_FILES:
        path = directory / filename
        if not path.exists():
            continue
        files = [path]
        if filename.endswith(".index.json"):
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            files = [directory / shard for shard in sorted(set(weight_map.values()))]
        for file in files:
            if not file.exists():
                raise ModelLoadError(f"shard {file.name} listed in {filename} is missing from {directory}")
            (index.add_safetensors if file.suffix == ".safetensors" else index.add_bin)(file)
        return index
    raise ModelLoadError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


def expected_shapes(model: GLMForCausalLM) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must provide (the tied head is optional: it is the embedding)."""
    return {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items() if name != HEAD}


def check_names(index: TensorIndex, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise one ModelLoadError listing every missing, unexpected and mis-shaped tensor."""
    found = {n: s for n, s in index.shapes.items() if not IGNORED.fullmatch(n)}
    if EMBEDDING not in found and HEAD in found:
        found[EMBEDDING] = found.pop(HEAD)  # only the head was saved: it is the embedding
    head_shape = found.pop(HEAD, None)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{n}: checkpoint {list(s)} vs model {list(expected[n])}"
             for n, s in sorted(found.items()) if n in expected and s != expected[n]]
    if head_shape is not None and head_shape != expected[EMBEDDING]:
        wrong.append(f"{HEAD}: checkpoint {list(head_shape)} vs model {list(expected[EMBEDDING])}")
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            problems.append(f"{label} ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    if problems:
        raise ModelLoadError("checkpoint does not match its config.json; " + "; ".join(problems))


def _load_module(module: torch.nn.Module, prefix: str, index: TensorIndex, dtype: torch.dtype,
                 device: torch.device) -> None:
    state = {}
    for name in module.state_dict(keep_vars=True):
        full = prefix + name
        source = full if full in index.shapes else HEAD  # embedding saved only as the head
        # copy=True: a safetensors tensor is a view of the memory-mapped file; weights read for
        # every token must live in RAM, not in file pages the kernel may evict and re-read
        # (measured on the 6B shape, int8 from safetensors: 0.4 tokens/s left mapped, 3.3 copied).
        # int8 quantised weights keep their dtype.
        state[name] = index.take(source, lambda t: t.to(
            device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True))
    module.load_state_dict(state, strict=True, assign=True)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               quantize: int | None = None, devices: str | list[str] | None = None,
               max_memory: dict | None = None, pack: bool | None = None) -> GLMForCausalLM:
    """GLMForCausalLM from a checkpoint directory, in `dtype` (default float32) on `device`,
    with weight-only int8/int4 linears when `quantize` is 8 or 4 (or config.quantization_bit).
    `pack` (default: bfloat16 on one CPU with oneDNN bf16, and float32 on one CPU where packed products
    time faster here; with int8/int4 blocks the embedding/head only) swaps in prepacked weights for fast
    decoding (cpu_pack.py); unpacked float32 on CPU gets weight-first linears where they are faster here
    (cpu_linear.py); `pack=False`: neither.
    `devices` ('cuda:0,cuda:1' or 'auto') spreads whole blocks over several devices instead
    (placement.py; optional per-device `max_memory` budgets)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a ChatGLM checkpoint directory (no config.json)")
    try:
        config = GLMConfig.from_json(directory)
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {directory / 'config.json'}: {err}") from err
    dtype, device = as_dtype(dtype), torch.device(device)
    bits = quantize or config.quantization_bit or None
    if bits not in (None, 4, 8):
        raise ModelLoadError(f"quantize must be 4 or 8, not {bits}")
    stored_bits = config.quantization_bit or None  # a checkpoint written already quantised
    if stored_bits and bits != stored_bits:
        raise ModelLoadError(f"{directory} is stored as int{stored_bits}; it cannot be loaded as int{bits}")
    # With int8/int4 blocks only the embedding/head is packed: unpacked, oneDNN keeps a re-laid-out
    # copy of the 1 GB head (measured: int8 6B peak 8.2 GB instead of 7.1 GB, and slower decoding).
    can_pack = packing_available(device, dtype) and devices is None
    if pack and not can_pack:
        raise ModelLoadError("packed weights need one CPU with oneDNN, in float32 or in bfloat16 with oneDNN bf16 support")
    plain = pack is False  # no runtime layouts at all: neither packed weights nor weight-first fp32
    pack = (can_pack and packing_pays(device, dtype, config.hidden_size)) if pack is None else pack
    with torch.device("meta"):
        model = GLMForCausalLM(config)
    if stored_bits:
        from .quant import empty_quantized_block_  # engineer F's module
        for block in model.transformer.layers:
            empty_quantized_block_(block, stored_bits, dtype)
    index = index_checkpoint(directory)
    expected = expected_shapes(model)
    check_names(index, expected)
    index.keep_only(set(expected) if EMBEDDING in index.shapes else set(expected) - {EMBEDDING} | {HEAD})
    device_map = None
    if devices is not None:  # engineer F: multi-device placement
        from .placement import module_device, plan_device_map
        try:
            device_map = plan_device_map(config, devices, max_memory, dtype, bits)
        except ValueError as err:
            raise ModelLoadError(str(err)) from err
    where = (lambda name: device) if device_map is None else (lambda name: module_device(device_map, name))
    _load_module(model.transformer.word_embeddings, "transformer.word_embeddings.", index, dtype, where("transformer.word_embeddings"))
    model.lm_head.weight = model.transformer.word_embeddings.weight  # re-tie after assign=True
    if pack:  # now, so the plain and the packed embedding never coexist with all the blocks
        pack_embedding_(model)
    _load_module(model.transformer.final_layernorm, "transformer.final_layernorm.", index, dtype, where("transformer.final_layernorm"))
    for i, block in enumerate(model.transformer.layers):
        _load_module(block, f"transformer.layers.{i}.", index, dtype, where(f"transformer.layers.{i}"))
        if bits and not stored_bits:
            from .quant import quantize_block_  # engineer F's module; only needed when quantising
            quantize_block_(block, bits)
        elif pack:
            pack_linears_(block)
        return_free_heap()
    if device_map is not None:
        from .placement import dispatch
        dispatch(model, device_map)
    weight_first = 0
    if not plain and device_map is None and device.type == "cpu" and dtype == torch.float32:
        weight_first = use_weight_first_(model)  # few-row fp32 products, where this CPU's BLAS favours it
    log.info("loaded ChatGLM checkpoint: layers=%d hidden=%d dtype=%s device=%s quantize=%s packed=%s weight_first=%s",
             config.num_layers, config.hidden_size, dtype, device, bits, pack, bool(weight_first))
    return model.requires_grad_(False).eval()

"""`python -m bianque convert SRC DST [--dtype bf16|fp16] [--quantize 4|8]`.

Rewrites a BianQue-2 (ChatGLM-6B) checkpoint as sharded safetensors plus
`model.safetensors.index.json`, keeping the checkpoint's tensor names, so a demo machine
copies the weights straight out of memory-mapped files instead of unpickling 13 GB of `.bin`
(load times and peak memory depend on the machine: README, "Performance and memory", gives
figures with their machine and the commands to measure yours). With `--quantize` the four
linears of every block are stored as the reference does (`<name>.weight` int8, int4 packed two
per byte high nibble first, plus `<name>.weight_scale`) and config.json says `quantization_bit`.

Streaming: the output shards are planned from the tensor shapes alone, then each shard is
filled one tensor at a time from the (memory-mapped) source and written, so peak memory is
about one shard, never the whole model twice.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ModelLoadError
from .glm.loader import IGNORED, index_checkpoint
from .glm.quant import BLOCK_LINEARS, pack_int4, quantize_weight, stored_shape
from .settings import DTYPES, HUB_ENV_VARS, env_help

log = logging.getLogger(__name__)

CONFIG_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3
INDEX_NAME = "model.safetensors.index.json"
HEAD, EMBEDDING = "lm_head.weight", "transformer.word_embeddings.weight"
WEIGHT_FILES = re.compile(r".*\.(bin|safetensors|pt|pth|ckpt)|.*\.index\.json")
REMOTE_CODE = re.compile(r".*\.py")
QUANTIZED_WEIGHT = re.compile(r"transformer\.layers\.\d+\.(" + "|".join(re.escape(n) for n in BLOCK_LINEARS) + r")\.weight")


@dataclass(frozen=True)
class Planned:
    """One source tensor and what it becomes: `name` (and `name + '_scale'` when quantised)."""
    name: str
    source: str
    shape: tuple[int, ...]
    bits: int | None
    nbytes: int


def plan_tensors(shapes: dict[str, tuple[int, ...]], dtype_size: int, bits: int | None) -> list[Planned]:
    """Every tensor to write, in checkpoint order, with its output size in bytes.

    The tied head is written once, as the embedding (as transformers' safetensors files do);
    rotary `inv_freq` buffers are dropped (the model recomputes them)."""
    names = [n for n in shapes if not IGNORED.fullmatch(n)]
    if EMBEDDING in names and HEAD in names:
        names.remove(HEAD)
    plan = []
    for name in sorted(names, key=_checkpoint_order):
        shape = shapes[name]
        quantized = bits if QUANTIZED_WEIGHT.fullmatch(name) else None
        if quantized:
            out_features, in_features = shape
            nbytes = _numel(stored_shape(out_features, in_features, quantized)) + out_features * dtype_size
        else:
            nbytes = _numel(shape) * dtype_size
        plan.append(Planned(name, name, shape, quantized, nbytes))
    return plan


def _checkpoint_order(name: str) -> tuple[int, int, str]:
    """Embedding, then blocks by number, then the final LayerNorm and head: shards follow layers."""
    match = re.match(r"transformer\.layers\.(\d+)\.", name)
    if match:
        return (1, int(match.group(1)), name)
    return (0 if "word_embeddings" in name else 2, 0, name)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def split_shards(plan: list[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """Consecutive groups of at most max_shard_bytes (a bigger single tensor gets its own shard)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def converted(item: Planned, tensor: torch.Tensor, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensor(s) for one planned source tensor, always new memory (never a view of
    the source file, whose pages are released once it is converted)."""
    target = dtype or tensor.dtype
    if item.bits:
        q, scale = quantize_weight(tensor, item.bits, target)
        yield item.name, (pack_int4(q) if item.bits == 4 else q)
        yield item.name + "_scale", scale
    elif tensor.is_floating_point():
        yield item.name, tensor.to(target, memory_format=torch.contiguous_format, copy=True)
    else:
        yield item.name, tensor.clone(memory_format=torch.contiguous_format)


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, quantize: int | None = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the converted checkpoint into `dst` (which must not already hold weights)."""
    from .hub import V2_REPO, resolve_checkpoint

    if dtype is not None and dtype.lower() not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize not in (None, 4, 8):
        raise ValueError(f"--quantize must be 4 or 8, not {quantize!r}")
    source = resolve_checkpoint(str(src), "the SRC argument")
    target = Path(dst).expanduser()
    config = _read_config(source)
    already = int(config.get("quantization_bit") or 0)
    if already and (quantize or dtype):
        raise ValueError(f"{source} is already quantised to int{already}; convert from the full-precision "
                         f"checkpoint ({V2_REPO}) instead")
    _check_target(source, target)
    index = index_checkpoint(source)
    torch_dtype = DTYPES[dtype.lower()] if dtype else None
    dtype_size = torch.empty((), dtype=torch_dtype or _stored_float_dtype(index)).element_size()
    shards = split_shards(plan_tensors(index.shapes, dtype_size, quantize), max_shard_bytes)
    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for item in shard:
            # Converted, then the source's file pages released: a `.bin` source is not resident next
            # to the shard being written (6B fp16 .bin -> bf16: peak 14.1 GB before, see README).
            for name, tensor in index.take(item.source, lambda t: list(converted(item, t, torch_dtype))):
                tensors[name] = tensor
                weight_map[name] = filename
                total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(target / filename), metadata={"format": "pt"})
        make_readable(target / filename)
        del tensors
        log.info("wrote shard %d/%d", number, len(shards))
    _write_json(target / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _copy_side_files(source, target)
    _write_json(target / "config.json", _converted_config(config, torch_dtype, quantize))
    log.info("converted checkpoint: shards=%d bytes=%d quantize=%s seconds=%.1f",
             len(shards), total, quantize, time.perf_counter() - started)
    return target


def make_readable(path: Path) -> None:
    """Give a written weights file the umask's usual mode (0644 under umask 022).

    safetensors writes through a private temporary file, so its files come out 0600: other users
    and services (the demo server's account, a second engineer) could not read the model.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _read_config(source: Path) -> dict:
    path = source / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{source} is not a ChatGLM checkpoint directory (no config.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_target(source: Path, target: Path) -> None:
    if target.exists() and source.resolve() == target.resolve():
        raise ValueError("DST must differ from SRC")
    if target.is_file():
        raise ValueError(f"DST {target} is a file; give a directory")
    if target.is_dir() and any(WEIGHT_FILES.fullmatch(p.name) for p in target.iterdir()):
        raise ValueError(f"DST {target} already holds weights; choose an empty or new directory")


def _stored_float_dtype(index) -> torch.dtype:
    """The source's float dtype (kept when --dtype is not given; fp16 for BianQue-2), read from
    the smallest float tensor there is (the final LayerNorm), not the 1 GB embedding."""
    name = "transformer.final_layernorm.weight"
    if name not in index.shapes:
        raise ModelLoadError(f"the checkpoint has no {name}; is it a ChatGLM-6B checkpoint?")
    return index.read(name).dtype


def _converted_config(config: dict, dtype: torch.dtype | None, quantize: int | None) -> dict:
    out = dict(config)
    if dtype is not None:
        out["torch_dtype"] = CONFIG_DTYPE_NAMES[dtype]
    if quantize:
        out["quantization_bit"] = quantize
    return out


def _copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer and generation files travel with the weights (symlinks of a HF cache resolved);
    weights are rewritten and remote code is left behind (this project never runs it)."""
    for path in sorted(source.iterdir()):
        skipped = WEIGHT_FILES.fullmatch(path.name) or REMOTE_CODE.fullmatch(path.name) or path.name == "config.json"
        if path.is_file() and not skipped:
            shutil.copyfile(path, target / path.name)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def parse_size(text: str) -> int:
    """'2GB', '500MB', '123' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GB, 500MB)")
    unit = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "G": 1024 ** 3, "GB": 1024 ** 3}
    return int(float(match.group(1)) * unit[match.group(2)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bianque convert", description=__doc__.split("\n\n")[1],
                                     epilog=env_help(list(HUB_ENV_VARS)), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory or hub id (e.g. scutcyr/BianQue-2)")
    parser.add_argument("dst", help="new directory for the safetensors checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), type=str.lower, help="float dtype of the output (default: as stored)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="store the block linears as int8/int4")
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                        help="largest shard (default 2GB)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert(args.src, args.dst, args.dtype, args.quantize, args.max_shard_size)
    except (ValueError, ModelLoadError, OSError) as err:
        print(f"convert failed: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

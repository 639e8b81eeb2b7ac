"""Speed and memory of the native ChatGLM on random weights: `python -m bianque.bench glm --preset mid`.

`python -m bianque.bench serve --model glm,t5 --concurrency 1,2,4,8` measures the batching engine
(bianque/serving/) on random weights: per concurrency level, the same requests one after another vs
all at once (speedup), aggregate and per-stream decode tokens/s, time to first token of a request
joining a running batch (p50/p95), peak memory.

`python -m bianque.bench api --url URL --concurrency 8 --requests 64` load-tests a running
`python -m bianque serve` instead (bianque/serving/loadtest.py): throughput, latency and time to
first token percentiles, errors.

Prints prefill tokens/s, decode tokens/s, time to first token, peak memory, and the bytes of
weights read per decoded token divided by the decode time (effective GB/s) next to this
machine's measured matrix-vector bandwidth: single-token decoding is memory-bound, so that ratio
says how close the generator gets to the hardware. `--json` prints one JSON object instead.
`--quantize 8|4` swaps the block linears for int8/int4 ones, block by block as they are filled;
`--checkpoint DIR` loads real files instead (and reports the load time); `--consultation 30`
then runs a 30-turn consultation through the advisor and reports memory when the dialogue first
fills `--max-length` and after the last turn (both must be equal: the prompt and KV cache are
bounded by max_length, whatever the dialogue's length). `--compile` times the static-cache,
torch.compile'd decode step (CUDA graphs on CUDA); the compile happens in the warm-up and is
reported apart (`compile_s`). On CUDA the decode is also compared with the GPU's memory
bandwidth limit from its clock and bus width (`--bandwidth-gbps` overrides it).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace

import torch

from .glm.config import GLMConfig
from .cpu_linear import WeightFirstLinear, use_weight_first_
from .glm.cpu_pack import PackedEmbedding, PackedLinear, PackedRows, pack_embedding_, pack_linears_, pack_or_weight_first_, packing_pays
from .glm.generate import generate_tokens, static_decoder
from .glm.model import GLMForCausalLM
from .glm.quant import quantize_block_
from .sampling import next_token
from .serving.openmp import release_team
from .settings import DTYPES, dtype_name

PRESETS = {
    "mid": GLMConfig(hidden_size=1024, num_attention_heads=16, num_layers=4, inner_hidden_size=4096),
    "6b": GLMConfig(),  # BianQue-2's real shape
}
INIT_CHUNK_ELEMENTS = 1 << 24  # fill weights 16M values at a time: no full-size temporaries
GB = 1e9


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "mid"
    dtype: str = "float32"
    device: str = "cpu"
    prompt_tokens: int = 128
    new_tokens: int = 32
    matvec_mb: int = 512
    repeats: int = 3
    pack: bool = True
    quantize: int | None = None
    checkpoint: str | None = None
    consultation: int = 0
    max_length: int = 512
    tokenizer: str | None = None
    compile: bool = False
    bandwidth_gbps: float | None = None  # overrides the limit read from the GPU's properties
    save_checkpoint: str | None = None  # write random weights there instead of benchmarking


def _fill_(tensor: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), INIT_CHUNK_ELEMENTS):
        flat[start:start + INIT_CHUNK_ELEMENTS].uniform_(-bound, bound, generator=generator)


def random_model(config: GLMConfig, dtype: torch.dtype, device: torch.device, pack: bool, seed: int = 0,
                 quantize: int | None = None) -> GLMForCausalLM:
    """A model of the given shape, allocated directly in `dtype` on `device` (never a float32
    copy: the 6B shape would need 25 GB) and filled with small random values chunk by chunk.
    With `pack`, weights are packed as the loader packs them, the embedding first and then one
    block at a time, so plain and packed copies of the whole model never coexist."""
    with torch.device("meta"):
        model = GLMForCausalLM(config).to(dtype)
    model = model.to_empty(device=device).requires_grad_(False)
    model.lm_head.weight = model.transformer.word_embeddings.weight  # to_empty unties shared parameters
    generator = torch.Generator(device=device).manual_seed(seed)
    scale = 1.0 / math.sqrt(config.hidden_size)
    _fill_(model.transformer.word_embeddings.weight, scale, generator)
    if pack:
        pack_embedding_(model)
    for module in [*model.transformer.layers, model.transformer.final_layernorm]:
        for name, param in module.named_parameters():
            _fill_(param, 1.0 if name.endswith("layernorm.weight") or name == "weight" else scale, generator)
        if quantize and module is not model.transformer.final_layernorm:
            quantize_block_(module, quantize)  # now: the full-precision blocks never coexist
        elif pack and module is not model.transformer.final_layernorm:
            pack_linears_(module)
    return model.eval()


def save_random_checkpoint(config: GLMConfig, directory: str, shards: int = 3, seed: int = 0) -> str:
    """Write random float16 weights of `config`'s shape in BianQue-2's hub layout (`shards`
    `pytorch_model-0000k-of-0000n.bin` files, their `.index.json` and `config.json`; the tied head
    only as the embedding), so load times and `convert` can be measured without the hub. Blocks
    are split over the shards in order, the embedding in the first, the final LayerNorm in the
    last; one fp16 copy of the model is held (12.3 GB for 6B)."""
    from pathlib import Path

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model = random_model(config, torch.float16, torch.device("cpu"), pack=False, seed=seed)
    state = {name: p for name, p in model.state_dict().items() if name != "lm_head.weight"}
    layers = config.num_layers
    per_shard = -(-layers // shards)

    def shard_of(name: str) -> int:
        if name.startswith("transformer.layers."):
            return int(name.split(".")[2]) // per_shard
        return 0 if "word_embeddings" in name else shards - 1

    weight_map, total = {}, 0
    for k in range(shards):
        filename = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {name: t for name, t in state.items() if shard_of(name) == k}
        torch.save(part, path / filename)
        weight_map.update({name: filename for name in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return str(path)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matvec_gbps(dtype: torch.dtype, device: torch.device, megabytes: int, repeats: int,
                pack: bool) -> tuple[float, float]:
    """(median, best) bandwidth of the decode kernel (F.linear, or the packed kernel when
    packing) on one token over a matrix far larger than the caches. The median is the figure
    decoding is compared with, because a decode step is also a median: on a shared machine a
    best-of catches the quietest moment, which the median step never gets."""
    cols = 4096
    rows = megabytes * 2**20 // (cols * torch.finfo(dtype).bits // 8)
    weight = torch.empty(rows, cols, dtype=dtype, device=device).uniform_(-0.01, 0.01)
    size = weight.numel() * weight.element_size()
    x = torch.randn(1, cols, dtype=dtype, device=device)
    if pack:
        packed = PackedRows.from_weight(weight, rows)
        del weight
        matvec = lambda: packed.project(x)  # noqa: E731
    else:
        matvec = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
    matvec()  # warm-up
    times = []
    for _ in range(max(repeats, 3) * 7):
        synchronize(device)
        start = time.perf_counter()
        matvec()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return size / times[len(times) // 2] / GB, size / times[0] / GB


def parameter_count(c: GLMConfig) -> int:
    """Unique parameters of the shape (the head is the embedding)."""
    per_layer = 4 * c.hidden_size + 3 * c.hidden_size * (c.hidden_size + 1) + c.hidden_size * (c.hidden_size + 1) \
        + c.inner_hidden_size * (c.hidden_size + 1) + c.hidden_size * (c.inner_hidden_size + 1)
    return c.vocab_size * c.hidden_size + c.num_layers * per_layer + 2 * c.hidden_size


def preset_name(config: GLMConfig) -> str:
    """The preset whose shape a loaded checkpoint has, else "checkpoint"."""
    shape = lambda c: (c.hidden_size, c.num_attention_heads, c.num_layers, c.inner_hidden_size, c.vocab_size)  # noqa: E731
    return next((name for name, preset in PRESETS.items() if shape(preset) == shape(config)), "checkpoint")


def weight_bytes(model: GLMForCausalLM) -> int:
    """Bytes read per decoded token: every unique weight (the tied head reads the whole
    embedding matrix once; the embedding lookup itself reads one row). Computed from the
    shapes, so it holds for plain and packed modules alike."""
    c = model.config
    size = parameter_count(c) * model.transformer.final_layernorm.weight.element_size()
    bits = getattr(model.transformer.layers[0].mlp.dense_h_to_4h, "bits", None)
    if bits:  # the four block linears hold bits/8 bytes per weight, plus one scale per output row
        element = model.transformer.final_layernorm.weight.element_size()
        linear = 4 * c.hidden_size * c.hidden_size + 2 * c.inner_hidden_size * c.hidden_size
        scales = 5 * c.hidden_size + c.inner_hidden_size
        size += c.num_layers * (scales * element - linear * (element - bits / 8))
    return int(size)


def prompt_ids(config: GLMConfig, length: int, device: torch.device) -> torch.Tensor:
    """Random text ids ending `[gMASK] <sop>`, like every encoded prompt."""
    ids = torch.randint(10, min(config.vocab_size, 60000), (1, length), generator=torch.Generator().manual_seed(1))
    ids[0, -2:] = torch.tensor([config.gmask_token_id, config.bos_token_id])
    return ids.to(device)


def time_generation(model: GLMForCausalLM, ids: torch.Tensor, new_tokens: int,
                    device: torch.device, compile: bool = False) -> tuple[float, list[float]]:
    """(time to first token, seconds of every later step), greedy, through the real generator."""
    stamps = []
    synchronize(device)
    start = time.perf_counter()
    for _ in generate_tokens(model, ids, new_tokens, compile=compile):
        synchronize(device)
        stamps.append(time.perf_counter())
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


def bandwidth_from_properties(props: object) -> float | None:
    """Peak DRAM bandwidth in GB/s from CUDA device properties: double data rate x memory clock
    (kHz) x bus width (bits) / 8; None when the fields are absent or 0."""
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / GB


def bandwidth_limit_gbps(device: torch.device) -> float | None:
    """The memory-bandwidth limit a decode step is held to on a GPU (None on CPU: there the
    measured matrix-vector bandwidth is the reference)."""
    if device.type != "cuda":
        return None
    return bandwidth_from_properties(torch.cuda.get_device_properties(device))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # ru_maxrss is KiB on Linux


def heap_in_use_gb() -> float | None:
    """Bytes malloc has handed out and not taken back (glibc's mallinfo2): live tensors and
    objects, without the freed pages the allocator keeps cached, which RSS also counts."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    info = type("MallInfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = info
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / GB


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / GB


# Synthetic patient text (no real dialogue): long enough that the budget is reached after a few turns.
CONSULTATION_MESSAGE = "第{}次描述：最近头疼、失眠、胃口不好，晚上总是醒来，白天没有精神，已经持续了好几周，请问该怎么办？"


def run_consultation(model: GLMForCausalLM, tokenizer_dir: str, turns: int, max_length: int, device: torch.device) -> dict:
    """Memory over a `turns`-turn consultation through the real advisor (greedy, replies cut
    to 60 characters as a doctor's turn): the dialogue keeps growing, the prompt is fitted into
    max_length by dropping the oldest turns, so memory must stop growing once the budget is hit."""
    from .glm.advisor import GLMAdvisor, V2Params
    from .glm.tokenizer import GLMTokenizer
    from .prompt import DOCTOR, PATIENT, Turn
    from .sampling import SamplingParams

    params = V2Params(sampling=SamplingParams(do_sample=False), max_length=max_length,
                      min_answer_tokens=max(1, max_length // 8))
    advisor = GLMAdvisor(model, GLMTokenizer.from_pretrained(tokenizer_dir), "random", params)

    def memory() -> float:
        return peak_memory_gb(device) if device.type == "cuda" else heap_in_use_gb() or current_rss_gb()

    dialogue, at_budget, trace = [], None, []
    for turn in range(1, turns + 1):
        dialogue.append(Turn(PATIENT, CONSULTATION_MESSAGE.format(turn)))
        fitted = advisor.fit(dialogue)
        gc.collect()  # garbage from earlier turns is not memory the dialogue holds
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        pieces, peak = [], memory()
        for piece in advisor.reply(dialogue):  # sampled while the KV cache is alive: the turn's peak
            pieces.append(piece)
            peak = max(peak, memory())
        dialogue.append(Turn(DOCTOR, "".join(pieces)[:60] or "请多休息。"))
        trace.append(peak)
        if at_budget is None and fitted.changed:
            at_budget = turn
    return {"consultation_turns": turns, "consultation_max_length": max_length, "budget_first_reached_turn": at_budget,
            # each turn's peak: the highest up to the turn that first filled the budget vs every later one
            "memory_at_budget_gb": max(trace[:at_budget]) if at_budget else None,
            "memory_after_budget_gb": max(trace[at_budget:]) if at_budget and at_budget < turns else None,
            "memory_last_turn_gb": trace[-1],
            "memory_measure": "max_memory_allocated" if device.type == "cuda" else "malloc in use (mallinfo2)",
            "rss_after_last_turn_gb": current_rss_gb(), "memory_per_turn_gb": trace}


def run_glm(cfg: BenchConfig) -> dict:
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    config = PRESETS[cfg.preset]
    pack = cfg.pack and packing_pays(device, dtype, config.hidden_size)  # with --quantize: the embedding/head only
    matvec, matvec_best = matvec_gbps(dtype, device, cfg.matvec_mb, cfg.repeats, pack)
    load_s = None
    if cfg.checkpoint:
        from .glm.loader import load_model

        start = time.perf_counter()
        model = load_model(cfg.checkpoint, device=device, dtype=dtype, quantize=cfg.quantize,
                           pack=None if cfg.pack else False)
        load_s = time.perf_counter() - start
        config, pack = model.config, isinstance(model.transformer.word_embeddings, PackedEmbedding)
    else:
        model = random_model(config, dtype, device, pack, quantize=cfg.quantize)
        if cfg.pack:  # as the loader does: float32 on CPU, where faster here
            use_weight_first_(model)
    load_peak = peak_memory_gb(device)
    ids = prompt_ids(config, cfg.prompt_tokens, device)
    if cfg.compile:  # warm-up in the timed shapes: compiling (and recording CUDA graphs) happens here
        warm_ttft, warm_steps = time_generation(model, ids, cfg.new_tokens, device, compile=True)
    else:
        time_generation(model, ids[:, -16:], 3, device)  # warm-up: kernels, allocator
    runs = [time_generation(model, ids, cfg.new_tokens, device, cfg.compile) for _ in range(cfg.repeats)]
    ttft = min(r[0] for r in runs)
    # The median step, not the mean: on a shared machine a few steps lose the CPU to other jobs,
    # and the bandwidth probe above is a best-of too. The mean is reported as well.
    steps = sorted(step for r in runs for step in r[1])
    per_token, mean_step = steps[len(steps) // 2], sum(steps) / len(steps)
    size = weight_bytes(model)
    limit = cfg.bandwidth_gbps or bandwidth_limit_gbps(device)
    compiled = compile_s = None
    if cfg.compile:  # the warm-up's extra time over the fastest timed run of the same shapes
        compiled = static_decoder(model, True).compiled is not None
        compile_s = max(0.0, warm_ttft + sum(warm_steps) - min(r[0] + sum(r[1]) for r in runs))
    return {
        "preset": preset_name(config) if cfg.checkpoint else cfg.preset, "dtype": dtype_name(dtype), "device": str(device),
        "threads": torch.get_num_threads(), "packed": pack,
        "weight_first": any(isinstance(m, WeightFirstLinear) for m in model.modules()), "parameters": parameter_count(config),
        "weights_gb": size / GB, "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
        "prefill_tokens_per_s": cfg.prompt_tokens / ttft, "ttft_s": ttft,
        "decode_tokens_per_s": 1.0 / per_token, "decode_tokens_per_s_mean": 1.0 / mean_step,
        "effective_gbps": size / per_token / GB,
        "matvec_gbps": matvec, "decode_vs_matvec": size / per_token / GB / matvec, "matvec_gbps_best": matvec_best,
        "bandwidth_limit_gbps": limit, "decode_vs_limit": size / per_token / GB / limit if limit else None,
        "compile": cfg.compile, "compiled": compiled, "compile_s": compile_s,
        # a checkpoint converted with --quantize is int4/int8 without the flag: report what ran
        "peak_memory_gb": peak_memory_gb(device), "quantize": cfg.quantize or getattr(config, "quantization_bit", 0) or None,
        "checkpoint": cfg.checkpoint, "load_s": load_s, "peak_memory_after_load_gb": load_peak,
        **(run_consultation(model, cfg.tokenizer or cfg.checkpoint, cfg.consultation, cfg.max_length, device)
           if cfg.consultation else {}),
    }


def report(result: dict) -> str:
    return "\n".join([
        f"ChatGLM {result['preset']} ({result['parameters'] / 1e6:.0f}M parameters, {result['weights_gb']:.2f} GB) "
        f"in {result['dtype']} on {result['device']} ({result['threads']} threads"
        f"{', packed weights' if result['packed'] else ''}{', weight-first linears' if result['weight_first'] else ''}"
        f"{(', compiled decode step' if result['compiled'] else ', static cache, eager steps (compile failed)') if result['compile'] else ''})",
        f"  prefill  {result['prefill_tokens_per_s']:10.1f} tokens/s  ({result['prompt_tokens']}-token prompt)",
        f"  TTFT     {result['ttft_s']:10.3f} s",
        f"  decode   {result['decode_tokens_per_s']:10.2f} tokens/s (median step; mean {result['decode_tokens_per_s_mean']:.2f})",
        f"  weights read per token / decode time: {result['effective_gbps']:.1f} GB/s "
        f"= {100 * result['decode_vs_matvec']:.0f}% of measured matrix-vector bandwidth {result['matvec_gbps']:.1f} GB/s "
        f"(median; best {result['matvec_gbps_best']:.1f})",
        *([f"  = {100 * result['decode_vs_limit']:.0f}% of the memory-bandwidth limit {result['bandwidth_limit_gbps']:.0f} GB/s"]
          if result["bandwidth_limit_gbps"] else []),
        *([f"  compile  {result['compile_s']:10.1f} s (warm-up, not in the figures above)"] if result["compile"] else []),
        f"  peak memory {result['peak_memory_gb']:.2f} GB ({'max_memory_allocated' if result['device'].startswith('cuda') else 'RSS'})",
        *([f"  loaded {result['checkpoint']} in {result['load_s']:.1f} s "
           f"(peak memory after loading {result['peak_memory_after_load_gb']:.2f} GB)"] if result["load_s"] is not None else []),
        *([f"  {result['consultation_turns']}-turn consultation, max_length {result['consultation_max_length']}: budget "
           f"first reached at turn {result['budget_first_reached_turn']}; peak memory up to then "
           f"{result['memory_at_budget_gb']} GB, in every later turn at most {result['memory_after_budget_gb']} GB "
           f"({result['memory_measure']})"]
          if "consultation_turns" in result else []),
    ])


def add_api_parser(sub) -> None:
    api = sub.add_parser("api", help="load test of a running `python -m bianque serve` (see bianque.serving.loadtest)")
    api.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    api.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    api.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    api.add_argument("--model", help="bianque-1.0, bianque-2.0 or bianque-coq (default: the first the server lists)")
    api.add_argument("--api-key", help="the server's key (default: $BIANQUE_API_KEY)")
    api.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    api.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default: the server's)")
    api.add_argument("--json", action="store_true", help="print one JSON object")


def api_config(parser: argparse.ArgumentParser, args: argparse.Namespace):
    import os

    from .serving.loadtest import LoadConfig

    if args.concurrency < 1 or args.requests < 1 or args.max_tokens < 1:
        parser.error("--concurrency, --requests and --max-tokens must be at least 1")
    return LoadConfig(url=args.url, concurrency=args.concurrency, requests=args.requests, model=args.model,
                      api_key=args.api_key or os.environ.get("BIANQUE_API_KEY") or None,
                      max_tokens=args.max_tokens, temperature=args.temperature)


# ---------------------------------------------------------------- serve: the batching engine

SERVE_PRESETS = {
    "glm": {"mid": PRESETS["mid"],
            "tiny": GLMConfig(hidden_size=64, num_attention_heads=4, num_layers=2, inner_hidden_size=256,
                              vocab_size=130528)},
    "t5": {"mid": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=4, num_decoder_layers=4, num_heads=12),
           "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4)},
}


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[str, ...] = ("glm", "t5")
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    preset: str = "mid"
    dtype: str | None = None  # None: each model's CPU/CUDA default (settings.torch_dtype)
    device: str = "cpu"
    compile: bool = False  # GLM: the engine's compiled batched step (one graph per batch bucket)
    pack: bool = True  # the loaders' runtime layouts: packed bf16/fp32 weights and weight-first fp32 linears
    prompt_tokens: int = 64
    new_tokens: int = 32
    repeats: int = 3
    sample: bool = False  # each request samples (the apps' V2Params sampling, its own seeded generator) instead of argmax


def _serve_runner(kind: str, cfg: ServeConfig, max_batch: int):
    """A runner for `kind` on random weights of the preset's shape, and the prompt ids to send."""
    from .serving.glm_runner import GLMRunner
    from .serving.t5_runner import T5Runner
    from .settings import torch_dtype

    device = torch.device(cfg.device)
    dtype = torch_dtype(cfg.dtype, device, "v2" if kind == "glm" else "v1")
    torch.manual_seed(0)
    if kind == "glm":
        config = SERVE_PRESETS["glm"][cfg.preset]
        model = random_model(config, dtype, device, pack=cfg.pack and packing_pays(device, dtype, config.hidden_size))
        if cfg.pack:  # as load_advisor does
            use_weight_first_(model)
        prompt = prompt_ids(config, cfg.prompt_tokens, torch.device("cpu"))[0].tolist()
        return GLMRunner(model, max_batch, cfg.prompt_tokens + cfg.new_tokens + 1, compile=cfg.compile), prompt
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32128, decoder_start_token_id=0, **SERVE_PRESETS["t5"][cfg.preset])
    model = T5ForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    if cfg.pack and device.type == "cpu" and dtype == torch.float32:  # as load_questioner does
        pack_or_weight_first_(model, config.d_model)
    prompt = torch.randint(10, 32000, (cfg.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    return T5Runner(model, max_batch), prompt


def _timed(engine, prompt: list[int], new_tokens: int, sample: bool = False, start: bool = True):
    """Submit one request of exactly `new_tokens` tokens (no stop token), greedy or (`sample`)
    sampled as the apps sample, from its own seeded generator. Returns (thread, times): the thread
    reads the stream and records [submitted, token times...]; `start=False` leaves it to the caller
    to start (so that several requests can be submitted before any reader runs)."""
    from .serving.request import Request

    if sample:
        from .glm.advisor import V2Params

        sampling = V2Params().sampling  # BianQue-2's sampling settings in the apps
        generator = torch.Generator().manual_seed(len(prompt))

        def choose(row: torch.Tensor, generated: list[int]) -> int:
            return int(next_token(row[None], sampling, generator)[0])
    else:
        def choose(row: torch.Tensor, generated: list[int]) -> int:
            return int(row.argmax())
    request = Request(list(prompt), choose, lambda token: False, new_tokens)
    times = [time.perf_counter()]
    stream = engine.submit(request)

    def consume() -> None:
        for _ in stream:
            times.append(time.perf_counter())
    thread = threading.Thread(target=consume)
    if start:
        thread.start()
    return thread, times


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def serve_level(engine, prompt: list[int], level: int, cfg: ServeConfig) -> dict:
    """One concurrency level, `cfg.repeats` rounds of three runs each:
    - serial: the `level` replies one after the other;
    - at once: the same `level` replies submitted together (the speedup is serial / at once);
    - joining: `level - 1` replies decoding when one more arrives (its time to first token).
    The serial and at-once runs of a round follow each other, so each round's speedup compares
    runs taken under the same machine speed (a shared VM drifts over minutes); the report gives
    every round's speedup and the medians."""
    serial_s, concurrent_s, speedups, streams, joins = [], [], [], [], []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        for _ in range(level):
            thread, _ = _timed(engine, prompt, cfg.new_tokens, cfg.sample)
            thread.join()
        serial_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        runs = [_timed(engine, prompt, cfg.new_tokens, cfg.sample, start=False) for _ in range(level)]
        for thread, _ in runs:
            thread.start()
        for thread, _ in runs:
            thread.join()
        concurrent_s.append(time.perf_counter() - start)
        speedups.append(serial_s[-1] / concurrent_s[-1])
        streams += [(cfg.new_tokens - 1) / (times[-1] - times[1]) for _, times in runs if times[-1] > times[1]]
        joins.append(_join_ttft(engine, prompt, level, cfg))
    serial, concurrent = statistics.median(serial_s), statistics.median(concurrent_s)
    return {
        "concurrency": level, "serial_s": serial, "concurrent_s": concurrent, "speedup": statistics.median(speedups),
        "speedups": speedups, "aggregate_decode_tokens_per_s": level * cfg.new_tokens / concurrent,
        "per_stream_decode_tokens_per_s": sum(streams) / len(streams) if streams else None,
        "ttft_join_p50_s": _percentile(joins, 0.5), "ttft_join_p95_s": _percentile(joins, 0.95),
    }


def _join_ttft(engine, prompt: list[int], level: int, cfg: ServeConfig) -> float:
    """Seconds to the first token of a request that arrives while `level - 1` others decode."""
    runs = [_timed(engine, prompt, cfg.new_tokens, cfg.sample) for _ in range(level - 1)]
    while any(len(times) < 2 and thread.is_alive() for thread, times in runs):  # the batch is decoding
        time.sleep(0.001)
    runs.append(_timed(engine, prompt, cfg.new_tokens, cfg.sample))
    for thread, _ in runs:
        thread.join()
    times = runs[-1][1]
    return times[1] - times[0]


def run_serve(cfg: ServeConfig) -> dict:
    results = {"preset": cfg.preset, "device": cfg.device, "prompt_tokens": cfg.prompt_tokens,
               "new_tokens": cfg.new_tokens, "repeats": cfg.repeats, "sampling": cfg.sample, "models": {}}
    for kind in cfg.models:
        from .serving.engine import Engine

        runner, prompt = _serve_runner(kind, cfg, max(cfg.concurrency))
        compile_s = runner.warm_up() if kind == "glm" and cfg.compile else None  # every bucket, before timing
        engine = Engine(runner)
        if cfg.device == "cpu":
            release_team()  # as the loaders do: the engine thread computes, this thread's OpenMP team goes
        _timed(engine, prompt, 2)[0].join()  # warm-up
        levels = [serve_level(engine, prompt, level, cfg) for level in cfg.concurrency]
        param = next(runner.model.parameters())
        results["models"][kind] = {"dtype": dtype_name(param.dtype), "levels": levels,
                                   "packed": any(isinstance(m, PackedLinear) for m in runner.model.modules()),
                                   "weight_first": any(isinstance(m, WeightFirstLinear) for m in runner.model.modules()), "compile_s": compile_s,
                                   "compiled": getattr(runner, "compiled", None) is not None if compile_s is not None else None,
                                   "peak_memory_gb": peak_memory_gb(torch.device(cfg.device))}
        engine.shutdown()  # its thread (and OpenMP team) goes before the next model is built and probed
        del engine, runner
        gc.collect()
    return results


def serve_report(result: dict) -> str:
    lines = [f"batching engine, {result['preset']} shapes on {result['device']}, prompt {result['prompt_tokens']} "
             f"+ {result['new_tokens']} new tokens, {'sampled' if result.get('sampling') else 'greedy'}, medians of {result['repeats']} rounds"]
    for kind, r in result["models"].items():
        compiled = "" if r.get("compile_s") is None else (
            f", compiled decode step ({r['compile_s']:.1f} s to build)" if r["compiled"] else ", compile failed: eager")
        layout = "".join(f", {name}" for key, name in (("packed", "packed weights"), ("weight_first", "weight-first linears"))
                         if r.get(key))
        lines.append(f"{kind} ({r['dtype']}{layout}), peak memory {r['peak_memory_gb']:.2f} GB{compiled}")
        lines.append("  concurrency  serial s  at once s  speedup  aggregate tok/s  per-stream tok/s  join TTFT p50/p95 s")
        for x in r["levels"]:
            per = x["per_stream_decode_tokens_per_s"]
            lines.append(f"  {x['concurrency']:>11}  {x['serial_s']:>8.2f}  {x['concurrent_s']:>9.2f}  {x['speedup']:>7.2f}"
                         f"  {x['aggregate_decode_tokens_per_s']:>15.1f}  {per if per is None else round(per, 1):>16}"
                         f"  {x['ttft_join_p50_s']:.3f}/{x['ttft_join_p95_s']:.3f}")
    return "\n".join(lines)


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="the batching engine: serial vs concurrent replies on random weights")
    serve.add_argument("--model", default="glm,t5", help="glm, t5 or both (default glm,t5)")
    serve.add_argument("--concurrency", default="1,2,4,8", help="levels, e.g. 1,2,4,8")
    serve.add_argument("--preset", choices=("mid", "tiny"), default="mid")
    serve.add_argument("--dtype", choices=sorted(DTYPES), type=str.lower, default=None,
                       help="default: each model's default for the device (GLM bf16 / T5 fp32 on CPU)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--prompt-tokens", type=int, default=64)
    serve.add_argument("--new-tokens", type=int, default=32)
    serve.add_argument("--repeats", type=int, default=3,
                       help="rounds per level (serial, at once, joining); the report gives medians (default 3)")
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    serve.add_argument("--compile", action="store_true",
                       help="GLM: compile the engine's batched decode step (one graph per batch bucket, built "
                            "before timing; compile_s in the JSON), as --v2-compile does; T5 ignores it")
    serve.add_argument("--no-pack", action="store_true",
                       help="plain F.linear even where the loaders would use packed bf16/fp32 weights or weight-first "
                            "fp32 linears (to measure what those layouts give)")
    serve.add_argument("--sample", action="store_true",
                       help="requests sample as the apps do (temperature 0.95, top-p 0.7, top-k 50, each from its "
                            "own seeded generator) instead of greedy argmax: sampling costs per row")
    serve.add_argument("--json", action="store_true", help="print one JSON object")


def serve_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServeConfig:
    try:
        levels = tuple(int(x) for x in args.concurrency.split(","))
    except ValueError:
        parser.error(f"--concurrency must be integers separated by commas, got {args.concurrency!r}")
    models = tuple(m.strip() for m in args.model.split(","))
    if not set(models) <= {"glm", "t5"} or not models:
        parser.error(f"--model must be glm, t5 or glm,t5, got {args.model!r}")
    if min(levels) < 1 or args.prompt_tokens < 2 or args.new_tokens < 2 or args.repeats < 1:
        parser.error("--concurrency levels and --repeats must be at least 1, --prompt-tokens and --new-tokens at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    return ServeConfig(models=models, concurrency=levels, preset=args.preset, dtype=args.dtype, device=args.device,
                       compile=args.compile, pack=not args.no_pack, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                       sample=args.sample)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m bianque.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    glm = sub.add_parser("glm", help="native ChatGLM-6B (BianQue-2) on random weights")
    glm.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    glm.add_argument("--dtype", choices=sorted(DTYPES), type=str.lower, default="float32")
    glm.add_argument("--device", default="cpu")
    glm.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (mid) / 64 (6b)")
    glm.add_argument("--new-tokens", type=int, default=None, help="default 32 (mid) / 12 (6b)")
    glm.add_argument("--repeats", type=int, default=None, help="default 3 (mid) / 1 (6b)")
    glm.add_argument("--matvec-mb", type=int, default=None, help="bandwidth probe matrix size (default 512 / 256 for 6b)")
    glm.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    glm.add_argument("--no-pack", action="store_true",
                     help="plain F.linear even where packed bf16/fp32 weights or weight-first fp32 linears would be used")
    glm.add_argument("--quantize", type=int, choices=(4, 8), help="weight-only int8/int4 block linears")
    glm.add_argument("--checkpoint", help="load this checkpoint directory instead of random weights (reports load time)")
    glm.add_argument("--consultation", type=int, default=0, metavar="TURNS",
                     help="then run a consultation of this many turns and report its memory (e.g. 30)")
    glm.add_argument("--max-length", type=int, default=512, help="the consultation's max_length (default 512)")
    glm.add_argument("--tokenizer", help="directory with ice_text.model + tokenizer_config.json (default: --checkpoint)")
    glm.add_argument("--compile", action="store_true",
                     help="static KV cache + torch.compile'd decode step (CUDA graphs on CUDA); compile time reported apart")
    glm.add_argument("--bandwidth-gbps", type=float, default=None,
                     help="memory-bandwidth limit to compare decoding with (default: from the GPU's properties)")
    glm.add_argument("--save-checkpoint", metavar="DIR",
                     help="instead: write random fp16 weights of the preset's shape in BianQue-2's hub layout "
                          "(3 .bin shards) to DIR, to measure --checkpoint loads and convert offline")
    glm.add_argument("--json", action="store_true", help="print one JSON object")
    add_api_parser(sub)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    if args.what == "api":
        return api_config(parser, args), args.json
    if args.what == "serve":
        return serve_config(parser, args), args.json
    big = args.preset == "6b"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.consultation and not (args.tokenizer or args.checkpoint):
        parser.error("--consultation needs --tokenizer DIR (or --checkpoint DIR)")
    cfg = BenchConfig(preset=args.preset, dtype=args.dtype, device=args.device, pack=not args.no_pack,
                      quantize=args.quantize, checkpoint=args.checkpoint, consultation=args.consultation,
                      max_length=args.max_length, tokenizer=args.tokenizer, compile=args.compile,
                      bandwidth_gbps=args.bandwidth_gbps, save_checkpoint=args.save_checkpoint)
    cfg = replace(cfg, prompt_tokens=args.prompt_tokens or (64 if big else 128),
                  new_tokens=args.new_tokens or (12 if big else 32), repeats=args.repeats or (1 if big else 3),
                  matvec_mb=args.matvec_mb or (256 if big else 512))
    if cfg.prompt_tokens < 2 or cfg.new_tokens < 2:
        parser.error("--prompt-tokens and --new-tokens must be at least 2")
    return cfg, args.json


def main(argv: list[str] | None = None) -> int:
    cfg, as_json = parse_args(argv)
    if isinstance(cfg, ServeConfig):
        result = run_serve(cfg)
        print(json.dumps(result) if as_json else serve_report(result))
        return 0
    if not isinstance(cfg, BenchConfig):  # `api`: a load test of a running server
        from .serving import loadtest

        result = loadtest.run_load(cfg)
        print(json.dumps(result) if as_json else loadtest.report(result))
        return 1 if result["errors"] else 0
    if cfg.save_checkpoint:
        start = time.perf_counter()
        where = save_random_checkpoint(PRESETS[cfg.preset], cfg.save_checkpoint)
        print(f"random {cfg.preset} checkpoint (fp16, hub layout) written to {where} in {time.perf_counter() - start:.0f} s")
        return 0
    result = run_glm(cfg)
    print(json.dumps(result) if as_json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

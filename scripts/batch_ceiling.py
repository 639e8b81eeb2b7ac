"""What batching can gain on this machine, without the engine: the native GLM's own `generate`
on a batch of 1, 2, 4, 8 copies of one prompt (no padding needed), mid shape, random weights.
The decode step is timed as (time for 34 new tokens - time for 2) / 32, best of two, so prefill
drops out. Compare its aggregate tokens/s with `python -m bianque.bench serve`'s.

    python scripts/batch_ceiling.py --dtype bfloat16      # or float32
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bianque import bench  # noqa: E402
from bianque.glm.cpu_pack import packing_pays  # noqa: E402
from bianque.settings import DTYPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, cpu = DTYPES[args.dtype], torch.device("cpu")
    config = bench.PRESETS["mid"]
    model = bench.random_model(config, dtype, cpu, pack=packing_pays(cpu, dtype, config.hidden_size))
    ids = bench.prompt_ids(config, args.prompt_tokens, cpu)

    def run(batch: int, new: int) -> float:
        start = time.perf_counter()
        model.generate(ids.repeat(batch, 1), max_new_tokens=new, do_sample=False)
        return time.perf_counter() - start

    run(1, 2)  # warm-up
    import platform

    cpu_name = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu_name)
    print(f"{cpu_name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}")
    for batch in (1, 2, 4, 8):
        step = (min(run(batch, 34) for _ in range(2)) - min(run(batch, 2) for _ in range(2))) / 32
        print(f"batch {batch}: decode step {step * 1000:.0f} ms, aggregate {batch / step:.1f} tokens/s, "
              f"per stream {1 / step:.1f}")


if __name__ == "__main__":
    main()

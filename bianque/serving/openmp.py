"""OpenMP teams on CPU: the engine thread computes, other threads stay out of its way.

torch's CPU kernels run their parallel regions on OpenMP (libgomp in the Linux wheels). Every
thread that starts a parallel region gets a team of its own (threads - 1 workers), and once the
threads of all teams outnumber the CPUs, libgomp stops letting idle workers spin between regions:
each of the few hundred small regions of a decode step then waits for a sleeping worker to wake.
Measured on a 2-CPU AMD EPYC VM (AVX-512 BF16, torch 2.13.0+cpu, 2 threads), one GLM mid-shape
decode step of 8 rows (bf16): 13-14 ms in a thread whose team is the only one, 19-20 ms in the
engine thread while the thread that loaded the model still had its team, and about 16.5 ms in the
engine once that thread gave its team back.

So the loaders give the loading thread's team back once the model is built (`release_team`), an
engine gives its own back whenever it goes idle (the CoQ app runs two engines), and threads that
only pick tokens run their torch ops on one thread (`single_threaded`). All do nothing where torch
does not run on an OpenMP runtime found next to it.
"""
from __future__ import annotations

import ctypes
import glob
import os
from functools import lru_cache

import torch

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the calling thread's OpenMP resources, keep the settings


@lru_cache(maxsize=1)
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch links (its bundled libgomp / libomp / libiomp), or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    here = os.path.join(os.path.dirname(torch.__file__), "lib")
    libs = sorted(path for name in ("libgomp*.so*", "libomp*.so*", "libiomp*.so*") for path in glob.glob(os.path.join(here, name)))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def release_team() -> bool:
    """Free the calling thread's OpenMP team (it is made again if this thread runs a parallel
    region later). True if a runtime took the request."""
    lib = _runtime()
    if lib is None:
        return False
    return lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0


def single_threaded() -> bool:
    """Run this thread's later torch ops on this thread alone (no team of its own); other threads
    keep torch's thread count. True if that took effect."""
    lib = _runtime()
    if lib is None:
        return False
    torch.zeros(1).add_(1)  # torch sets each thread's OpenMP thread count on its first op: after that
    lib.omp_set_num_threads(1)
    return torch.get_num_threads() == 1

"""The OpenMP team hand-over (bianque/serving/openmp.py): sampling threads run single-threaded,
the loaders give the loading thread's team back when an engine takes over on CPU."""
from __future__ import annotations

import threading

import pytest
import torch

from bianque.serving import openmp

needs_runtime = pytest.mark.skipif(openmp._runtime() is None, reason="torch runs on no OpenMP runtime found next to it")


@needs_runtime
def test_single_threaded_applies_to_the_calling_thread_only():
    before = torch.get_num_threads()
    seen = []

    def helper():
        seen.append(openmp.single_threaded())
        seen.append(torch.get_num_threads())
        seen.append(int(torch.arange(100_000).sum()))  # still computes
    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    assert seen == [True, 1, sum(range(100_000))]
    assert torch.get_num_threads() == before


@needs_runtime
def test_release_team_keeps_the_thread_working():
    x = torch.randn(256, 256)
    expected = x @ x
    assert openmp.release_team() is True
    assert torch.equal(x @ x, expected)  # the team comes back when needed
    assert torch.get_num_threads() >= 1


def test_without_a_runtime_both_do_nothing(monkeypatch):
    monkeypatch.setattr(openmp, "_runtime", lambda: None)
    assert openmp.release_team() is False and openmp.single_threaded() is False


def test_the_loaders_give_the_loading_threads_team_back_when_an_engine_takes_over(monkeypatch, tmp_path):
    import bianque.glm.advisor as advisor
    import bianque.t5 as t5
    from tests.tiny_glm import build_tiny_glm
    from tests.tiny_t5 import build_tiny_t5

    calls = []
    for module in (t5, advisor):
        monkeypatch.setattr(module, "release_team", lambda: calls.append(threading.current_thread().name) or True)
    v1, v2 = str(build_tiny_t5(tmp_path / "v1")), str(build_tiny_glm(tmp_path / "v2"))
    t5.load_questioner(v1)  # no engine: replies run in their callers' threads, nothing to hand over
    advisor.load_advisor(v2, dtype="float32")
    assert calls == []
    t5.load_questioner(v1, max_batch=2)
    advisor.load_advisor(v2, dtype="float32", max_batch=2)
    assert calls == [threading.current_thread().name] * 2

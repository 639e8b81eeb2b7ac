"""`python -m bianque.bench serve` on tiny shapes: it runs both models and reports every field."""
import json

import pytest

from bianque import bench


def test_serve_bench_reports_every_level_and_field(capsys):
    assert bench.main(["serve", "--preset", "tiny", "--concurrency", "1,3", "--prompt-tokens", "6",
                       "--new-tokens", "3", "--repeats", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["preset"], result["prompt_tokens"], result["new_tokens"]) == ("tiny", 6, 3)
    assert set(result["models"]) == {"glm", "t5"}
    assert result["models"]["glm"]["dtype"] == "bfloat16" and result["models"]["t5"]["dtype"] == "float32"
    for model in result["models"].values():
        assert model["peak_memory_gb"] > 0
        assert [x["concurrency"] for x in model["levels"]] == [1, 3]
        for x in model["levels"]:
            assert x["serial_s"] > 0 and x["concurrent_s"] > 0
            assert len(x["speedups"]) == 2 and x["speedup"] == pytest.approx(sum(x["speedups"]) / 2)  # median of two
            assert x["aggregate_decode_tokens_per_s"] == pytest.approx(x["concurrency"] * 3 / x["concurrent_s"])
            assert x["per_stream_decode_tokens_per_s"] > 0
            assert 0 < x["ttft_join_p50_s"] <= x["ttft_join_p95_s"] < x["concurrent_s"]


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "1,x"], "--concurrency must be integers"),
    (["--model", "gpt"], "--model must be glm, t5 or glm,t5"),
    (["--concurrency", "0"], "at least 1"),
])
def test_serve_bench_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(["serve", *argv])
    assert message in capsys.readouterr().err


def test_serve_bench_compile_builds_the_engine_steps_before_timing(capsys):
    assert bench.main(["serve", "--model", "glm", "--preset", "tiny", "--dtype", "float32", "--compile",
                       "--concurrency", "1,2", "--prompt-tokens", "6", "--new-tokens", "3", "--repeats", "1",
                       "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["models"]["glm"]
    assert result["compiled"] is True and result["compile_s"] > 0
    assert [x["concurrency"] for x in result["levels"]] == [1, 2] and all(x["speedup"] > 0 for x in result["levels"])
    assert bench.main(["serve", "--model", "glm", "--preset", "tiny", "--dtype", "float32", "--concurrency", "1",
                       "--prompt-tokens", "6", "--new-tokens", "3", "--repeats", "1", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["models"]["glm"]
    assert plain["compiled"] is None and plain["compile_s"] is None


def test_serve_bench_says_which_layouts_ran_and_no_pack_turns_them_off(capsys, monkeypatch):
    """float32 on CPU: weight-first linears where the probe finds them faster (made to here), and
    --no-pack measures plain F.linear for comparison."""
    from bianque import cpu_linear

    monkeypatch.setattr(cpu_linear, "weight_first_pays", lambda weight, **kw: True)
    argv = ["serve", "--model", "glm,t5", "--preset", "tiny", "--dtype", "float32", "--concurrency", "2",
            "--prompt-tokens", "6", "--new-tokens", "3", "--repeats", "1", "--json"]
    assert bench.main(argv) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert all(m["weight_first"] is True and m["packed"] is False for m in models.values())
    assert bench.main([*argv, "--no-pack"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert all(m["weight_first"] is False and m["packed"] is False for m in models.values())
    assert bench.main(argv[:-1]) == 0  # the table says it too
    assert capsys.readouterr().out.count("weight-first linears") == 2

"""Settings from flags and BIANQUE_* variables; checkpoint resolution errors."""
import pytest
import torch

from bianque.errors import ModelLoadError
from bianque.hub import looks_like_repo_id, resolve_checkpoint
from bianque.settings import parse_settings, torch_dtype


def test_defaults():
    s = parse_settings([], {})
    assert s.v1.model == "scutcyr/BianQue-1.0" and s.v2.model == "scutcyr/BianQue-2"
    assert s.v1.device == s.v2.device in ("cpu", "cuda")
    assert s.max_questions == 8 and s.seed is None and s.v2.quantize is None
    assert not s.v2.compile and not s.v1.compile


def test_flags_beat_env_and_models_can_sit_apart(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # precedence, not this machine's GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    env = {"BIANQUE_V1_MODEL": "/m/v1", "BIANQUE_DEVICE": "cuda:0", "BIANQUE_V2_DEVICE": "cuda:3",
           "BIANQUE_QUANTIZE": "4", "BIANQUE_MAX_QUESTIONS": "5"}
    s = parse_settings(["--v2-model", "/m/v2", "--v1-device", "cpu", "--dtype", "float16"], env)
    assert (s.v1.model, s.v1.device, s.v1.dtype) == ("/m/v1", "cpu", "float16")
    assert (s.v2.model, s.v2.device, s.v2.quantize) == ("/m/v2", "cuda:3", 4)
    assert s.max_questions == 5


@pytest.mark.parametrize("argv, env, expected", [
    (["--v2-compile"], {}, True), ([], {"BIANQUE_V2_COMPILE": "1"}, True), ([], {"BIANQUE_V2_COMPILE": "true"}, True),
    ([], {"BIANQUE_V2_COMPILE": "0"}, False), ([], {"BIANQUE_V2_COMPILE": ""}, False),
    (["--v2-compile"], {"BIANQUE_V2_COMPILE": "0"}, True),  # the flag beats the variable
])
def test_v2_compile_flag_and_env(argv, env, expected):
    s = parse_settings(argv, env)
    assert s.v2.compile is expected and s.v1.compile is False


@pytest.mark.parametrize("argv", [["--dtype", "int3"], ["--bogus"], ["--seed", "x"], ["--v2-compile=yes"]])
def test_bad_settings(argv):
    with pytest.raises((ValueError, SystemExit)):
        parse_settings(argv, {})


def test_bad_compile_variable_is_named():
    with pytest.raises(ValueError, match="BIANQUE_V2_COMPILE must be 1 or 0"):
        parse_settings([], {"BIANQUE_V2_COMPILE": "maybe"})


@pytest.mark.parametrize(
    "name, device, version, expected",
    [
        (None, "cpu", "v1", torch.float32), (None, "cuda:1", "v1", torch.float16),
        (None, "cpu", "v2", torch.bfloat16), (None, "cuda", "v2", torch.float16),
        ("bf16", "cpu", "v1", torch.bfloat16), ("float32", "cuda", "v2", torch.float32),
    ],
)
def test_dtype_defaults(name, device, version, expected):
    assert torch_dtype(name, device, version) == expected


def test_missing_directory_message():
    with pytest.raises(ModelLoadError, match=r"could not load ./nowhere/v2: no such directory.*BIANQUE_V2_MODEL.*python -m bianque download"):
        resolve_checkpoint("./nowhere/v2", "BIANQUE_V2_MODEL")


def test_hub_id_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="could not load someone/Missing-Model:.*BIANQUE_V1_MODEL"):
        resolve_checkpoint("someone/Missing-Model", "BIANQUE_V1_MODEL")


def test_repo_id_shapes(tmp_path):
    assert looks_like_repo_id("scutcyr/BianQue-2")
    assert not looks_like_repo_id("./models/x") and not looks_like_repo_id("/abs/x")
    assert resolve_checkpoint(str(tmp_path), "X") == tmp_path


@pytest.mark.parametrize("argv, env, expected", [
    ([], {"BIANQUE_V1_DTYPE": "bf61"}, "BIANQUE_V1_DTYPE='bf61' is not a dtype: use float32, float16 or bfloat16"),
    ([], {"BIANQUE_V2_DTYPE": "float8"}, "BIANQUE_V2_DTYPE='float8' is not a dtype: use float32, float16 or bfloat16"),
    (["--v2-dtype", "half2"], {}, "--v2-dtype='half2' is not a dtype: use float32, float16 or bfloat16"),
    (["--dtype", "int3"], {"BIANQUE_DTYPE": "float16"}, "--dtype='int3' is not a dtype: use float32, float16 or bfloat16"),
    ([], {"BIANQUE_DEVICE": "gpu"},
     "BIANQUE_DEVICE='gpu' is not a device: use cpu, cuda, cuda:1, a list cuda:0,cuda:1 or auto"),
    ([], {"BIANQUE_SEED": "x"}, "BIANQUE_SEED must be an integer, got 'x'"),
    ([], {"BIANQUE_MAX_QUESTIONS": "many"}, "BIANQUE_MAX_QUESTIONS must be an integer, got 'many'"),
    ([], {"BIANQUE_QUANTIZE": "3"}, "BIANQUE_QUANTIZE must be 4 or 8, got 3; set it to 4, 8 or unset it"),
    ([], {"BIANQUE_MAX_BATCH": "lots"}, "BIANQUE_MAX_BATCH must be an integer, got 'lots'"),
    ([], {"BIANQUE_V2_MAX_BATCH": "-1"}, "BIANQUE_V2_MAX_BATCH must be between 0 (one reply at a time) and 256, got -1"),
    (["--v1-max-batch", "1000"], {}, "--v1-max-batch must be between 0 (one reply at a time) and 256, got 1000"),
    (["--max-batch", "x"], {"BIANQUE_MAX_BATCH": "4"}, "--max-batch must be an integer, got 'x'"),
])
def test_bad_setting_names_the_flag_or_variable_it_came_from(argv, env, expected):
    with pytest.raises(ValueError) as err:
        parse_settings(argv, env)
    assert str(err.value) == expected


def test_cuda_on_a_cpu_machine_names_the_variable_not_a_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        parse_settings([], {"BIANQUE_DEVICE": "cuda"})
    assert str(err.value) == (f"BIANQUE_DEVICE='cuda' asks for CUDA, but this machine has no usable CUDA "
                              f"(torch {torch.__version__}); set BIANQUE_DEVICE to cpu or unset it")
    with pytest.raises(ValueError, match=r"^--v2-device='cuda:1' asks for CUDA.*set --v2-device to cpu"):
        parse_settings(["--v2-device", "cuda:1"], {})


def test_missing_gpu_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^BIANQUE_V2_DEVICE='cuda:0,cuda:1': this machine has 1 CUDA device\(s\); set BIANQUE_V2_DEVICE to cuda:0 \.\.\. cuda:0$"):
        parse_settings([], {"BIANQUE_V2_DEVICE": "cuda:0,cuda:1"})


def test_env_help_lists_every_variable_the_settings_read():
    from bianque.settings import env_help

    text = env_help()
    for name in ("BIANQUE_V1_MODEL", "BIANQUE_V2_MODEL", "BIANQUE_DEVICE", "BIANQUE_V1_DEVICE", "BIANQUE_V2_DEVICE",
                 "BIANQUE_DTYPE", "BIANQUE_V1_DTYPE", "BIANQUE_V2_DTYPE", "BIANQUE_QUANTIZE", "BIANQUE_V2_COMPILE",
                 "BIANQUE_SEED", "BIANQUE_MAX_QUESTIONS", "BIANQUE_MAX_BATCH", "BIANQUE_V1_MAX_BATCH",
                 "BIANQUE_V2_MAX_BATCH"):
        assert f"  {name} " in text
    assert text.startswith("environment variables (a flag wins over its variable):\n")


def test_max_batch_defaults_per_device_and_precedence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # defaults per device, not this machine's GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    s = parse_settings(["--v1-device", "cpu", "--v2-device", "cuda:0,cuda:1"], {})
    assert (s.v1.max_batch, s.v2.max_batch) == (4, 8)
    assert parse_settings(["--device", "auto"], {}).v2.max_batch == 8
    s = parse_settings(["--device", "cpu"], {"BIANQUE_MAX_BATCH": "2", "BIANQUE_V2_MAX_BATCH": "0"})
    assert (s.v1.max_batch, s.v2.max_batch) == (2, 0)
    s = parse_settings(["--device", "cpu", "--max-batch", "6", "--v1-max-batch", "3"], {"BIANQUE_V1_MAX_BATCH": "1"})
    assert (s.v1.max_batch, s.v2.max_batch) == (3, 6)  # per-model flag, then the shared flag, then variables


def test_a_caller_default_for_max_batch_yields_to_flags_and_variables():
    import argparse

    from bianque.settings import add_settings_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert settings_from_args(parser.parse_args(["--device", "cpu"]), {}, max_batch=1).v2.max_batch == 1
    ns = parser.parse_args(["--device", "cpu"])
    assert settings_from_args(ns, {"BIANQUE_MAX_BATCH": "3"}, max_batch=1).v1.max_batch == 3

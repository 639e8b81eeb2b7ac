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


def test_flags_beat_env_and_models_can_sit_apart():
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

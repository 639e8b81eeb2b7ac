"""Where a checkpoint name leads, and what the user is told when it leads nowhere."""
import pytest

from bianque import hub
from bianque.errors import ModelLoadError


@pytest.fixture
def no_hub(monkeypatch):
    calls = []

    def snapshot(repo_id, local_files_only, local_dir=None):
        calls.append((repo_id, local_files_only))
        raise OSError("offline")

    monkeypatch.setattr(hub, "_snapshot", snapshot)
    return calls


def test_existing_directory_is_used_as_is(tmp_path, no_hub):
    assert hub.resolve_checkpoint(str(tmp_path), "--model") == tmp_path
    assert no_hub == []


def test_mistyped_local_path_says_no_such_directory_and_never_asks_the_hub(tmp_path, monkeypatch, no_hub, caplog):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"), pytest.raises(ModelLoadError) as err:
        hub.resolve_checkpoint("models/BianQue-2", "--v2-model or BIANQUE_V2_MODEL")
    assert str(err.value) == (
        f"could not load models/BianQue-2: no such directory {tmp_path}/models/BianQue-2; "
        "set --v2-model or BIANQUE_V2_MODEL to a checkpoint directory or a hub id "
        "(`python -m bianque download` fetches the default ones)")
    assert no_hub == [] and "downloading" not in caplog.text


def test_relative_path_with_dot_is_local(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no such directory .*/ckpt; set --model to"):
        hub.resolve_checkpoint("./ckpt", "--model")
    assert no_hub == []


def test_a_file_is_not_a_checkpoint_directory(tmp_path, no_hub):
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"is a file, not a checkpoint directory; set the SRC argument to"):
        hub.resolve_checkpoint(str(f), "the SRC argument")


def test_hub_id_tries_cache_then_hub_and_names_the_knob(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        hub.resolve_checkpoint("someone/BianQue-9", "--model")
    assert no_hub == [("someone/BianQue-9", True), ("someone/BianQue-9", False)]
    assert "not in the local cache, and the hub failed (OSError: offline); set --model to" in str(err.value)

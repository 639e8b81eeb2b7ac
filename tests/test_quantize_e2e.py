"""`--quantize 4` (and 8) as a user runs it on CPU: the CLI and the BianQue-2 app load the tiny
checkpoint with int4/int8 block linears and answer with them."""
from __future__ import annotations

import json

import pytest

from bianque.glm.quant import QuantLinear
from bianque.prompt import PATIENT, Turn
from tests.test_apps import V2_APP, backend, bubbles, consultation, quick, send, start, v2_dir  # noqa: F401 (fixtures)
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory):
    from tests.tiny_glm import build_tiny_glm

    return build_tiny_glm(tmp_path_factory.mktemp("v2q"))


@pytest.mark.parametrize("bits", [4, 8])
def test_cli_chats_with_a_quantized_advisor(tiny_v2, bits):
    proc = run_cli(["chat", "--mode", "v2", "--v2-model", str(tiny_v2), "--quantize", str(bits), "--json",
                    "--seed", "0", "--greedy", "--max-length", "48"], "最近总是失眠\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reply = json.loads(proc.stdout)
    from bianque.glm import V2Params, load_advisor
    from bianque.sampling import SamplingParams

    advisor = load_advisor(str(tiny_v2), device="cpu", quantize=bits)  # the same checkpoint, asked here
    params = V2Params(max_length=48, sampling=SamplingParams(False))
    expected = "".join(advisor.reply([Turn(PATIENT, "最近总是失眠")], params))
    assert reply == {"stage": "advice", "model": "v2", "text": expected, "red_flags": []}
    assert "失眠" not in proc.stderr  # patient text never reaches the logs


def test_v2_app_runs_int4_on_cpu(backend, v2_dir, monkeypatch):  # noqa: F811 (fixtures)
    at = start(V2_APP, monkeypatch, BIANQUE_V2_MODEL=v2_dir, BIANQUE_QUANTIZE="4")
    assert backend["v2"].load_kwargs["quantize"] == 4
    blocks = backend["v2"].doctor.model.transformer.layers
    linears = [m for block in blocks for m in block.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * len(blocks) and {m.bits for m in linears} == {4}
    quick(at, "v2")
    send(at, "最近总是失眠怎么办")
    (turns, _), = backend["v2"].calls
    assert turns == (Turn(PATIENT, "最近总是失眠怎么办"),)
    reply = consultation(at).messages[-1]
    assert reply.model == "v2" and bubbles(at)[-1][1] == ["BianQue-2.0"]
    assert any("int4" in c.value for c in at.sidebar.caption), [c.value for c in at.sidebar.caption]

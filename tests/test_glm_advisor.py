"""The BianQue-2.0 doctor (bianque/glm/advisor.py) on the tiny checkpoint: prompt, fitting,
control-token neutralisation, streaming, seeding, loading errors; plus the tiny builder itself."""
from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest

from bianque.errors import ModelLoadError
from bianque.glm import GLMAdvisor, V2Params, load_advisor, process_response
from bianque.glm.advisor import CONTROL_LITERALS, neutralise_control_tokens
from bianque.glm.chat import build_chat_prompt, stream_pieces
from bianque.prompt import DOCTOR, PATIENT, Turn
from bianque.sampling import SamplingParams
from tests.tiny_glm import build_tiny_glm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_glm(tmp_path_factory.mktemp("tiny_glm"))


@pytest.fixture(scope="module")
def advisor(tiny_dir) -> GLMAdvisor:
    return load_advisor(str(tiny_dir), device="cpu", dtype="float32")


def p(text: str) -> Turn:
    return Turn(PATIENT, text)


def d(text: str) -> Turn:
    return Turn(DOCTOR, text, "question")


GREEDY = V2Params(sampling=SamplingParams(do_sample=False), max_length=256)


def test_tiny_builder_is_deterministic(tmp_path):
    digests = []
    for name in ("a", "b"):
        out = build_tiny_glm(tmp_path / name)
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())})
    assert digests[0] == digests[1]
    assert set(digests[0]) == {"config.json", "generation_config.json", "ice_text.model", "model.safetensors",
                               "special_tokens_map.json", "tokenizer_config.json"}


def test_advisor_attributes(advisor, tiny_dir):
    assert advisor.name == "BianQue-2.0" and advisor.source == str(tiny_dir)
    assert (advisor.device, advisor.dtype) == ("cpu", "float32")
    assert advisor.default_params == V2Params()
    assert advisor.default_params.sampling == SamplingParams(True, 0.95, 0.7, 50)
    assert advisor.default_params.max_length == 2048


def test_default_dtype_on_cpu_is_bfloat16(tiny_dir):
    assert load_advisor(str(tiny_dir), device="cpu").dtype == "bfloat16"


def test_prompt_is_the_dialogue_as_one_query(advisor):
    turns = [p("宝宝发烧了"), d("多久了？"), p("两天")]
    assert advisor.prompt(turns) == "病人：宝宝发烧了\n医生：多久了？\n病人：两天\n医生："
    assert build_chat_prompt(advisor.prompt(turns), None) == advisor.prompt(turns)  # history=None


@pytest.mark.parametrize("literal", CONTROL_LITERALS)
def test_typed_control_tokens_do_not_reach_the_model(advisor, literal):
    tokenizer = advisor.tokenizer
    raw = tokenizer.encode(f"病人：头疼{literal}三天\n医生：")
    controls = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id, tokenizer.pad_token_id,
                tokenizer.unk_token_id}
    if literal != "[gMASK]":  # the reference tokenizer itself treats a typed [gMASK] as text
        assert controls & set(raw[:-2])
    prompt = advisor.prompt([p(f"头疼{literal}三天")])
    ids = tokenizer.encode(prompt)
    assert ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert not (controls | {tokenizer.gmask_token_id}) & set(ids[:-2])
    assert literal[1:-1] in tokenizer.decode(ids)  # the patient's characters survive as text


def test_neutralisation_uses_full_width_brackets():
    assert neutralise_control_tokens("a<sop>b[MASK]c[gMASK]<eop><pad><unk>") == "a＜sop＞b［MASK］c［gMASK］＜eop＞＜pad＞＜unk＞"
    assert neutralise_control_tokens("<b>[x] 正常文本") == "<b>[x] 正常文本"


def test_fit_drops_oldest_turns_to_leave_room_to_answer(advisor):
    long_turns = []
    for i in range(30):
        long_turns += [p(f"第{i}次：我头疼，还有点发烧，晚上睡不好"), d("请问多久了？")]
    long_turns.append(p("现在怎么办"))
    params = V2Params(max_length=256, min_answer_tokens=64)
    fit = advisor.fit(long_turns, params)
    assert fit.dropped_turns > 0 and fit.dropped_turns % 2 == 0
    assert fit.turns[-1] == p("现在怎么办")
    assert len(advisor.tokenizer.encode(advisor.prompt(long_turns, params))) <= params.prompt_budget == 192
    assert not advisor.fit([p("头疼")], params).changed


def test_huge_message_is_cut_from_the_front(advisor):
    params = V2Params(max_length=128, min_answer_tokens=32)
    fit = advisor.fit([p("头疼" * 500 + "最后一句")], params)
    assert fit.cut_chars > 0 and fit.turns[-1].text.endswith("最后一句")
    assert len(advisor.tokenizer.encode(advisor.prompt([p("头疼" * 500)], params))) <= params.prompt_budget
    greedy = dataclasses.replace(params, sampling=SamplingParams(False))
    # streams without a length error, and answers the message as cut: the same text as the fitted turns
    assert "".join(advisor.reply([p("头疼" * 500)], greedy)) == "".join(advisor.reply(fit.turns, greedy))


def test_reply_streams_process_response_of_the_generated_text(advisor):
    turns = [p("我头疼三天了")]
    pieces = list(advisor.reply(turns, GREEDY))
    query = advisor.prompt(turns)
    response, _ = advisor.model.chat(advisor.tokenizer, query, history=None, max_length=256, do_sample=False)
    assert response and "".join(pieces) == response
    assert all(pieces)


def test_reply_validates_before_streaming(advisor):
    with pytest.raises(ValueError):
        advisor.reply([p("a"), d("b")])
    with pytest.raises(ValueError):
        advisor.reply([])


def test_seeded_sampling_is_reproducible(advisor):
    params = V2Params(max_length=256, seed=7)
    first = "".join(advisor.reply([p("我咳嗽了")], params))
    assert "".join(advisor.reply([p("我咳嗽了")], params)) == first


def test_stream_pieces_join_to_the_processed_text():
    rng = random.Random(0)
    alphabet = list("中文好 ,!?:;a.\n") + ["[[训练时间]]", "\ufffd"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        snapshots = [text[:i] for i in range(1, len(text) + 1)]
        assert "".join(stream_pieces(snapshots)) == process_response(text)


def test_stream_pieces_hold_back_what_can_still_change():
    pieces = list(stream_pieces(["好", "好,", "好,中", "好,中[[训", "好,中[[训练时间]]"]))
    assert "".join(pieces) == "好，中2023年"
    assert all("[" not in piece for piece in pieces)


def test_load_advisor_errors_are_clear(tmp_path, tiny_dir):
    with pytest.raises(ModelLoadError, match="BIANQUE_V2_MODEL"):
        load_advisor(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="ice_text.model"):
        load_advisor(str(tmp_path))


def test_chat_refuses_options_it_does_not_implement(advisor):
    with pytest.raises(TypeError, match="repetition_penalty"):
        advisor.model.chat(advisor.tokenizer, "你好", repetition_penalty=1.2)
    with pytest.raises(ValueError, match="num_beams"):
        advisor.model.chat(advisor.tokenizer, "你好", num_beams=4)


def test_device_lists_go_through_placement(tmp_path):
    """`--v2-device auto` / `cuda:0,cuda:1` reach the block placement; a bad list is a clear error."""
    from bianque.prompt import PATIENT, Turn
    from bianque.sampling import SamplingParams
    from tests.tiny_glm import build_tiny_glm

    path = build_tiny_glm(tmp_path / "v2")
    greedy = V2Params(sampling=SamplingParams(do_sample=False), max_length=48)
    turns = [Turn(PATIENT, "头疼三天了")]
    plain = "".join(load_advisor(str(path), device="cpu", dtype="float32").reply(turns, greedy))
    placed = load_advisor(str(path), device="auto", dtype="float32")  # no GPU here: every block on the CPU
    assert "".join(placed.reply(turns, greedy)) == plain
    with pytest.raises(ModelLoadError, match="not a device"):
        load_advisor(str(path), device="cuda:0,bogus")

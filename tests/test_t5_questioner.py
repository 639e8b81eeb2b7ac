"""BianQue-1.0 questioner on a tiny random checkpoint, through the real loader and generator."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bianque.t5 as t5
from bianque.errors import ModelLoadError
from bianque.prompt import DOCTOR, PATIENT, Turn, unescape_v1
from bianque.sampling import SamplingParams
from bianque.t5 import EOS_ID, V1Params, decode_step, encode, generate_ids, load_questioner
from conftest import shared_dir
from tiny_t5 import build_tiny_t5

GREEDY = V1Params(sampling=SamplingParams(do_sample=False), max_new_tokens=40)
DIALOGUE = [Turn(PATIENT, "我头疼三天了"), Turn(DOCTOR, "多久了？", "question"), Turn(PATIENT, "一周了\n晚上头疼\t有点恶心")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def questioner(tiny_dir):
    return load_questioner(str(tiny_dir))


def test_defaults_are_the_original_generate_call():
    assert V1Params() == V1Params(SamplingParams(True, 0.7, 1.0, 50), 512, 3, 768, None)


def test_loads_through_the_real_path(questioner, tiny_dir):
    assert (questioner.name, questioner.source, questioner.device, questioner.dtype) == (
        "BianQue-1.0", str(tiny_dir), "cpu", "float32")
    # The checkpoint's separate lm_head survives loading (transformers 5.x would tie it otherwise).
    head = load_file(str(tiny_dir / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(questioner.model.lm_head.weight, head)
    assert not torch.equal(questioner.model.lm_head.weight, questioner.model.shared.weight)


def test_dtype_is_the_callers_choice(tiny_dir):
    q = load_questioner(str(tiny_dir), dtype="bfloat16")
    assert q.dtype == "bfloat16" and next(q.model.parameters()).dtype == torch.bfloat16
    assert "".join(q.reply(DIALOGUE, dataclasses.replace(GREEDY, max_new_tokens=5)))


def test_prompt_fed_to_the_model_is_the_escaped_built_prompt(questioner, monkeypatch):
    seen = []
    real_encode = t5.encode
    monkeypatch.setattr(t5, "encode", lambda model, ids: seen.append(ids[0].tolist()) or real_encode(model, ids))
    "".join(questioner.reply(DIALOGUE, GREEDY))
    expected = "病人：我头疼三天了\\n医生：多久了？\\n病人：一周了\\n晚上头疼\\t有点恶心\\n医生："
    assert seen == [questioner.tokenizer.encode(expected)]
    assert seen[0][-1] == EOS_ID and questioner.tokenizer.decode(seen[0]) == expected
    assert questioner.tokenizer.sp.piece_to_id("\\n") in seen[0] and questioner.tokenizer.sp.piece_to_id("\\t") in seen[0]


def test_budget_drops_oldest_turns_and_keeps_the_newest_patient_turn(questioner):
    turns = []
    for i in range(12):
        turns += [Turn(PATIENT, f"第{i}次：孩子咳嗽一周了有点发烧"), Turn(DOCTOR, "有没有发热？", "question")]
    turns.append(Turn(PATIENT, "晚上拉肚子不知道怎么办"))
    params = dataclasses.replace(GREEDY, max_input_tokens=60)
    fit = questioner.fit(turns, params)
    assert fit.dropped_turns > 0 and fit.turns[-1] == turns[-1] and fit.turns[0].role == PATIENT
    ids = questioner.prompt_ids(turns, params)
    assert len(ids) <= 60
    assert questioner.tokenizer.decode(ids).endswith("病人：晚上拉肚子不知道怎么办\\n医生：")


def test_budget_cuts_the_front_of_a_huge_message(questioner):
    huge = "头疼" * 2000 + "最近有点发烧"
    ids = questioner.prompt_ids([Turn(PATIENT, huge)])
    assert len(ids) <= 768 and ids[-1] == EOS_ID
    assert questioner.tokenizer.decode(ids).endswith("头疼最近有点发烧\\n医生：")
    assert questioner.fit([Turn(PATIENT, huge)]).cut_chars > 0


def test_stream_pieces_join_to_the_greedy_reply(questioner):
    pieces = list(questioner.reply(DIALOGUE, GREEDY))
    tokens = list(generate_ids(questioner.model, questioner.prompt_ids(DIALOGUE), GREEDY))
    assert len(tokens) == 40 and len(pieces) > 5
    assert "".join(pieces) == unescape_v1(questioner.tokenizer.decode(tokens))


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(questioner):
    assert list(questioner.reply(DIALOGUE, GREEDY)) == list(questioner.reply(DIALOGUE, GREEDY))
    sample = dataclasses.replace(GREEDY, sampling=SamplingParams(True, 0.7, 1.0, 50))
    a, b, c = ("".join(questioner.reply(DIALOGUE, dataclasses.replace(sample, seed=s))) for s in (1, 1, 2))
    assert a == b and a != c
    questioner.generator = torch.Generator().manual_seed(1)
    try:
        assert "".join(questioner.reply(DIALOGUE, sample)) == a
    finally:
        questioner.generator = None


def test_kv_cache_decode_equals_full_forward(questioner):
    model, ids = questioner.model, questioner.prompt_ids(DIALOGUE)
    tokens = list(generate_ids(model, ids, GREEDY))
    decoder_ids = [model.config.decoder_start_token_id] + tokens
    with torch.inference_mode():
        hidden, mask = encode(model, torch.tensor([ids]))
        cache, cached = None, []
        for token in decoder_ids:
            logits, cache = decode_step(model, hidden, mask, token, cache)
            cached.append(logits)
        full = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder_ids]), use_cache=False).logits[0]
    torch.testing.assert_close(torch.stack(cached), full, rtol=1e-4, atol=1e-5)


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


@pytest.mark.parametrize("seed", [0, 1])
def test_our_loop_equals_transformers_generate(questioner, seed):
    """Token for token: greedy with and without the n-gram ban, and seeded sampling with the original settings."""
    model, ids = questioner.model, questioner.prompt_ids(DIALOGUE)
    x = torch.tensor([ids])
    for n in (0, 3):
        ours = list(generate_ids(model, ids, dataclasses.replace(GREEDY, no_repeat_ngram_size=n)))
        theirs = model.generate(x, max_new_tokens=40, do_sample=False, num_beams=1, no_repeat_ngram_size=n or None)
        assert ours == _until_eos(theirs[0, 1:].tolist())
    original = V1Params(max_new_tokens=40)
    torch.manual_seed(seed)
    ours = list(generate_ids(model, ids, original))
    torch.manual_seed(seed)
    theirs = model.generate(x, max_new_tokens=40, do_sample=True, temperature=0.7, top_p=1.0, top_k=50,
                            no_repeat_ngram_size=3)
    assert ours == _until_eos(theirs[0, 1:].tolist())


def _has_repeated_ngram(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram_is_respected(questioner):
    ids = questioner.prompt_ids(DIALOGUE)
    long_greedy = dataclasses.replace(GREEDY, max_new_tokens=80)
    free = [0] + list(generate_ids(questioner.model, ids, dataclasses.replace(long_greedy, no_repeat_ngram_size=0)))
    assert _has_repeated_ngram(free, 3)  # the random model loops, so the ban has work to do
    for n in (2, 3):
        for params in (long_greedy, dataclasses.replace(long_greedy, sampling=SamplingParams(True, 2.0, 1.0, 0), seed=0)):
            out = [0] + list(generate_ids(questioner.model, ids, dataclasses.replace(params, no_repeat_ngram_size=n)))
            assert len(out) > 20 and not _has_repeated_ngram(out, n)


def test_stops_at_eos(questioner, monkeypatch):
    real_step = t5.decode_step
    steps = []

    def eos_on_fourth_step(model, hidden, mask, token, cache):
        logits, cache = real_step(model, hidden, mask, token, cache)
        steps.append(token)
        if len(steps) == 4:
            logits = torch.full_like(logits, -1e4)
            logits[EOS_ID] = 0
        return logits, cache

    monkeypatch.setattr(t5, "decode_step", eos_on_fourth_step)
    tokens = list(generate_ids(questioner.model, questioner.prompt_ids(DIALOGUE), GREEDY))
    assert len(tokens) == 3 and len(steps) == 4 and EOS_ID not in tokens


def test_non_finite_scores_give_a_clear_error(questioner, monkeypatch):
    real_step = t5.decode_step

    def overflow(model, hidden, mask, token, cache):
        logits, cache = real_step(model, hidden, mask, token, cache)
        return torch.full_like(logits, float("nan")), cache

    monkeypatch.setattr(t5, "decode_step", overflow)
    with pytest.raises(FloatingPointError, match="float32"):
        list(questioner.reply(DIALOGUE, GREEDY))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float16_default(tiny_dir):
    q = load_questioner(str(tiny_dir), device="cuda")
    assert (q.device, q.dtype) == ("cuda:0", "float16")
    pieces = list(q.reply(DIALOGUE, GREEDY))
    tokens = list(generate_ids(q.model, q.prompt_ids(DIALOGUE), GREEDY))
    assert "".join(pieces) == unescape_v1(q.tokenizer.decode(tokens)) and len(tokens) == 40


def test_bad_dialogues_fail_at_the_call(questioner):
    for turns in ([], [Turn(PATIENT, "头疼"), Turn(DOCTOR, "多久了？")], [Turn(DOCTOR, "你好")]):
        with pytest.raises(ValueError):
            questioner.reply(turns)
    # An empty message is still a valid turn: the model sees the bare labels.
    assert questioner.prompt_ids([Turn(PATIENT, "")]) == questioner.tokenizer.encode("病人：\\n医生：")
    assert len(list(generate_ids(questioner.model, questioner.prompt_ids([Turn(PATIENT, "")]), GREEDY))) == 40


def test_load_errors(tmp_path, tiny_dir):
    with pytest.raises(ModelLoadError, match="BIANQUE_V1_MODEL"):
        load_questioner(str(tmp_path / "nowhere"))

    def broken(name, mutate):
        path = build_tiny_t5(tmp_path / name)
        mutate(path)
        return str(path)

    with pytest.raises(ModelLoadError, match="spiece.model"):
        load_questioner(broken("no_spiece", lambda p: (p / "spiece.model").unlink()))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_questioner(broken("no_weights", lambda p: (p / "model.safetensors").unlink()))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_questioner(broken("no_config", lambda p: (p / "config.json").unlink()))

    def reshape(p):
        tensors = load_file(str(p / "model.safetensors"))
        tensors["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(16, 32)
        save_file(tensors, str(p / "model.safetensors"))

    with pytest.raises(ModelLoadError, match="could not load the BianQue-1.0 weights"):
        load_questioner(broken("bad_shape", reshape))

    def drop(p):
        tensors = load_file(str(p / "model.safetensors"))
        del tensors["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
        save_file(tensors, str(p / "model.safetensors"))

    with pytest.raises(ModelLoadError, match="missing 1 weight tensors"):
        load_questioner(broken("missing_tensor", drop))

    def not_t5(p):
        config = json.loads((p / "config.json").read_text())
        (p / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))

    with pytest.raises(ModelLoadError):
        load_questioner(broken("not_t5", not_t5))


def test_tokenizer_from_another_checkpoint_is_refused(tmp_path):
    path = build_tiny_t5(tmp_path / "t5")
    (path / "spiece.model").write_bytes(shared_dir("t5_reference", "spiece.model").read_bytes())
    with pytest.raises(ModelLoadError, match="32128 pieces"):
        load_questioner(str(path))

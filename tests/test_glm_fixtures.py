"""The native ChatGLM against the reference fixtures (shared/glm_reference, SPEC §10), CPU float32.

The fixture folder is a parameter: set BIANQUE_GLM_FIXTURES to any folder of the same format
(tokenizer_cases.json, ice_text.model, tiny_public/, chat_e2e_public/, bianque2_hub_metadata/).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from bianque.glm import GLMConfig, GLMForCausalLM, GLMTokenizer, process_response
from bianque.glm.model import build_inputs, rotary_inv_freq
from tests.conftest import SHARED, shared_dir

LOGIT_TOL = dict(atol=2e-3, rtol=1e-4)
SUM_TOL = dict(atol=1e-2, rtol=0)
ICE_TEXT_SHA256 = "5e974d9a69c242ce014c88c2b26089270f6198f3c0b700a887666cd3e816f17e"


def fixtures() -> Path:
    """BIANQUE_GLM_FIXTURES if set, else ../shared/glm_reference; skips the test when absent."""
    if os.environ.get("BIANQUE_GLM_FIXTURES"):
        path = Path(os.environ["BIANQUE_GLM_FIXTURES"])
        if not path.is_dir():
            pytest.skip(f"BIANQUE_GLM_FIXTURES={path} is not a directory")
        return path
    return shared_dir("glm_reference")


def cases_or_skip(parts: tuple[str, ...], key: str, name=lambda i, c: c.get("name", f"case{i}")) -> list:
    """pytest params for the cases in a fixture file, or one skipped param when it is absent
    (collection must not call pytest.skip)."""
    root = Path(os.environ["BIANQUE_GLM_FIXTURES"]) if os.environ.get("BIANQUE_GLM_FIXTURES") else SHARED / "glm_reference"
    path = root.joinpath(*parts)
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"reference fixtures not found at {path}"))]
    return [pytest.param(c, id=name(i, c)) for i, c in enumerate(_json(str(path))[key])]


@lru_cache(maxsize=None)
def _json(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_json(*parts: str) -> dict:
    return _json(str(fixtures().joinpath(*parts)))


# ---------------------------------------------------------------------------------------------
# config and vocabulary files
# ---------------------------------------------------------------------------------------------

def test_config_loader_accepts_bianque2_config_unchanged():
    config = GLMConfig.from_json(fixtures() / "bianque2_hub_metadata" / "config.json")
    assert (config.hidden_size, config.num_attention_heads, config.head_dim, config.num_layers) == (4096, 32, 128, 28)
    assert (config.inner_hidden_size, config.vocab_size, config.rotary_dim) == (16384, 130528, 64)
    assert len(rotary_inv_freq(config.rotary_dim)) == 32
    assert (config.mask_token_id, config.gmask_token_id, config.bos_token_id, config.eos_token_id,
            config.pad_token_id) == (130000, 130001, 130004, 130005, 3)
    assert config.layernorm_epsilon == 1e-5 and config.position_encoding_2d and config.quantization_bit == 0
    assert config.metadata["torch_dtype"] == "float16" and config.metadata["model_type"] == "chatglm"


def test_ice_text_model_is_the_slim_chatglm_vocabulary(tokenizer):
    digest = hashlib.sha256((fixtures() / "ice_text.model").read_bytes()).hexdigest()
    assert digest == ICE_TEXT_SHA256
    assert len(tokenizer) == 130344
    assert tokenizer.ids == {"bos": 130004, "eos": 130005, "mask": 130000, "gmask": 130001, "pad": 3, "unk": 0}
    assert tokenizer.convert_ids_to_tokens([4, 5, 130008, 130009, 130087, 130088]) == [
        "<n>", "▁", "<|tab|>", "<|blank_2|>", "<|blank_80|>", "<0x00>"]


# ---------------------------------------------------------------------------------------------
# tokenizer_cases.json
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> GLMTokenizer:
    directory = tmp_path_factory.mktemp("glm_tokenizer")
    shutil.copy(fixtures() / "ice_text.model", directory)
    shutil.copy(fixtures() / "bianque2_hub_metadata" / "tokenizer_config.json", directory)
    return GLMTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("case", cases_or_skip(("tokenizer_cases.json",), "encode_cases"))
def test_encode_case(tokenizer, case):
    text = case["text"]
    assert tokenizer.tokenize(text) == case["tokens"]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False)) == case["tokens"]
    assert tokenizer._sp_tokenize(text) == case["sp_layer_tokens"]
    assert tokenizer.encode(text) == case["ids_with_special_tokens"]
    assert tokenizer.encode(text, add_special_tokens=False) == case["ids_without_special_tokens"]
    assert tokenizer.decode(case["ids_with_special_tokens"]) == case["decode_ids_with_special_tokens"]
    assert tokenizer.decode(case["ids_without_special_tokens"]) == case["decode_ids_without_special_tokens"]
    assert sorted(tokenizer([text]).keys()) == sorted(case["call_output_keys"])


def test_decode_cases(tokenizer):
    for case in load_json("tokenizer_cases.json")["decode_cases"]:
        assert tokenizer.decode(case["ids"]) == case["decoded"], case["name"]


def test_batch_cases(tokenizer):
    for case in load_json("tokenizer_cases.json")["batch_cases"]:
        out = tokenizer(case["texts"], padding=True, return_tensors="pt")
        assert out["input_ids"].tolist() == case["input_ids"]
        assert out["position_ids"].tolist() == case["position_ids"]
        assert out["attention_mask"].dtype == torch.bool
        assert out["attention_mask"].int().tolist() == case["attention_mask_true_means_masked"]
        assert tokenizer(case["texts"], padding=True)["input_ids"] == case["input_ids"]  # lists too


def test_process_response_cases():
    for case in load_json("tokenizer_cases.json")["process_response_cases"]:
        assert process_response(case["input"]) == case["output"], case["input"]


# ---------------------------------------------------------------------------------------------
# tiny_public: logits, hidden states, masks/positions, cached steps, greedy generation
# ---------------------------------------------------------------------------------------------

WEIGHT_FILES = ["model.safetensors", "pytorch_model.bin"]


@pytest.fixture(scope="module", params=WEIGHT_FILES)
def tiny(request, tmp_path_factory) -> GLMForCausalLM:
    """The tiny reference model loaded from ONE weight file (the loader prefers safetensors)."""
    directory = tmp_path_factory.mktemp("tiny_" + request.param.replace(".", "_"))
    shutil.copy(fixtures() / "tiny_public" / "config.json", directory)
    shutil.copy(fixtures() / "tiny_public" / request.param, directory)
    return GLMForCausalLM.from_pretrained(directory, device="cpu", dtype=torch.float32)


TINY_CASES = cases_or_skip(("tiny_public", "cases.json"), "cases")


def model_inputs(case: dict) -> dict:
    """ids only (the model builds mask and positions) or ids + mask + positions (padded batch)."""
    inputs = {"input_ids": torch.tensor(case["input_ids"])}
    if "only" not in case["inputs_given_to_model"]:
        inputs["attention_mask"] = torch.tensor(case["attention_mask_true_means_masked"]).bool()
        inputs["position_ids"] = torch.tensor(case["position_ids"])
    return inputs


def assert_argmax(logits: torch.Tensor, argmax: list, margin: list | None = None) -> None:
    """Exact argmax wherever the reference's top-2 gap exceeds 1e-3."""
    got = logits.argmax(-1)
    expected = torch.tensor(argmax)
    sure = torch.ones_like(expected, dtype=torch.bool) if margin is None else torch.tensor(margin) > 1e-3
    assert torch.equal(got[sure], expected[sure])


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_positions_and_masks(tiny, case):
    if "only" in case["inputs_given_to_model"]:
        mask, positions = build_inputs(torch.tensor(case["input_ids"]), tiny.config)
        assert mask.int().tolist() == case["attention_mask_true_means_masked"]
        assert positions.tolist() == case["position_ids"]
        assert positions[0, 0, -1].item() == case["mask_positions_used"][0]
        return
    # The left-padded batch: the tokenizer's pad() must build exactly the ids, mask and positions
    # the reference was given, from the unpadded rows (with the tiny model's special token ids).
    pads = case["pad_lengths"]
    assert pads == [0, 5] and case["input_ids"][1][:5] == [3] * 5  # row 1 carries 5 pad tokens
    rows = [ids[pad:] for ids, pad in zip(case["input_ids"], pads)]
    tok = GLMTokenizer(fixtures() / "ice_text.model")
    cfg = tiny.config
    tok.bos_token_id, tok.mask_token_id, tok.gmask_token_id, tok.pad_token_id = (
        cfg.bos_token_id, cfg.mask_token_id, cfg.gmask_token_id, cfg.pad_token_id)
    batch = tok.pad(rows, return_tensors="pt")
    assert batch["input_ids"].tolist() == case["input_ids"]
    assert batch["attention_mask"].int().tolist() == case["attention_mask_true_means_masked"]
    assert batch["position_ids"].tolist() == case["position_ids"]
    # written out: the padded row's positions start after its pads; pad rows/columns are masked
    assert batch["position_ids"][1].tolist() == [[0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 5], [0] * 11 + [1]]
    assert batch["attention_mask"][1, 0, :5].all() and batch["attention_mask"][1, 0, 5:, :5].all()
    assert not batch["attention_mask"][1, 0, 5:, 5:11].any() and batch["attention_mask"][1, 0, 5:11, 11].all()
    # the model's own builder on each unpadded row gives the same numbers, shifted by the padding
    for row, (ids, pad) in enumerate(zip(rows, pads)):
        mask, positions = build_inputs(torch.tensor([ids]), cfg)
        assert mask[0, 0].int().tolist() == [r[pad:] for r in case["attention_mask_true_means_masked"][row][0][pad:]]
        assert positions[0].tolist() == [p[pad:] for p in case["position_ids"][row]]


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_logits(tiny, case):
    out = tiny(**model_inputs(case), output_hidden_states=True)
    ref = case["logits"]
    assert list(out.logits.shape) == ref["shape"]
    torch.testing.assert_close(out.logits[:, -3:], torch.tensor(ref["last3"]), **LOGIT_TOL)
    torch.testing.assert_close(out.logits.amax(-1), torch.tensor(ref["max"]), **LOGIT_TOL)
    torch.testing.assert_close(out.logits.sum(-1), torch.tensor(ref["sum"]), **SUM_TOL)
    assert_argmax(out.logits, ref["argmax"], ref["top2_margin"])
    if "all" in ref:
        torch.testing.assert_close(out.logits, torch.tensor(ref["all"]), **LOGIT_TOL)
    if "hidden_states_seq_first" in case:
        values = case["hidden_states_seq_first"]["values"]
        assert len(out.hidden_states) == len(values) == tiny.config.num_layers + 1
        for ours, theirs in zip(out.hidden_states, values):
            torch.testing.assert_close(ours.transpose(0, 1), torch.tensor(theirs), **LOGIT_TOL)


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_cached_decode_steps(tiny, case):
    """Prefill once, then feed each step's token through the KV cache with the recorded
    positions and mask; logits and argmax as the reference's cached steps."""
    inputs = model_inputs(case)
    ids = inputs["input_ids"]
    caches = tiny.new_caches(ids.shape[0], ids.shape[1] + 8)
    if "position_ids" not in inputs:
        inputs["attention_mask"], inputs["position_ids"] = build_inputs(ids, tiny.config)
    tiny(**inputs, caches=caches)
    layout = case["kv_cache_layout"]
    seq, batch, heads, head_dim = layout["key_shape"]
    assert caches[0].length == seq and caches[0].keys.shape[:2] == (batch, heads) and caches[0].keys.shape[3] == head_dim
    for step in case["incremental_greedy_steps"]:
        mask = step["attention_mask_fed_true_means_masked"]
        out = tiny(torch.tensor(step["fed_token"])[:, None],
                   None if mask is None else torch.tensor(mask).bool(),
                   torch.tensor(step["position_ids_fed"]), caches=caches)
        torch.testing.assert_close(out.logits[:, -1], torch.tensor(step["logits"]), **LOGIT_TOL)
        assert out.logits[:, -1].argmax(-1).tolist() == step["argmax"]


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_generate_greedy(tiny, case):
    inputs = model_inputs(case)
    ref = case["generate_greedy"]
    out = tiny.generate(**inputs, max_new_tokens=ref["max_new_tokens"], do_sample=False)
    assert out.tolist() == ref["output_ids"]
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == ref["new_tokens"]


def test_tiny_padded_batch_rows_match_rows_alone(tiny):
    case = next(c for c in load_json("tiny_public", "cases.json")["cases"] if c["name"] == "batch2_left_padded")
    inputs = model_inputs(case)
    batch_logits = tiny(**inputs).logits
    for row, pad in enumerate(case["pad_lengths"]):
        alone_ids = inputs["input_ids"][row:row + 1, pad:]
        alone = tiny(alone_ids)
        torch.testing.assert_close(batch_logits[row:row + 1, pad:], alone.logits, atol=1e-4, rtol=0)
        generated = tiny.generate(alone_ids, max_new_tokens=20)[0, alone_ids.shape[1]:]
        assert generated.tolist() == case["rows_generated_alone"][row]
    assert torch.isfinite(batch_logits).all()  # fully masked pad rows stay finite


def test_both_weight_files_give_identical_outputs(tmp_path):
    outputs = []
    ids = torch.tensor(load_json("tiny_public", "cases.json")["cases"][0]["input_ids"])
    for name in WEIGHT_FILES:
        directory = tmp_path / name.replace(".", "_")
        directory.mkdir()
        shutil.copy(fixtures() / "tiny_public" / "config.json", directory)
        shutil.copy(fixtures() / "tiny_public" / name, directory)
        outputs.append(GLMForCausalLM.from_pretrained(directory)(ids).logits)
    assert torch.equal(outputs[0], outputs[1])


# ---------------------------------------------------------------------------------------------
# chat_e2e_public: chat() end to end on the real vocabulary
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> tuple[GLMForCausalLM, GLMTokenizer]:
    directory = tmp_path_factory.mktemp("chat_e2e")
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        shutil.copy(fixtures() / "chat_e2e_public" / name, directory)
    shutil.copy(fixtures() / "ice_text.model", directory)
    return GLMForCausalLM.from_pretrained(directory), GLMTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("case", cases_or_skip(("chat_e2e_public", "chat_cases.json"), "cases", lambda i, c: f"chat{i}"))
def test_chat_case(chat_model, case):
    from bianque.glm.chat import build_chat_prompt

    model, tokenizer = chat_model
    history = None if case["history"] is None else [tuple(pair) for pair in case["history"]]
    assert build_chat_prompt(case["query"], history) == case["prompt"]
    assert tokenizer.encode(case["prompt"]) == case["prompt_ids"]
    assert sorted(tokenizer([case["prompt"]]).keys()) == sorted(case["tokenizer_call_keys"])
    prompt = torch.tensor([case["prompt_ids"]])
    generated = model.generate(prompt, max_new_tokens=case["chat_kwargs"]["max_length"] - prompt.shape[1])
    assert generated[0, prompt.shape[1]:].tolist() == case["generated_ids"]
    assert tokenizer.decode(case["generated_ids"]) == case["decoded_raw"]
    response, new_history = model.chat(tokenizer, case["query"], history, **case["chat_kwargs"])
    assert response == case["response"]
    assert [list(pair) for pair in new_history] == case["new_history"]


def test_stream_chat_yields_every_token_including_the_last(chat_model):
    """Unlike the reference, the step that ends generation is delivered too."""
    model, tokenizer = chat_model
    case = load_json("chat_e2e_public", "chat_cases.json")["cases"][0]
    kwargs = case["chat_kwargs"]
    steps = list(model.stream_chat(tokenizer, case["query"], case["history"], **kwargs))
    assert len(steps) == len(case["generated_ids"])
    assert steps[-1][0] == case["response"]
    assert [list(p) for p in steps[-1][1]] == case["new_history"]

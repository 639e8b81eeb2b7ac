"""BianQue-1.0 tokenization equals the 2023 transformers-4.28 slow T5Tokenizer, id for id."""
from __future__ import annotations

import json
import random

import pytest
import sentencepiece

from bianque.errors import ModelLoadError
from bianque.t5 import EOS_ID, TextStream, load_tokenizer
from bianque.prompt import unescape_v1
from conftest import SHARED, shared_dir
from tiny_t5 import build_tiny_t5

REFERENCE = ("t5_reference", "tokenizer_cases.json")


def _reference() -> dict:
    return json.loads(shared_dir(*REFERENCE).read_text(encoding="utf-8"))


def _cases(key: str) -> list:
    """Case entries for parametrize; resolved lazily so a missing ../shared skips, not errors."""
    path = SHARED.joinpath(*REFERENCE)
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"reference fixtures not found at {path}"))]
    data = json.loads(path.read_text(encoding="utf-8"))
    # Tie-sensitive cases carry "-tie" in their test id; they are asserted exactly like the rest.
    return [pytest.param(c, id=c["name"] + ("-tie" if c.get("tie_sensitive") else "")) for c in data[key]]


@pytest.fixture(scope="module")
def chatyuan():
    return load_tokenizer(shared_dir("t5_reference"))


@pytest.mark.parametrize("case", _cases("cases"))
def test_encode_equals_2023_ids(chatyuan, case):
    # Tie-sensitive cases are exact too: pyproject pins sentencepiece<=0.2.1, which keeps the 2023 order.
    assert chatyuan.encode(case["text"], max_length=768) == case["input_ids"]


@pytest.mark.parametrize("case", _cases("cases"))
def test_decode_equals_2023_text(chatyuan, case):
    assert chatyuan.decode(case["input_ids"]) == case["decoded"]


@pytest.mark.parametrize("case", _cases("decode_cases"))
def test_decode_cases(chatyuan, case):
    assert [chatyuan.sp.id_to_piece(i) for i in case["ids"]] == case["pieces"]
    assert chatyuan.decode(case["ids"]) == case["decoded"]


def test_reference_covers_the_cases_we_rely_on():
    names = {c["name"] for c in _reference()["cases"]}
    assert {"long_over_768", "literal_eos_text", "literal_unk_pad", "tie_haha", "raw_newline"} <= names
    assert sentencepiece.__version__ <= "0.2.1", "tie cases are only exact with sentencepiece<=0.2.1 (pyproject pin)"


def test_long_input_keeps_first_767_then_eos(chatyuan):
    case = next(c for c in _reference()["cases"] if c["name"] == "long_over_768")
    ids = chatyuan.encode(case["text"])
    assert len(ids) == 768 and ids[-1] == EOS_ID
    assert ids[:767] == chatyuan.tokenize(case["text"])[:767]
    assert chatyuan.count(case["text"]) == len(chatyuan.tokenize(case["text"])) + 1 > 768


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tokenizer(build_tiny_t5(tmp_path_factory.mktemp("t5")))


def test_truncation_edges(tiny):
    text = "病人：我头疼三天了\\n医生：多久了？\\n病人：一周了\\n医生："
    full = tiny.tokenize(text)
    assert len(full) > 12
    assert tiny.encode(text, max_length=10) == full[:9] + [EOS_ID]
    assert tiny.encode(text, max_length=None) == full + [EOS_ID]

    # A literal </s> that already ends the ids is not doubled, also right at the length limit.
    ids = tiny.tokenize("病人：头疼</s>")
    assert ids[-1] == EOS_ID and ids.count(EOS_ID) == 1
    for max_length in (len(ids), len(ids) + 1, None):
        assert tiny.encode("病人：头疼</s>", max_length=max_length) == ids
    assert tiny.encode("病人：头疼</s>", max_length=len(ids) - 1) == ids[: len(ids) - 2] + [EOS_ID]


def test_special_tokens_strip_neighbouring_whitespace(tiny):
    assert tiny.encode("头疼 \u3000</s>  <pad> 发热") == tiny.tokenize("头疼") + [1, 0] + tiny.tokenize("发热") + [1]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="spiece.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path)


def test_stream_pieces_join_to_the_final_text(chatyuan):
    """Incremental detokenisation never yields a piece the final decode takes back (fuzzed).

    The pool is the pieces that make the decoded text change at its end: spaces before the 4.28
    clean-up's ``. , ? !`` and contractions, and a backslash that an ``n`` turns into a newline.
    """
    pieces = ["▁", "'", "m", "s", "ve", "re", "n", "t", "?", "!", ".", ",", "\\", "▁n", "ab", "头", "▁I",
              "\\n", "\\t", "，", "？", "<unk>", "<pad>"]
    pool = [chatyuan.sp.piece_to_id(p) for p in pieces]
    rng = random.Random(0)
    for _ in range(600):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        stream = TextStream(chatyuan)
        out = [stream.push(i) for i in ids] + [stream.finish()]
        assert "".join(out) == unescape_v1(chatyuan.decode(ids)), ids


def test_stream_yields_chinese_as_it_comes(tiny):
    ids = tiny.tokenize("医生：多久了？有没有发热？")
    stream = TextStream(tiny)
    pieces = [stream.push(i) for i in ids]
    assert all(pieces[1:]) and stream.finish() == ""
    assert "".join(pieces) == "医生：多久了？有没有发热？"

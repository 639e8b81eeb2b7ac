"""The review loop end to end in a real headless Chromium: `streamlit run bianque_v1_app.py` with
recording on and the tiny models. Two turns, thumbs-down and a better question on BianQue-1.0's
first reply, the review page "问诊记录" shows the consultation with that feedback, and
`python -m bianque records export --format csv` has the better question as a target. A read-only
database: the notice shows and the app still answers."""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_browser_e2e import (  # noqa: F401 - tiny_models is a fixture
    PLACEHOLDER, _browser_page, _idle, _send, _short_replies, _streamlit, sync_api, tiny_models,
)

from bianque.records import open_store

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "本次问诊将被记录，用于医生评估"
BETTER = "头疼是哪一侧，有没有恶心？"


def _open(page, url: str) -> None:
    page.goto(url)
    page.get_by_placeholder(PLACEHOLDER).wait_for(timeout=120_000)  # models loaded
    _idle(page)


def _thumbs_down_with_better_question(page, index: int) -> None:
    bubble = page.locator('[data-testid="stChatMessage"]').nth(index)
    bubble.get_by_role("radio", name="Thumbs down").click()
    _idle(page)
    bubble.get_by_text("医生意见").click()
    box = bubble.get_by_label("更好的问题（可选）")
    box.fill(BETTER)
    box.press("Enter")
    page.wait_for_timeout(300)
    _idle(page)


def _export_csv(url: str) -> list[dict]:
    run = subprocess.run([sys.executable, "-m", "bianque", "records", "export", "--format", "csv", "--db", url],
                         capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    return list(csv.DictReader(io.StringIO(run.stdout.decode("utf-8"), newline="")))


def test_record_feedback_review_and_export_in_chromium(tiny_models, tmp_path):
    db = f"sqlite:///{tmp_path}/records.db"
    env = {**tiny_models, "BIANQUE_RECORD": db}
    with _streamlit("bianque_v1_app.py", env, tmp_path) as (url, _log), _browser_page() as page:
        _open(page, url)
        assert page.get_by_text(NOTICE).first.is_visible()  # before the first message
        _short_replies(page, "16")
        messages = ["我最近头疼，已经三天了", "主要是额头疼，晚上更厉害"]
        _send(page, messages[0], 2)
        _send(page, messages[1], 4)
        _thumbs_down_with_better_question(page, 2)

        store = open_store(db)
        (cid,) = store.consultation_ids()
        turns = store.get_consultation(cid)["turns"]
        store.close()
        assert [t["role"] for t in turns] == ["patient", "doctor", "patient", "doctor"]
        assert [turns[0]["text"], turns[2]["text"]] == messages
        assert turns[1]["feedback"] == {"rating": "down", "better_question": BETTER, "advise_now": False,
                                        "comment": None}
        first_reply = turns[1]["text"]

        page.get_by_role("link", name="问诊记录").click()
        page.get_by_text("共 1 次问诊，筛选后 1 次。").wait_for()
        page.locator('[data-testid="stDataFrame"]').wait_for()  # widgets load lazily: wait for the table
        page.locator('[data-testid="stSelectbox"]').filter(has_text="打开问诊").wait_for()
        _idle(page)
        page.wait_for_timeout(500)
        page.screenshot(path=str(tmp_path / "bianque_review_list.png"))
        page.locator('[data-testid="stSelectbox"]').filter(has_text="打开问诊").locator("input").click()
        page.get_by_role("option").filter(has_text=f"#{cid} · ").click()
        page.get_by_role("heading", name=f"问诊 #{cid}").wait_for()
        _idle(page)
        bubbles = page.locator('[data-testid="stChatMessage"]')
        try:  # the four recorded turns (elements arrive one by one)
            page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stChatMessage\"]').length === 4",
                                   timeout=60_000)
        except sync_api.TimeoutError:
            raise AssertionError(f"the review page shows {bubbles.count()} turns, not 4") from None
        _idle(page)
        assert messages[0] in bubbles.nth(0).inner_text() and messages[1] in bubbles.nth(2).inner_text()
        assert first_reply.strip().split("\n")[0] in bubbles.nth(1).inner_text()
        bubbles.nth(1).get_by_text("医生意见").click()
        assert bubbles.nth(1).get_by_label("更好的问题（可选）").input_value() == BETTER
        assert bubbles.nth(1).get_by_role("radio", name="Thumbs down").get_attribute("aria-checked") == "true"
        assert bubbles.nth(1).get_by_role("radio", name="Thumbs up").get_attribute("aria-checked") == "false"
        page.mouse.move(0, 0)
        page.wait_for_timeout(500)
        shot = tmp_path / "bianque_review_page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    if os.environ.get("BIANQUE_E2E_ARTIFACTS"):
        target = Path(os.environ["BIANQUE_E2E_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        for name in (shot.name, "bianque_review_list.png"):
            shutil.copy(tmp_path / name, target / name)

    rows = _export_csv(db)
    assert BETTER in [r["target"] for r in rows]
    assert any(r["input"] == f"病人：{messages[0]}\\n医生：" and r["target"] == BETTER for r in rows)


def test_a_read_only_database_shows_the_notice_and_still_answers_in_chromium(tiny_models, tmp_path):
    path = tmp_path / "records.db"
    open_store(f"sqlite:///{path}").close()
    env = {**tiny_models, "BIANQUE_RECORD": f"sqlite:///file:{path}?mode=ro&uri=true"}
    with _streamlit("bianque_v1_app.py", env, tmp_path) as (url, _log), _browser_page() as page:
        _open(page, url)
        _short_replies(page, "16")
        _send(page, "我发烧两天了", 2)
        page.get_by_text("本次问诊不再记录").wait_for()
        reply = page.locator('[data-testid="stChatMessage"]').nth(2).inner_text()
        assert "BianQue-1.0" in reply and len(reply.replace("BianQue-1.0", "").strip()) > 0
        _send(page, "三十九度", 4)  # the consultation goes on
    assert open_store(f"sqlite:///{path}").consultation_ids() == []

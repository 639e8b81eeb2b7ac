"""Recorded consultations: round-trips, export bytes, retention, deletion, schema versions,
concurrent writers, on SQLite and on a real throwaway PostgreSQL server."""
from __future__ import annotations

import os
import random
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from bianque.data import read_csv, write_csv
from bianque.records import RecordsError, open_store, parse_age

PG_BIN = Path("/usr/lib/postgresql/15/bin")


# ---------------------------------------------------------------- a real PostgreSQL server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = tempfile.mkdtemp(prefix="bqpg", dir="/tmp")  # short: the socket path must stay < 107 bytes
    if as_pg:
        shutil.chown(root, "postgres", "postgres")
    data = os.path.join(root, "data")
    subprocess.run(as_pg + [str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                            "--locale=C", "-D", data], check=True, capture_output=True)
    started, port = False, 0
    try:
        for _ in range(5):  # another process may take the port between choosing and binding it
            port = _free_port()
            run = subprocess.run(as_pg + [str(PG_BIN / "pg_ctl"), "-D", data, "-l", os.path.join(root, "log"), "-w",
                                          "-o", f"-k {root} -p {port} -c listen_addresses=127.0.0.1", "start"],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                started = True
                break
        assert started, f"pg_ctl could not start a server: {run.stdout}{run.stderr}"
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(as_pg + [str(PG_BIN / "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"],
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/records.db")
    else:
        s = open_store(request.getfixturevalue("postgres_url"))
        for cid in s.consultation_ids():  # one server for the module: start each test empty
            s.delete_consultation(cid)
    yield s
    s.close()


# ---------------------------------------------------------------- a known consultation

MODELS = {"v1": {"source": "scutcyr/BianQue-1.0", "device": "cpu", "dtype": "float32"},
          "v2": {"source": "/models/bq2", "device": "cuda:0", "dtype": "bfloat16"}}
SETTINGS = {"max_questions": 3, "seed": 7, "record": True}


def known_consultation(s) -> tuple[int, list[int]]:
    cid = s.start_consultation("coq", MODELS, SETTINGS)
    ids = [
        s.add_turn(cid, "patient", "我头疼，两天了 \u3000"),
        s.add_turn(cid, "doctor", "有没有发烧？", stage="question", model="v1",
                   params={"temperature": 0.7, "top_p": 0.9}, started_at=datetime(2026, 1, 1, 8, 0, 0),
                   finished_at=datetime(2026, 1, 1, 8, 0, 2)),
        s.add_turn(cid, "patient", "没有\t有点咳嗽, \"干咳\""),
        s.add_turn(cid, "doctor", "咳嗽多久了？", stage="question", model="v1", stopped=True),
        s.add_turn(cid, "patient", "一周😷\n晚上更重", red_flags=[]),
        s.add_turn(cid, "doctor", "建议多喝水，\n必要时就医。", stage="advice", model="v2", red_flags=["chest_pain"]),
    ]
    s.set_feedback(ids[1], "up")
    s.set_feedback(ids[3], "down", better_question="咳嗽有痰吗？", advise_now=True)
    s.set_feedback(ids[5], "down", comment="没有问清楚就给了建议")
    return cid, ids


def test_round_trip(store):
    cid, ids = known_consultation(store)
    got = store.get_consultation(cid)
    assert got["app"] == "coq" and got["models"] == MODELS and got["settings"] == SETTINGS
    assert got["created_at"].endswith("+00:00") and got["finished_at"] is None
    assert [(t["role"], t["text"], t["stage"], t["model"]) for t in got["turns"]] == [
        ("patient", "我头疼，两天了 \u3000", None, None),
        ("doctor", "有没有发烧？", "question", "v1"),
        ("patient", "没有\t有点咳嗽, \"干咳\"", None, None),
        ("doctor", "咳嗽多久了？", "question", "v1"),
        ("patient", "一周😷\n晚上更重", None, None),
        ("doctor", "建议多喝水，\n必要时就医。", "advice", "v2"),
    ]
    t1, t3, t5 = got["turns"][1], got["turns"][3], got["turns"][5]
    assert t1["params"] == {"temperature": 0.7, "top_p": 0.9}
    assert t1["started_at"] == "2026-01-01T08:00:00+00:00" and t1["finished_at"] == "2026-01-01T08:00:02+00:00"
    assert t3["stopped"] is True and t1["stopped"] is False and t5["failed"] is False
    assert t5["red_flags"] == ["chest_pain"] and got["turns"][0]["red_flags"] == []
    assert got["turns"][0]["feedback"] is None
    assert t1["feedback"] == {"rating": "up", "better_question": None, "advise_now": False, "comment": None}
    assert t3["feedback"] == {"rating": "down", "better_question": "咳嗽有痰吗？", "advise_now": True, "comment": None}
    assert t5["feedback"] == {"rating": "down", "better_question": None, "advise_now": False,
                              "comment": "没有问清楚就给了建议"}
    # feedback is editable: the second save replaces the first
    store.set_feedback(ids[1], "down", better_question="体温多少？")
    assert store.get_consultation(cid)["turns"][1]["feedback"]["rating"] == "down"
    assert store.get_consultation(cid)["turns"][1]["feedback"]["better_question"] == "体温多少？"
    store.finish_consultation(cid)
    assert store.get_consultation(cid)["finished_at"] is not None
    listed = store.list_consultations()
    assert [(c["id"], c["app"], c["turns"], c["questions"], c["ratings"]) for c in listed] == [
        (cid, "coq", 6, 2, {"up": 0, "down": 3})]


def test_feedback_is_checked(store):
    cid, ids = known_consultation(store)
    with pytest.raises(RecordsError, match="patient"):
        store.set_feedback(ids[0], "up")
    with pytest.raises(RecordsError, match="'up' or 'down'"):
        store.set_feedback(ids[1], "meh")
    with pytest.raises(RecordsError, match="no turn"):
        store.set_feedback(10_000, "up")
    with pytest.raises(RecordsError, match="no consultation"):
        store.add_turn(10_000, "patient", "x")


EXPECTED_CSV = (
    "input,target\r\n"
    "病人：我头疼，两天了\\n医生：,有没有发烧？\r\n"
    "\"病人：我头疼，两天了\\n医生：有没有发烧？\\n病人：没有\\t有点咳嗽, \"\"干咳\"\"\\n医生：\",咳嗽有痰吗？\r\n"
).encode("utf-8")


def test_export_rows_byte_exact(store, tmp_path):
    known_consultation(store)
    out = tmp_path / "train.csv"
    assert write_csv(out, store.export_rows()) == 2
    assert out.read_bytes() == EXPECTED_CSV
    assert len(read_csv(out).examples) == 2  # and fine-tuning reads it


def test_export_dialogues_keep_each_turns_stage_and_feedback(tmp_path):
    """The JSONL export researchers read: every turn's stage and feedback, written out here."""
    s = open_store(f"sqlite:///{tmp_path}/records.db")
    known_consultation(s)
    up = {"rating": "up", "better_question": None, "advise_now": False, "comment": None}
    better = {"rating": "down", "better_question": "咳嗽有痰吗？", "advise_now": True, "comment": None}
    down = {"rating": "down", "better_question": None, "advise_now": False, "comment": "没有问清楚就给了建议"}
    assert s.export_dialogues() == [{"id": 1, "turns": [
        {"role": "patient", "text": "我头疼，两天了 \u3000", "stage": None, "feedback": None},
        {"role": "doctor", "text": "有没有发烧？", "stage": "question", "feedback": up},
        {"role": "patient", "text": "没有\t有点咳嗽, \"干咳\"", "stage": None, "feedback": None},
        {"role": "doctor", "text": "咳嗽多久了？", "stage": "question", "feedback": better},
        {"role": "patient", "text": "一周😷\n晚上更重", "stage": None, "feedback": None},
        {"role": "doctor", "text": "建议多喝水，\n必要时就医。", "stage": "advice", "feedback": down},
    ]}]
    s.close()


def test_delete_and_purge(store):
    old = store.start_consultation("v1", created_at=datetime.utcnow() - timedelta(days=31))
    store.add_turn(old, "patient", "旧的")
    t = store.add_turn(old, "doctor", "旧的回答", stage="question", model="v1")
    store.set_feedback(t, "up")
    recent = store.start_consultation("v2", created_at=datetime.utcnow() - timedelta(days=29))
    cid, _ = known_consultation(store)
    assert store.purge(parse_age("30d")) == 1
    assert sorted(c["id"] for c in store.list_consultations()) == sorted([recent, cid])
    with pytest.raises(RecordsError, match="no consultation"):
        store.get_consultation(old)
    assert store.delete_consultation(cid) is True
    assert store.delete_consultation(cid) is False
    assert [c["id"] for c in store.list_consultations()] == [recent]
    assert store.export_rows() == []


def test_deleted_rows_are_gone_from_the_file(tmp_path):
    path = tmp_path / "r.db"
    s = open_store(f"sqlite:///{path}")
    cid, _ = known_consultation(s)
    assert s.delete_consultation(cid)
    s.close()
    with sqlite3.connect(path) as conn:
        assert [conn.execute(f"select count(*) from {t}").fetchone()[0] for t in ("consultations", "turns", "feedback")] == [0, 0, 0]


def test_parse_age():
    assert parse_age("30d") == timedelta(days=30)
    assert parse_age("12h") == timedelta(hours=12)
    assert parse_age("2w") == timedelta(days=14)
    with pytest.raises(RecordsError, match="30d"):
        parse_age("a month")


def test_concurrent_writers_lose_nothing(store):
    shared = store.start_consultation("coq")
    errors = []

    def work(n: int) -> None:
        try:
            rng = random.Random(n)
            own = store.start_consultation(f"app{n}")
            for i in range(10):
                store.add_turn(shared, "patient", f"线程{n}-{i}")
                tid = store.add_turn(own, ["patient", "doctor"][i % 2], f"{n}:{i}", stage="question")
                if i % 2:
                    store.set_feedback(tid, rng.choice(["up", "down"]))
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = store.get_consultation(shared)["turns"]
    assert [t["index"] for t in got] == list(range(80))
    assert sorted(t["text"] for t in got) == sorted(f"线程{n}-{i}" for n in range(8) for i in range(10))
    listed = {c["app"]: c for c in store.list_consultations()}
    for n in range(8):
        assert listed[f"app{n}"]["turns"] == 10
        assert sum(listed[f"app{n}"]["ratings"].values()) == 5


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.db"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("update schema_version set version = 99")
    with pytest.raises(RecordsError, match="schema version 99, newer than this BianQue understands"):
        open_store(f"sqlite:///{path}")


def test_unopenable_databases_are_clear_errors(tmp_path):
    with pytest.raises(RecordsError, match="cannot open the records database"):
        open_store(f"sqlite:///{tmp_path}/no/such/dir/r.db")
    with pytest.raises(RecordsError, match="cannot open the records database"):
        open_store("nosuchdb://x")
    with pytest.raises(RecordsError, match=r"cannot open the records database postgresql://u:\*\*\*@127.0.0.1:1/x: ") as err:
        open_store("postgresql://u:secret@127.0.0.1:1/x")  # server down; the password is never shown
    assert "secret" not in str(err.value)


# ---------------------------------------------------------------- the records CLI


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("BIANQUE_RECORD", None)
    return subprocess.run(["python3", "-m", "bianque", "records", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_cli_json_outputs_and_export(tmp_path):
    import json

    url = f"sqlite:///{tmp_path}/r.db"
    s = open_store(url)
    cid, ids = known_consultation(s)
    other = s.start_consultation("v1")
    s.close()

    run = _cli("list", "--json", "--db", url)
    assert run.returncode == 0, run.stderr
    listed = json.loads(run.stdout)
    assert [(c["id"], c["app"], c["turns"], c["ratings"]) for c in listed] == [
        (other, "v1", 0, {"up": 0, "down": 0}), (cid, "coq", 6, {"up": 1, "down": 2})]
    assert all(isinstance(c["created_at"], str) for c in listed)

    run = _cli("--db", url, "show", str(cid), "--json")
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["id"] == cid and shown["app"] == "coq"
    assert [(t["role"], t["text"], t["stage"], t["model"], t["feedback"]) for t in shown["turns"]] == [
        ("patient", "我头疼，两天了 \u3000", None, None, None),
        ("doctor", "有没有发烧？", "question", "v1",
         {"rating": "up", "better_question": None, "advise_now": False, "comment": None}),
        ("patient", "没有\t有点咳嗽, \"干咳\"", None, None, None),
        ("doctor", "咳嗽多久了？", "question", "v1",
         {"rating": "down", "better_question": "咳嗽有痰吗？", "advise_now": True, "comment": None}),
        ("patient", "一周😷\n晚上更重", None, None, None),
        ("doctor", "建议多喝水，\n必要时就医。", "advice", "v2",
         {"rating": "down", "better_question": None, "advise_now": False, "comment": "没有问清楚就给了建议"}),
    ]

    run = _cli("export", "--format", "csv", "--out", str(tmp_path / "train.csv"), "--db", url)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "train.csv").read_bytes() == EXPECTED_CSV

    run = _cli("export", "--format", "jsonl", "--out", str(tmp_path / "d.jsonl"), "--db", url)
    assert run.returncode == 0, run.stderr
    from bianque.data import read_dialogues

    dialogues = read_dialogues(tmp_path / "d.jsonl")  # what `bianque.data build` reads
    assert [[(t.role, t.text) for t in d] for d in dialogues] == [[
        ("patient", "我头疼，两天了 \u3000"), ("doctor", "有没有发烧？"), ("patient", "没有\t有点咳嗽, \"干咳\""),
        ("doctor", "咳嗽多久了？"), ("patient", "一周😷\n晚上更重"), ("doctor", "建议多喝水，\n必要时就医。")]]
    build = subprocess.run(["python3", "-m", "bianque.data", "build", "--in", str(tmp_path / "d.jsonl"),
                            "--out", str(tmp_path / "b.csv")], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert build.returncode == 0, build.stderr
    assert len(read_csv(tmp_path / "b.csv").examples) == 3

    assert _cli("delete", str(cid), "--db", url).returncode == 0
    run = _cli("show", str(cid), "--db", url)
    assert run.returncode == 2 and f"no consultation {cid}" in run.stderr
    assert _cli("purge", "--older-than", "0d", "--db", url).returncode == 0
    assert json.loads(_cli("list", "--json", "--db", url).stdout) == []


def test_cli_clear_errors(tmp_path):
    run = _cli("list", "--db", f"sqlite:///{tmp_path}/missing.db")
    assert run.returncode == 2 and "no records database at" in run.stderr
    assert not (tmp_path / "missing.db").exists()
    run = _cli("list", "--db", "postgresql://u:secret@127.0.0.1:1/x")
    assert run.returncode == 2 and "cannot open the records database" in run.stderr and "secret" not in run.stderr
    url = f"sqlite:///{tmp_path}/r.db"
    open_store(url).close()
    run = _cli("purge", "--older-than", "a month", "--db", url)
    assert run.returncode == 2 and "30d" in run.stderr
    assert "Traceback" not in run.stderr

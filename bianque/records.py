"""Recorded consultations and clinicians' feedback, in any SQLAlchemy database (SQLite, PostgreSQL).

    store = open_store("sqlite:///bianque-records.db")
    cid = store.start_consultation("coq", models={...}, settings={...})
    tid = store.add_turn(cid, "doctor", text, stage="question", model="v1", params={...})
    store.set_feedback(tid, rating="down", better_question="...")
    store.export_rows()  # fine-tuning rows, the format bianque.data / bianque.finetune use

The schema is versioned (table ``schema_version``): a database written by a newer BianQue is
refused with a RecordsError instead of being misread. Every database failure is raised as a
RecordsError so that callers (the apps) can show a notice and go on unrecorded. Patient text is
stored exactly as typed and never logged; error messages carry the URL without its password.
"""
from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Sequence

from sqlalchemy import (
    JSON, Boolean, Column, DateTime, ForeignKey, Integer, MetaData, String, Table, Text,
    UniqueConstraint, and_, create_engine, delete, event, func, inspect, or_, select, update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

from .data import Example, clean_text
from .prompt import DOCTOR, PATIENT, Turn, build_prompt

SCHEMA_VERSION = 1
DEFAULT_URL = "sqlite:///bianque-records.db"
RATINGS = ("up", "down")
SQLITE_BUSY_MS = 30_000
# A write that lost a race (two sessions appending to one consultation) runs again after a random
# pause that grows with each attempt (~16 s in all at most): enough for a machine under heavy load.
WRITE_ATTEMPTS = 40

metadata = MetaData()

schema_version = Table(
    "schema_version", metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

consultations = Table(
    "consultations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("app", String(64), nullable=False),
    Column("models", JSON, nullable=False),  # {"v1": {"source", "device", "dtype"}, ...}
    Column("settings", JSON, nullable=False),
    Column("created_at", DateTime, nullable=False, index=True),  # naive UTC
    Column("finished_at", DateTime),
)

turns = Table(
    "turns", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("consultation_id", Integer, ForeignKey("consultations.id", ondelete="CASCADE"), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("stage", String(16)),
    Column("model", String(16)),
    Column("params", JSON),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("stopped", Boolean, nullable=False, default=False),
    Column("failed", Boolean, nullable=False, default=False),
    Column("red_flags", JSON, nullable=False),
    UniqueConstraint("consultation_id", "idx", name="uq_turn_index"),
)

feedback = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("turn_id", Integer, ForeignKey("turns.id", ondelete="CASCADE"), nullable=False, unique=True),
    Column("rating", String(8)),
    Column("better_question", Text),
    Column("advise_now", Boolean, nullable=False, default=False),
    Column("comment", Text),
    Column("updated_at", DateTime, nullable=False),
)


class RecordsError(RuntimeError):
    """The records database cannot be opened, read or written; the message says which and why."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``2w`` -> a timedelta (for ``purge --older-than``)."""
    match = re.fullmatch(r"\s*(\d+)\s*([dhw])\s*", text)
    if not match:
        raise RecordsError(f"cannot read the age {text!r}: use a number with d (days), h (hours) or w (weeks), e.g. 30d")
    n, unit = int(match[1]), match[2]
    return {"d": timedelta(days=n), "h": timedelta(hours=n), "w": timedelta(weeks=n)}[unit]


def _normalise_url(url: str) -> str:
    """``postgresql://`` without a driver means psycopg 3 (the driver this project installs)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unreadable URL>"


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL and a busy timeout on every connection; writes take the lock at BEGIN (no upgrade deadlock)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def open_store(url: str | None = None) -> "RecordStore":
    """Open (and on first use create) the records database at ``url``; RecordsError if it cannot."""
    url = url or DEFAULT_URL
    shown = _safe(url)
    try:
        engine = create_engine(_normalise_url(url))
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        raise RecordsError(f"cannot open the records database {shown}: {exc}") from None
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    store = RecordStore(engine, shown)
    try:
        store._prepare()
    except RecordsError:
        engine.dispose()
        raise
    except SQLAlchemyError as exc:
        engine.dispose()
        raise RecordsError(f"cannot open the records database {shown}: {_reason(exc)}") from None
    return store


def _reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).strip().splitlines()[0]


@dataclass
class RecordStore:
    engine: Engine
    shown_url: str

    # ------------------------------------------------------------ schema

    def _prepare(self) -> None:
        for attempt in range(3):  # several front ends may create the schema at the same moment
            try:
                self._check_version()
                metadata.create_all(self.engine, checkfirst=True)
                with self.engine.begin() as conn:
                    if conn.execute(select(schema_version.c.version)).first() is None:
                        conn.execute(schema_version.insert().values(id=1, version=SCHEMA_VERSION))
                return
            except IntegrityError:
                if attempt == 2:
                    raise
            except SQLAlchemyError as exc:
                if attempt == 2 or "already exists" not in str(exc):
                    raise
            time.sleep(0.05)

    def _check_version(self) -> None:
        if not inspect(self.engine).has_table("schema_version"):
            return
        with self.engine.connect() as conn:
            row = conn.execute(select(schema_version.c.version)).first()
        if row is None:
            return
        if row.version > SCHEMA_VERSION:
            raise RecordsError(
                f"the records database {self.shown_url} has schema version {row.version}, newer than this "
                f"BianQue understands ({SCHEMA_VERSION}); upgrade BianQue or use another database"
            )
        if row.version < SCHEMA_VERSION:
            raise RecordsError(
                f"the records database {self.shown_url} has schema version {row.version}, older than "
                f"{SCHEMA_VERSION}, and no migration exists for it; use another database"
            )

    def version(self) -> int:
        with self._conn() as conn:
            return conn.execute(select(schema_version.c.version)).scalar_one()

    def close(self) -> None:
        self.engine.dispose()

    def _conn(self):
        return _Guard(self)

    # ------------------------------------------------------------ writing

    def start_consultation(self, app: str, models: dict | None = None, settings: dict | None = None,
                           created_at: datetime | None = None) -> int:
        with self._conn() as conn:
            result = conn.execute(consultations.insert().values(
                app=app, models=models or {}, settings=settings or {}, created_at=created_at or utcnow()))
            return int(result.inserted_primary_key[0])

    def finish_consultation(self, consultation_id: int) -> None:
        with self._conn() as conn:
            conn.execute(update(consultations).where(consultations.c.id == consultation_id).values(finished_at=utcnow()))

    def add_turn(self, consultation_id: int, role: str, text: str, *, stage: str | None = None,
                 model: str | None = None, params: dict | None = None, started_at: datetime | None = None,
                 finished_at: datetime | None = None, stopped: bool = False, failed: bool = False,
                 red_flags: Sequence[str] = ()) -> int:
        """Append a turn (its index is the next free one, even with concurrent writers); its id."""
        if role not in (PATIENT, DOCTOR):
            raise RecordsError(f"a turn's role is 'patient' or 'doctor', not {role!r}")
        values = dict(consultation_id=consultation_id, role=role, text=text, stage=stage, model=model,
                      params=params, started_at=started_at, finished_at=finished_at, stopped=bool(stopped),
                      failed=bool(failed), red_flags=list(red_flags))
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self._conn() as conn:
                    if conn.execute(select(consultations.c.id).where(consultations.c.id == consultation_id)).first() is None:
                        raise RecordsError(f"no consultation {consultation_id} in {self.shown_url}")
                    nxt = conn.execute(select(func.coalesce(func.max(turns.c.idx) + 1, 0))
                                       .where(turns.c.consultation_id == consultation_id)).scalar_one()
                    result = conn.execute(turns.insert().values(idx=nxt, **values))
                    return int(result.inserted_primary_key[0])
            except _Retry:
                _backoff(attempt)
        raise RecordsError(f"could not append a turn to consultation {consultation_id}: too many concurrent writers")

    def set_feedback(self, turn_id: int, rating: str | None = None, better_question: str | None = None,
                     advise_now: bool = False, comment: str | None = None) -> None:
        """Create or replace the feedback on a doctor reply."""
        if rating is not None and rating not in RATINGS:
            raise RecordsError(f"a rating is 'up' or 'down', not {rating!r}")
        values = dict(rating=rating, better_question=better_question or None, advise_now=bool(advise_now),
                      comment=comment or None, updated_at=utcnow())
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self._conn() as conn:
                    role = conn.execute(select(turns.c.role).where(turns.c.id == turn_id)).scalar_one_or_none()
                    if role is None:
                        raise RecordsError(f"no turn {turn_id} in {self.shown_url}")
                    if role != DOCTOR:
                        raise RecordsError(f"turn {turn_id} is the patient's; feedback is given on doctor replies")
                    done = conn.execute(update(feedback).where(feedback.c.turn_id == turn_id).values(**values))
                    if done.rowcount == 0:
                        conn.execute(feedback.insert().values(turn_id=turn_id, **values))
                    return
            except _Retry:
                _backoff(attempt)
        raise RecordsError(f"could not save feedback on turn {turn_id}: too many concurrent writers")

    def delete_consultation(self, consultation_id: int) -> bool:
        """Really delete a consultation, its turns and their feedback; False if there was none."""
        with self._conn() as conn:
            return self._delete(conn, [consultation_id]) > 0

    def purge(self, older_than: timedelta, now: datetime | None = None) -> int:
        """Delete consultations created more than ``older_than`` ago; how many were deleted."""
        cutoff = (now or utcnow()) - older_than
        with self._conn() as conn:
            ids = list(conn.execute(select(consultations.c.id).where(consultations.c.created_at < cutoff)).scalars())
            return self._delete(conn, ids)

    @staticmethod
    def _delete(conn, ids: list[int]) -> int:
        if not ids:
            return 0
        turn_ids = select(turns.c.id).where(turns.c.consultation_id.in_(ids))
        conn.execute(delete(feedback).where(feedback.c.turn_id.in_(turn_ids)))
        conn.execute(delete(turns).where(turns.c.consultation_id.in_(ids)))
        return conn.execute(delete(consultations).where(consultations.c.id.in_(ids))).rowcount

    # ------------------------------------------------------------ reading

    def list_consultations(self) -> list[dict]:
        """Newest first: id, app, created_at, finished_at, turns (a count), ratings {"up", "down"}."""
        with self._conn() as conn:
            rows = conn.execute(select(consultations).order_by(consultations.c.created_at.desc(),
                                                               consultations.c.id.desc())).all()
            counts = dict(conn.execute(select(turns.c.consultation_id, func.count())
                                       .group_by(turns.c.consultation_id)).all())
            # BianQue-1.0 on its own only asks: its replies (no stage) count as questions too
            asked = or_(turns.c.stage == "question", and_(turns.c.stage.is_(None), turns.c.model == "v1"))
            questions = dict(conn.execute(select(turns.c.consultation_id, func.count())
                                          .where(turns.c.role == DOCTOR, asked).group_by(turns.c.consultation_id)).all())
            ratings = conn.execute(select(turns.c.consultation_id, feedback.c.rating, func.count())
                                   .join(feedback, feedback.c.turn_id == turns.c.id)
                                   .where(feedback.c.rating.is_not(None))
                                   .group_by(turns.c.consultation_id, feedback.c.rating)).all()
        out = []
        for row in rows:
            tally = {"up": 0, "down": 0}
            for cid, rating, n in ratings:
                if cid == row.id:
                    tally[rating] = n
            out.append({"id": row.id, "app": row.app, "created_at": _iso(row.created_at),
                        "finished_at": _iso(row.finished_at), "turns": counts.get(row.id, 0),
                        "questions": questions.get(row.id, 0), "ratings": tally})
        return out

    def get_consultation(self, consultation_id: int) -> dict:
        """One consultation with its turns in order, each with its feedback (None if none)."""
        with self._conn() as conn:
            row = conn.execute(select(consultations).where(consultations.c.id == consultation_id)).first()
            if row is None:
                raise RecordsError(f"no consultation {consultation_id} in {self.shown_url}")
            trows = conn.execute(select(turns, feedback.c.rating, feedback.c.better_question, feedback.c.advise_now,
                                        feedback.c.comment, feedback.c.updated_at.label("feedback_at"))
                                 .outerjoin(feedback, feedback.c.turn_id == turns.c.id)
                                 .where(turns.c.consultation_id == consultation_id).order_by(turns.c.idx)).all()
        return {
            "id": row.id, "app": row.app, "models": row.models, "settings": row.settings,
            "created_at": _iso(row.created_at), "finished_at": _iso(row.finished_at),
            "turns": [_turn_dict(t) for t in trows],
        }

    def consultation_ids(self) -> list[int]:
        with self._conn() as conn:
            return list(conn.execute(select(consultations.c.id).order_by(consultations.c.id)).scalars())

    # ------------------------------------------------------------ export

    def export_dialogues(self, ids: Iterable[int] | None = None) -> list[dict]:
        """Recorded dialogues as ``bianque.data build`` reads them: {"id", "turns": [{role, text, ...}]}.

        Turns are the dialogue as the patient last saw it (see _alternating: failed replies left
        out, regenerated replies replaced, joined patient messages joined), with their feedback
        alongside; dialogues without a doctor reply are left out.
        """
        out = []
        for cid in (self.consultation_ids() if ids is None else ids):
            kept = _alternating(self.get_consultation(cid)["turns"])
            if any(t["role"] == DOCTOR for t in kept):
                out.append({"id": cid, "turns": [{"role": t["role"], "text": t["text"], "stage": t["stage"],
                                                  "feedback": t["feedback"]} for t in kept]})
        return out

    def export_rows(self, ids: Iterable[int] | None = None) -> list[Example]:
        """Fine-tuning rows: one per doctor reply, the clinician's better question as its target
        where there is one; thumbs-down replies without a correction are left out."""
        rows = []
        for dialogue in self.export_dialogues(ids):
            kept = dialogue["turns"]
            for i, t in enumerate(kept):
                if t["role"] != DOCTOR:
                    continue
                fb = t["feedback"] or {}
                if fb.get("better_question"):
                    target = fb["better_question"]
                elif fb.get("rating") == "down":
                    continue
                else:
                    target = t["text"]
                before = [Turn(x["role"], x["text"].strip()) for x in kept[:i]]
                target = clean_text(target)
                if target and before[-1].text:
                    rows.append(Example(clean_text(build_prompt(before)), target))
        return rows


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, 0.02 * (attempt + 1)))  # random: racing writers do not meet again


class _Retry(Exception):
    """A write lost a race (unique index taken, serialisation failure): run it again."""


class _Guard:
    """A transaction; database errors become RecordsError, lost races become _Retry."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store

    def __enter__(self):
        try:
            self.cm = self.store.engine.begin()
            return self.cm.__enter__()
        except SQLAlchemyError as exc:
            raise RecordsError(f"cannot use the records database {self.store.shown_url}: {_reason(exc)}") from None

    def __exit__(self, kind, exc, tb):
        try:
            self.cm.__exit__(kind, exc, tb)
        except BaseException as err:  # the commit (or the rollback) failed, or exc came back out
            exc = err
        if exc is None:
            return False
        if isinstance(exc, IntegrityError) or (
                isinstance(exc, SQLAlchemyError) and ("could not serialize" in str(exc) or "deadlock" in str(exc))):
            raise _Retry() from None
        if isinstance(exc, SQLAlchemyError):
            raise RecordsError(f"cannot use the records database {self.store.shown_url}: {_reason(exc)}") from None
        if kind is None:  # the commit itself failed with something else
            raise exc
        return False  # the body's own exception (e.g. a RecordsError) goes on


def _alternating(rows: list[dict]) -> list[dict]:
    """The dialogue as the patient last saw it, alternating patient/doctor from a patient turn.

    Recorded turns follow the app: a failed reply or one stopped before its first character is
    left out; a patient turn following another is what the app joined to it (sent after a failed
    reply); a doctor reply following another replaced it (regenerated). A turn of neither kind
    that breaks the alternation cuts the dialogue there.
    """
    kept: list[dict] = []
    for t in rows:
        if t["role"] == DOCTOR and (t.get("failed") or not t["text"].strip()):
            continue
        if kept and t["role"] == kept[-1]["role"]:
            if t["role"] == PATIENT:
                kept[-1] = {**kept[-1], "text": f"{kept[-1]['text']}\n{t['text']}"}
            else:
                kept[-1] = t
            continue
        if t["role"] != (PATIENT, DOCTOR)[len(kept) % 2]:
            break
        kept.append(t)
    return kept


def _turn_dict(t) -> dict:
    fb = None
    if t.feedback_at is not None:
        fb = {"rating": t.rating, "better_question": t.better_question, "advise_now": bool(t.advise_now),
              "comment": t.comment}
    return {"id": t.id, "index": t.idx, "role": t.role, "text": t.text, "stage": t.stage, "model": t.model,
            "params": t.params, "started_at": _iso(t.started_at), "finished_at": _iso(t.finished_at),
            "stopped": bool(t.stopped), "failed": bool(t.failed), "red_flags": list(t.red_flags or []),
            "feedback": fb}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=timezone.utc).isoformat()

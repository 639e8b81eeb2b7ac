"""A learned backstop for the safety net (issue #14): hashed character n-grams + logistic regression.

The rules in ``bianque.safety`` are precise but read only the words they know (about 0.89 recall on
wording they had never seen). This model reads every character 1-3-gram of the patient's last
``WINDOW`` messages (NFKC, lower case, spaces dropped, punctuation folded to one clause mark),
hashed into ``BUCKETS`` buckets, and gives the probability that the text describes an emergency.
``bianque.safety.red_flags`` asks it only when no rule fired and ``bianque.safety.MODEL_BACKSTOP``
is on; then a probability of at least ``THRESHOLD`` adds one generic notice, ``MODEL_FLAG``.

Features are text only, not the rules' partial findings: the rules were tuned on every labelled
set, so findings as features would leak the held-out sets into the leave-one-set-out check, and
every rule edit would change the committed weights.

Training (``python -m bianque.safety_model train``) reads the committed tables
(``tests/data/safety_dev.tsv`` and the sets ``TRAIN_SETS`` of ``safety_indep.tsv`` and of
``safety_real.tsv``, real patient messages; a row is the window ending at its last message), starts
from zero weights and runs full-batch Adam in one thread, so it is deterministic: on one machine it
rewrites ``safety_model.safetensors`` bit for bit. Whoever edits those tables retrains and commits
the weights (``tests/test_safety_model.py`` checks the recorded sha256 of the training data). ``loso`` is the honest check (each set held out in turn, the model alone scored on it); ``eval
--data FILE.tsv`` scores the model alone, the rules alone and both on any table in either format.

Patient text is never logged here; the commands print figures only.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
import unicodedata
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

from bianque.safety import CALL_120, WINDOW, RedFlag

WEIGHTS = Path(__file__).with_name("safety_model.safetensors")
DATA_DIR = Path(__file__).resolve().parents[1] / "tests" / "data"
BUCKETS = 1 << 16  # 256 KiB of float32 weights; collisions cost little at ~40k distinct n-grams
ORDERS = (1, 2, 3)
MAX_CHARS = 400  # the most recent characters of the window read: bounds the time on huge messages
STEPS, LEARNING_RATE, L2 = 300, 0.05, 1e-5
# the independent sets (safety_indep.tsv) and the real messages' sources (safety_real.tsv) trained on;
# sets added later stay unseen until named here
TRAIN_SETS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18",
              "real-toyhom", "real-medicalgpt", "real-mie", "real-covid")
TABLES = ("safety_indep.tsv", "safety_real.tsv")
THRESHOLD = 0.8  # by ``loso``: held-out false alarms of the model alone 0.5 % on the written sets (0.7: 1.3 %)
SEPARATOR = " || "  # split messages in the tables, oldest first

MODEL_FLAG = RedFlag(
    "model_suspected",
    "这段描述可能是急症：规则没有识别出具体类别，但学习模型认为它很像需要急救的情况。" + CALL_120,
    when=(),
    action="说清病人现在的情况和地址，保持电话畅通；拿不准时按急症处理。",
)


# --- features -----------------------------------------------------------------------------------
@lru_cache(maxsize=256)  # a dialogue's earlier messages are read again with every new one
def _normalise(message: str) -> str:
    """NFKC, lower case, no spaces, every punctuation mark as "|" (a clause boundary)."""
    flat = unicodedata.normalize("NFKC", message).lower()
    return "".join("|" if unicodedata.category(ch).startswith("P") else ch for ch in flat if not ch.isspace())


@lru_cache(maxsize=4096)
def _bucket(gram: str) -> int:
    return zlib.crc32(gram.encode("utf-8")) & (BUCKETS - 1)


def features(text: str, earlier: Sequence[str] = ()) -> tuple[list[int], float]:
    """(distinct buckets of the window's n-grams, the value each carries: 1/sqrt(their number)).

    The window is ``earlier``'s last ``WINDOW - 1`` messages and ``text``, as ``red_flags`` reads it."""
    window = [*list(earlier)[len(earlier) - (WINDOW - 1):], text] if WINDOW > 1 else [text]
    # each message cut to its last MAX_CHARS characters first: a huge message costs no more than a long one
    s = ("^" + "\n".join(_normalise(m[-MAX_CHARS:]) for m in window) + "$")[-MAX_CHARS:]
    buckets = sorted({_bucket(s[i:i + n]) for n in ORDERS for i in range(len(s) - n + 1)})
    return buckets, 1.0 / math.sqrt(len(buckets))


# --- the model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    weight: list[float]  # BUCKETS values (a list: indexing one float is fastest in pure Python)
    bias: float

    def probability(self, text: str, earlier: Sequence[str] = ()) -> float:
        buckets, value = features(text, earlier)
        logit = self.bias + value * sum(self.weight[b] for b in buckets)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit))))


def save(weight: torch.Tensor, bias: torch.Tensor, path: Path = WEIGHTS, data_sha256: str = "") -> None:
    from safetensors.torch import save_file

    meta = _settings() | {"train_sets": ",".join(TRAIN_SETS), "data_sha256": data_sha256}
    # one metadata entry: safetensors may write several in any order, and the file must be the same every time
    save_file({"weight": weight.detach().contiguous(), "bias": bias.detach().reshape(1).contiguous()}, str(path),
              metadata={"bianque": json.dumps(meta, sort_keys=True)})


def _settings() -> dict[str, str]:
    return {"buckets": str(BUCKETS), "orders": ",".join(map(str, ORDERS)), "max_chars": str(MAX_CHARS), "window": str(WINDOW)}


def metadata(path: Path = WEIGHTS) -> dict[str, str]:
    """The settings and the training data's sha256 recorded in a weights file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("bianque", "{}"))


def load(path: Path = WEIGHTS) -> Model:
    """The model in ``path``; raises when it was trained with other feature settings."""
    from safetensors import safe_open

    meta = metadata(path)
    wrong = {k: (meta.get(k), v) for k, v in _settings().items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"{path} was trained with other feature settings {wrong} (file, code): "
                         "run python -m bianque.safety_model train")
    with safe_open(str(path), framework="pt") as f:
        weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    if weight.shape != (BUCKETS,) or bias.shape != (1,):
        raise ValueError(f"{path}: weight {tuple(weight.shape)}, bias {tuple(bias.shape)}; expected ({BUCKETS},), (1,)")
    return Model(weight.tolist(), float(bias))


@lru_cache(maxsize=1)
def _committed() -> Model:
    return load(WEIGHTS)


def suspect(text: str, earlier: Sequence[str] = ()) -> float:
    """The committed model's probability that ``text`` (after ``earlier``, oldest first) is an emergency."""
    return _committed().probability(text, earlier)


def fires(text: str, earlier: Sequence[str] = (), threshold: float = THRESHOLD, model: Model | None = None) -> bool:
    """Whether the model raises its notice under ``text``: the message alone reaches ``threshold``, or the
    window does and the window ending at the previous message did not (a notice once, as the rules do)."""
    p = (model or _committed()).probability
    if p(text) >= threshold:
        return True
    earlier = list(earlier)
    return bool(earlier) and p(text, earlier) >= threshold and p(earlier[-1], earlier[:-1]) < threshold


def backstop(text: str, earlier: Sequence[str] = ()) -> list[RedFlag]:
    """``[MODEL_FLAG]`` when the model fires on ``text``, else ``[]`` (``red_flags`` asks when no rule fired)."""
    return [MODEL_FLAG] if fires(text, earlier) else []


# --- data and training --------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    set: str  # "dev" for the development set
    label: int  # 1 = emergency
    category: str
    messages: tuple[str, ...]  # one patient's consecutive messages, oldest first


def read_rows(path: Path) -> list[Row]:
    """A table in the 4-field format (SET, LABEL 0/1, CATEGORY, MESSAGE) or the development set's
    2-field one (CATEGORY or "none", MESSAGE); " || " joins a patient's consecutive messages."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) == 4 and fields[1] in ("0", "1"):
            rows.append(Row(fields[0], int(fields[1]), fields[2], tuple(fields[3].split(SEPARATOR))))
        elif len(fields) == 2:
            rows.append(Row("dev", int(fields[0] != "none"), fields[0], tuple(fields[1].split(SEPARATOR))))
        else:
            raise ValueError(f"{path}:{number}: expected SET<TAB>LABEL(0/1)<TAB>CATEGORY<TAB>MESSAGE "
                             f"or LABEL<TAB>MESSAGE, got {len(fields)} fields")
    return rows


def training_rows(data_dir: Path = DATA_DIR, sets: Iterable[str] = TRAIN_SETS) -> list[Row]:
    """The development set, its split emergencies' earlier parts as ordinary rows (its labelling rule:
    "the earlier ones alone are not an emergency"), and the sets ``sets`` of ``TABLES``. Their earlier
    parts stay out: their rule warns about a first message such as "喘不上气" by design."""
    wanted = set(sets)
    dev = read_rows(data_dir / "safety_dev.tsv")
    parts = [Row("dev", 0, "none", r.messages[:k]) for r in dev if r.label for k in range(1, len(r.messages))]
    return dev + parts + [r for table in TABLES for r in read_rows(data_dir / table) if r.set in wanted]


def data_hash(rows: Sequence[Row]) -> str:
    digest = hashlib.sha256()
    for r in rows:
        digest.update(f"{r.label}\t{SEPARATOR.join(r.messages)}\n".encode("utf-8"))
    return digest.hexdigest()


@contextlib.contextmanager
def _one_thread():
    """Training in one thread: the order of every float sum is fixed, so the weights are too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit(rows: Sequence[Row], steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the logistic regression on each row's window ending at its last message.

    The gradient is written out (X^T (sigmoid(Xw + b) - y) / N + 2 L2 w, X sparse) rather than taken
    by autograd: two sparse products a step keep the whole training at about a second."""
    feats = [features(r.messages[-1], r.messages[:-1]) for r in rows]
    row = torch.tensor([i for i, (bs, _) in enumerate(feats) for _ in bs], dtype=torch.long)
    col = torch.tensor([b for bs, _ in feats for b in bs], dtype=torch.long)
    values = torch.tensor([v for bs, v in feats for _ in bs], dtype=torch.float32)
    x = torch.sparse_coo_tensor(torch.stack([row, col]), values, (len(rows), BUCKETS), check_invariants=True).coalesce()
    xt = x.t().coalesce()
    target = torch.tensor([float(r.label) for r in rows])
    with _one_thread():
        weight, bias = torch.zeros(BUCKETS, 1), torch.zeros(1)
        optimiser = torch.optim.Adam([weight, bias], lr=LEARNING_RATE)
        for _ in range(steps):
            residual = (torch.sigmoid((x @ weight).squeeze(1) + bias) - target) / len(rows)
            weight.grad = xt @ residual.unsqueeze(1) + 2 * L2 * weight
            bias.grad = residual.sum().reshape(1)
            optimiser.step()
    return weight.squeeze(1), bias


def as_model(weight: torch.Tensor, bias: torch.Tensor) -> Model:
    return Model(weight.tolist(), float(bias))


# --- scoring ------------------------------------------------------------------------------------
def score(rows: Sequence[Row], raises) -> tuple[float, float, int, int]:
    """(recall, false-alarm rate, emergencies, ordinary) where ``raises(text, earlier)`` says whether a
    notice appears under a message: an emergency counts as caught when one appears under any of its
    messages, an ordinary row as a false alarm when one appears under its last (as tests/test_safety.py)."""
    pos = [r for r in rows if r.label == 1]
    neg = [r for r in rows if r.label == 0]
    caught = sum(any(raises(m, r.messages[:k]) for k, m in enumerate(r.messages)) for r in pos)
    alarms = sum(bool(raises(r.messages[-1], r.messages[:-1])) for r in neg)
    return caught / max(1, len(pos)), alarms / max(1, len(neg)), len(pos), len(neg)


def _rules(text: str, earlier: Sequence[str]) -> bool:
    from bianque import safety

    return bool(safety.red_flags(text, list(earlier)))


@contextlib.contextmanager
def backstop_on():
    """``bianque.safety.MODEL_BACKSTOP`` switched on for the duration (restored afterwards)."""
    from bianque import safety

    before = safety.MODEL_BACKSTOP
    safety.MODEL_BACKSTOP = True
    try:
        yield
    finally:
        safety.MODEL_BACKSTOP = before


def _line(name: str, figures: tuple[float, float, int, int]) -> str:
    recall, false_alarms, npos, nneg = figures
    return (f"  {name:<16} recall {recall:.3f} ({round(recall * npos)}/{npos})   "
            f"false alarms {false_alarms:.3f} ({round(false_alarms * nneg)}/{nneg})\n")


def evaluate(path: Path, threshold: float = THRESHOLD, out=None) -> None:
    out = out or sys.stdout
    rows = read_rows(path)
    model = _committed()
    groups = {"all": rows} | ({s: [r for r in rows if r.set == s] for s in dict.fromkeys(r.set for r in rows)}
                              if len({r.set for r in rows}) > 1 else {})
    out.write(f"{path}: {len(rows)} rows; model threshold {threshold}\n")
    for name, group in groups.items():
        out.write(f"set {name}:\n")
        out.write(_line("model alone", score(group, lambda t, e: fires(t, e, threshold, model))))
        out.write(_line("rules alone", score(group, _rules)))
        out.write(_line("rules OR model", score(group, lambda t, e: _rules(t, e) or fires(t, e, threshold, model))))
    speed(out)


def speed(out=None, repeats: int = 200) -> None:
    out = out or sys.stdout
    from bianque import safety

    texts = ["我头疼三天了，一阵一阵的，晚上睡不好。", "孩子发烧38度5，精神还可以，吃饭少。" * 4,
             "没有胸痛，也没有呼吸困难，就是有点咳嗽。" * 10, "头痛三天了，一阵一阵的。" * 5000]
    earlier = ["我最近胃不太舒服。", "吃了饭以后更明显，有时候反酸。"]
    fires(texts[0], earlier)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for t in texts:
            _bucket.cache_clear()
            _normalise.cache_clear()
            fires(t, earlier)
    n = repeats * len(texts)
    out.write(f"speed: the model's decision (up to 3 windows, n-gram cache cleared) "
              f"{(time.perf_counter() - start) * 1000 / n:.3f} ms per message wall, "
              f"{(time.process_time() - cpu) * 1000 / n:.3f} ms CPU\n")
    with backstop_on():
        for label, (wall, cpu_ms) in safety.bench().items():
            out.write(f"speed: red_flags with the backstop on, {label}: {wall:.3f} ms per message wall, {cpu_ms:.3f} ms CPU\n")


THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def leave_one_set_out(data_dir: Path = DATA_DIR, thresholds: Sequence[float] = THRESHOLDS, out=None) -> dict:
    """Each set of ``TRAIN_SETS`` held out in turn: trained on the development set and the other sets,
    the model ALONE scored on the held-out set at each threshold. Returns {threshold: [(recall, fa)...]}."""
    out = out or sys.stdout
    rows = training_rows(data_dir)
    table: dict[float, list[tuple[float, float]]] = {t: [] for t in thresholds}
    out.write("held-out set | " + " | ".join(f"t={t}: recall / false alarms" for t in thresholds) + "\n")
    for held in TRAIN_SETS:
        model = as_model(*fit([r for r in rows if r.set != held]))
        test = [r for r in rows if r.set == held]
        cells = []
        for t in thresholds:
            recall, fa, _, _ = score(test, lambda x, e: fires(x, e, t, model))
            table[t].append((recall, fa))
            cells.append(f"{recall:.3f} / {fa:.3f}")
        out.write(f"set {held:>2} ({sum(r.label for r in test)}+{sum(1 - r.label for r in test)}) | " + " | ".join(cells) + "\n")
    for name, real in (("written sets", False), ("real messages", True)):  # averaged apart: unlike text
        chosen = [i for i, held in enumerate(TRAIN_SETS) if held.startswith("real-") == real]
        if chosen:
            means = [(sum(table[t][i][0] for i in chosen) / len(chosen), sum(table[t][i][1] for i in chosen) / len(chosen))
                     for t in thresholds]
            out.write(f"mean, {name} | " + " | ".join(f"{r:.3f} / {f:.3f}" for r, f in means) + "\n")
    return table


def train(data_dir: Path = DATA_DIR, path: Path = WEIGHTS) -> str:
    """Trains on the committed tables and writes ``path``; returns the file's sha256."""
    rows = training_rows(data_dir)
    weight, bias = fit(rows)
    save(weight, bias, path, data_hash(rows))
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bianque.safety_model", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="retrain on the committed tables and rewrite the weights file")
    p_train.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p_train.add_argument("--out", type=Path, default=WEIGHTS)
    p_eval = sub.add_parser("eval", help="recall / false alarms of the model, the rules and both on a table")
    p_eval.add_argument("--data", type=Path, required=True, help="a .tsv in the 4-field (or dev 2-field) format")
    p_eval.add_argument("--threshold", type=float, default=THRESHOLD)
    p_loso = sub.add_parser("loso", help="leave-one-set-out check of the model alone")
    p_loso.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            digest = train(args.data_dir, args.out)
            sys.stdout.write(f"wrote {args.out} (sha256 {digest})\n")
        elif args.command == "eval":
            evaluate(args.data, args.threshold)
        else:
            leave_one_set_out(args.data_dir)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

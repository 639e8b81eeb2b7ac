"""Fine-tune BianQue-1.0 (T5) on (input, target) rows: one CPU, one GPU, or many via accelerate.

    python -m bianque.finetune --data train.csv --model scutcyr/BianQue-1.0 --output runs/x
    accelerate launch -m bianque.finetune --data train.csv --output runs/x --mixed-precision bf16

Text goes through the same cleaning (``bianque.data.clean_text``) and the same tokenizer
(``bianque.t5.V1Tokenizer``, via ``load_questioner``) as inference, so training and serving never disagree. Batches are
padded to their own longest example; label padding is -100 so it never counts in the loss.

Data order is a pure function of (seed, epoch, rank, world size): ``--resume`` reloads model,
optimizer, scheduler and RNG from the last ``checkpoint-<step>/`` and skips the batches already
seen, so an interrupted run ends exactly where an uninterrupted one would. The output directory is
a plain Hugging Face checkpoint that ``bianque.t5.load_questioner`` and the CLI load directly.
Logs and metrics carry counts, losses and timings only, never the text of a row.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .convert import make_readable
from .data import DataError, Example, read_csv, split
from .errors import ModelLoadError
from .hub import V1_REPO, resolve_checkpoint
from .settings import HUB_ENV_VARS, env_help

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json")
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
# Settings that fix the data order and the step count; a resumed run must keep them.
ORDER_FIELDS = ("seed", "batch_size", "grad_accum", "sample_fraction", "train_ratio", "epochs", "max_steps")


class FinetuneError(ValueError):
    """A run cannot start or continue; the message says why and what to pass instead."""


@dataclass
class TrainConfig:
    data: Path
    output: Path
    model: str = V1_REPO
    val_data: Path | None = None
    input_column: str = "input"
    target_column: str = "target"
    max_source_length: int = 512
    max_target_length: int = 512
    lr: float = 5e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "constant"  # "constant" or "linear" (decay to 0), both after --warmup-steps
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # per device
    grad_accum: int = 1
    mixed_precision: str | None = None  # None: whatever `accelerate launch`/`accelerate config` set, else "no"
    seed: int = 42
    sample_fraction: float = 1.0
    train_ratio: float = 1.0  # the rest becomes the validation set when --val-data is not given
    save_steps: int | None = None
    save_total_limit: int | None = None
    eval_steps: int | None = None
    log_steps: int = 10
    resume: bool = False
    overwrite: bool = False
    cpu: bool = False  # train on the CPU even when a GPU is present


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, and windows of ``grad_accum`` batches done this epoch."""

    step: int = 0
    epoch: int = 0
    window: int = 0


# ---------------------------------------------------------------- data


def sample_examples(examples: Sequence[Example], cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """Seeded ``--sample-fraction`` subset, then the ``--train-ratio`` train/validation split."""
    if not 0.0 < cfg.sample_fraction <= 1.0:
        raise FinetuneError(f"--sample-fraction must be in (0, 1], got {cfg.sample_fraction}")
    if not 0.0 < cfg.train_ratio <= 1.0:
        raise FinetuneError(f"--train-ratio must be in (0, 1], got {cfg.train_ratio}")
    rows = list(examples)
    if cfg.sample_fraction < 1.0:
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        rows = [rows[i] for i in sorted(order[: max(1, round(len(rows) * cfg.sample_fraction))])]
    if cfg.train_ratio >= 1.0:
        return rows, []
    return split(rows, 1.0 - cfg.train_ratio, cfg.seed)


def encode_source(tokenizer, text: str, max_length: int) -> list[int]:
    """Prompt ids that fit ``max_length``, keeping the END (the newest turn and its ``医生：``).

    Inference fits a long dialogue by dropping its oldest turns, so the model must learn to
    answer the last message; cutting from the right (the tokenizer's default) would train it on
    prompts whose newest turn is missing.
    """
    ids = tokenizer.encode(text, max_length=None)
    if len(ids) <= max_length:
        return ids
    return ids[len(ids) - max_length : -1] + ids[-1:]  # the last id is </s>


def tokenize(examples: Sequence[Example], tokenizer, cfg: TrainConfig) -> list[tuple[list[int], list[int]]]:
    pairs = [(encode_source(tokenizer, ex.input, cfg.max_source_length),
              tokenizer.encode(ex.target, max_length=cfg.max_target_length)) for ex in examples]
    cut = sum(len(s) == cfg.max_source_length and tokenizer.count(ex.input) > cfg.max_source_length
              for ex, (s, _) in zip(examples, pairs))
    if cut:
        log.info("%d of %d prompts were longer than --max-source-length %d; kept their newest tokens",
                 cut, len(examples), cfg.max_source_length)
    return pairs


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest source/target; label padding is -100 (ignored by the loss)."""
    src_len = max(len(s) for s, _ in pairs)
    tgt_len = max(len(t) for _, t in pairs)
    input_ids = torch.tensor([s + [pad_id] * (src_len - len(s)) for s, _ in pairs])
    labels = torch.tensor([t + [-100] * (tgt_len - len(t)) for _, t in pairs])
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This process's batches of example indices for one epoch: a pure function of its arguments.

    The epoch's permutation is padded by wrapping (as DistributedSampler does) so every process
    gets the same number of batches, then dealt out round-robin.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    order += order[: (-len(order)) % world]
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def windows(batches: list[list[int]], grad_accum: int) -> list[list[list[int]]]:
    """Group batches into optimizer steps; the last window of an epoch may be shorter."""
    return [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]


def steps_per_epoch(n: int, cfg: TrainConfig, world: int) -> int:
    return len(windows(epoch_batches(n, cfg.batch_size, cfg.seed, 0, 0, world), cfg.grad_accum))


def schedule(n: int, cfg: TrainConfig, rank: int, world: int, start: Position, total: int) -> Iterator[tuple[Position, list, bool]]:
    """Yield (position after the step, its batches, whether it ends an epoch) from ``start`` on."""
    step, epoch, first = start.step, start.epoch, start.window
    while step < total:
        wins = windows(epoch_batches(n, cfg.batch_size, cfg.seed, epoch, rank, world), cfg.grad_accum)
        for w in range(first, len(wins)):
            step += 1
            last = w == len(wins) - 1
            yield Position(step, epoch + 1 if last else epoch, 0 if last else w + 1), wins[w], last
            if step >= total:
                return
        epoch, first = epoch + 1, 0


def fingerprint(examples: Sequence[Example]) -> str:
    """Identifies the training rows (not their text) so a resumed run can refuse changed data."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.input.encode() + b"\0" + ex.target.encode() + b"\1")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- output directory and checkpoints


def checkpoints(output: Path) -> list[Path]:
    found = [p for p in output.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def prepare_output(cfg: TrainConfig, model_dir: Path) -> None:
    """Refuse to clobber: an existing output needs --resume (continue) or --overwrite (start over)."""
    output = cfg.output
    if cfg.resume and cfg.overwrite:
        raise FinetuneError("--resume and --overwrite contradict each other; pass one")
    if output.resolve() == model_dir.resolve():
        raise FinetuneError(f"--output {output} is the base model's directory; choose a new directory")
    if output.exists() and not output.is_dir():
        raise FinetuneError(f"--output {output} is a file; choose a directory")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if cfg.resume:
        found = checkpoints(output)
        if found:
            forget_metrics_after(output, int(found[-1].name.split("-")[1]))
        else:
            log.warning("%s has no checkpoint-<step>/ yet: starting from step 0", output)
        return
    if not cfg.overwrite:
        raise FinetuneError(f"--output {output} already exists; pass --resume to continue from its last "
                            "checkpoint or --overwrite to start over")
    for old in checkpoints(output) + list(output.glob("checkpoint-*.tmp")):  # only this tool's own files
        shutil.rmtree(old)
    (output / METRICS_FILE).unlink(missing_ok=True)


def forget_metrics_after(output: Path, step: int) -> None:
    """Drop metrics of steps after the checkpoint: the resumed run writes them again."""
    path = output / METRICS_FILE
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def save_model(model, directory: Path, tokenizer_dir: Path) -> None:
    """A plain HF checkpoint: config.json, model.safetensors and the base model's tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for weights in directory.glob("*.safetensors"):
        make_readable(weights)
    keep_untied_flag(directory / "config.json", tokenizer_dir / "config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, directory / name)


def keep_untied_flag(saved: Path, base: Path) -> None:
    """Write the base config's ``tie_word_embeddings`` back into the saved config.

    transformers 5.x always saves ``true`` (it keeps the T5 v1.1 "do not scale" fact in its own
    ``scale_decoder_outputs``), but transformers 4.x, the 2023 apps and other tools read
    ``true`` as T5 v1.0: they would tie the separate head and scale the outputs.
    """
    base_config = json.loads(base.read_text(encoding="utf-8")) if base.is_file() else {}
    if "tie_word_embeddings" in base_config:
        config = json.loads(saved.read_text(encoding="utf-8"))
        config["tie_word_embeddings"] = base_config["tie_word_embeddings"]
        _write_json(saved, config)


def save_checkpoint(run, position: Position) -> None:
    """``checkpoint-<step>/``: the model (loadable as is), optimizer, scheduler, RNG, data position.

    Written under ``checkpoint-<step>.tmp`` and renamed when complete, so an interruption while
    saving never leaves a half checkpoint for ``--resume`` to pick.
    """
    acc, final = run.accelerator, run.cfg.output / f"checkpoint-{position.step}"
    directory = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        save_model(acc.unwrap_model(run.model), directory, run.model_dir)
        torch.save(run.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(run.scheduler.state_dict(), directory / "scheduler.pt")
        if acc.scaler is not None:
            torch.save(acc.scaler.state_dict(), directory / "scaler.pt")
        state = {**dataclasses.asdict(position), "world_size": acc.num_processes, "data": run.data_id,
                 **{k: getattr(run.cfg, k) for k in ORDER_FIELDS}}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    acc.wait_for_everyone()  # the directory exists before every rank writes its RNG state
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, directory / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        directory.rename(final)
        prune_checkpoints(run.cfg.output, run.cfg.save_total_limit)
    acc.wait_for_everyone()


def prune_checkpoints(output: Path, limit: int | None) -> None:
    if limit is None:
        return
    found = checkpoints(output)
    for old in found[: max(0, len(found) - limit)]:
        shutil.rmtree(old)


def read_state(checkpoint: Path, cfg: TrainConfig, world: int, data_id: str) -> Position:
    """The saved position, after checking that this run would replay the same data order."""
    needed = [STATE_FILE, "optimizer.pt", "scheduler.pt"] + [f"rng-{rank}.pt" for rank in range(world)]
    missing = [name for name in needed if not (checkpoint / name).is_file()]
    if missing:
        raise FinetuneError(f"cannot resume from {checkpoint}: it lacks {', '.join(missing)} (or was written by "
                            "a different number of processes); delete it to resume from an earlier checkpoint")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    changed = [k for k in ORDER_FIELDS if state[k] != getattr(cfg, k)]
    changed += ["world size (number of processes)"] if state["world_size"] != world else []
    changed += ["training data"] if state["data"] != data_id else []
    if changed:
        raise FinetuneError(f"cannot resume from {checkpoint}: {', '.join(changed)} differ from that run; "
                            "resume with the same settings or start a new --output")
    return Position(state["step"], state["epoch"], state["window"])


def restore(run, checkpoint: Path) -> None:
    """Optimizer, scheduler and RNG as they were when ``checkpoint`` was written (weights_only loads)."""
    load = lambda name: torch.load(checkpoint / name, map_location="cpu", weights_only=True)  # noqa: E731
    run.optimizer.load_state_dict(load("optimizer.pt"))
    run.scheduler.load_state_dict(load("scheduler.pt"))
    if run.accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
        run.accelerator.scaler.load_state_dict(load("scaler.pt"))
    rng = load(f"rng-{run.accelerator.process_index}.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---------------------------------------------------------------- the training loop


@dataclass
class Run:
    """Everything one training run holds; built by :func:`setup`, driven by :func:`train`."""

    cfg: TrainConfig
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    model_dir: Path
    train_pairs: list
    val_pairs: list
    data_id: str
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    start: Position = Position()


@dataclass(frozen=True)
class TrainResult:
    output: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    examples_per_s: float


def check_config(cfg: TrainConfig) -> None:
    positive = {"--batch-size": cfg.batch_size, "--grad-accum": cfg.grad_accum, "--epochs": cfg.epochs,
                "--log-steps": cfg.log_steps, "--max-source-length": cfg.max_source_length,
                "--max-target-length": cfg.max_target_length}
    optional = {"--max-steps": cfg.max_steps, "--save-steps": cfg.save_steps,
                "--eval-steps": cfg.eval_steps, "--save-total-limit": cfg.save_total_limit}
    bad = [f"{k} {v}" for k, v in positive.items() if v < 1] + [f"{k} {v}" for k, v in optional.items() if v is not None and v < 1]
    if bad:
        raise FinetuneError(f"these settings must be at least 1: {', '.join(bad)}")
    if cfg.scheduler not in ("constant", "linear"):
        raise FinetuneError(f"--scheduler must be constant or linear, got {cfg.scheduler!r}")
    if cfg.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise FinetuneError(f"--mixed-precision must be fp16, bf16 or no, got {cfg.mixed_precision!r}")
    if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise FinetuneError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")


def load_data(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    data = read_csv(cfg.data, cfg.input_column, cfg.target_column)
    log.info(data.summary(str(cfg.data)))
    if not data.examples:
        raise DataError(f"{cfg.data} has no usable rows (every row has an empty input or target)")
    train_rows, val_rows = sample_examples(data.examples, cfg)
    if cfg.val_data is not None:
        val = read_csv(cfg.val_data, cfg.input_column, cfg.target_column)
        log.info(val.summary(str(cfg.val_data)))
        val_rows = val_rows + val.examples
    return train_rows, val_rows


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    if cfg.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)


def setup(cfg: TrainConfig) -> Run:
    """Check settings, read and tokenize the data, build model/optimizer/scheduler, restore a checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .t5 import load_questioner

    check_config(cfg)
    # accelerate only runs CPU processes as one DDP group (gloo) when told cpu=True; without a GPU
    # `torchrun`/`accelerate launch` would otherwise start N independent single-process runs.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu or not torch.cuda.is_available())
    set_seed(cfg.seed)
    model_dir = resolve_checkpoint(cfg.model, "--model")
    resume_from = _prepare_output_once(accelerator, cfg, model_dir)
    train_rows, val_rows = load_data(cfg)
    world = accelerator.num_processes
    per_epoch = steps_per_epoch(len(train_rows), cfg, world)
    total = cfg.max_steps or cfg.epochs * per_epoch
    # the v1 loader: loud on missing/mis-shaped tensors and a tokenizer from another checkpoint.
    # fp32 master weights (and optimizer state); mixed precision autocasts on top.
    questioner = load_questioner(str(resume_from or model_dir), device="cpu", dtype="float32", pack=False)
    model, tokenizer = questioner.model.train(), questioner.tokenizer
    pad_id = model.config.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = Run(cfg, accelerator, model, optimizer, scheduler, model_dir, tokenize(train_rows, tokenizer, cfg),
              tokenize(val_rows, tokenizer, cfg), fingerprint(train_rows), pad_id, per_epoch, total)
    if resume_from is not None:
        run.start = read_state(resume_from, cfg, world, run.data_id)
        restore(run, resume_from)
        log.info("resuming from %s (step %d of %d)", resume_from.name, run.start.step, total)
    log.info("%d training and %d validation examples, %d processes, %d optimizer steps",
             len(train_rows), len(val_rows), world, total)
    return run


def _prepare_output_once(accelerator, cfg: TrainConfig, model_dir: Path) -> Path | None:
    """The main process checks (and for --overwrite cleans) the output; every process learns the checkpoint.

    Nothing is created here: a run that then fails on its data leaves no directory behind.
    """
    if accelerator.is_main_process:
        prepare_output(cfg, model_dir)
    accelerator.wait_for_everyone()
    found = checkpoints(cfg.output) if cfg.resume and cfg.output.is_dir() else []
    return found[-1] if found else None


def start_output(run: Run) -> None:
    """Create the output directory and record the settings next to the model (main process)."""
    if run.accelerator.is_main_process:
        run.cfg.output.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(run.cfg).items()}
        _write_json(run.cfg.output / "finetune_config.json", settings)
    run.accelerator.wait_for_everyone()


def train_step(run: Run, window: list[list[int]]) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, examples on this process)."""
    acc, total_loss = run.accelerator, 0.0
    for i, batch_ids in enumerate(window):
        batch = collate([run.train_pairs[j] for j in batch_ids], run.pad_id)
        # DDP all-reduces gradients once per optimizer step, on its last micro-batch
        with acc.no_sync(run.model) if i < len(window) - 1 else contextlib.nullcontext():
            loss = run.model(**{k: v.to(acc.device) for k, v in batch.items()}).loss
            acc.backward(loss / len(window))
        total_loss += loss.item()
    if run.cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total_loss / len(window), sum(len(b) for b in window)


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Token-level validation loss over all processes' shares of the validation set."""
    acc, model = run.accelerator, run.model
    model.eval()
    totals = torch.zeros(2, device=acc.device)  # summed token loss, token count
    mine = list(range(acc.process_index, len(run.val_pairs), acc.num_processes))
    for i in range(0, len(mine), run.cfg.batch_size):
        batch = collate([run.val_pairs[j] for j in mine[i : i + run.cfg.batch_size]], run.pad_id)
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        tokens = (batch["labels"] != -100).sum()
        totals += torch.stack([model(**batch).loss.float() * tokens, tokens.float()])
    model.train()
    totals = acc.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()


class Progress:
    """The progress bar and ``<output>/metrics.jsonl`` (JSON lines, main process, appended on resume)."""

    def __init__(self, run: Run):
        from tqdm.auto import tqdm

        self.run, self.main = run, run.accelerator.is_main_process
        self.bar = tqdm(total=run.total_steps, initial=run.start.step, disable=not self.main, desc="fine-tuning")
        self.losses, self.examples, self.since = [], 0, time.perf_counter()
        self.started, self.seen = time.perf_counter(), 0
        self.train_loss = self.val_loss = None
        self.eval_step = -1
        self.done = run.start.step  # optimizer steps completed

    def step(self, position: Position, loss: float, examples: int) -> None:
        run, self.done = self.run, position.step
        self.losses.append(loss)
        self.examples += examples * run.accelerator.num_processes
        self.seen += examples * run.accelerator.num_processes
        self.bar.update(1)
        if position.step % run.cfg.log_steps == 0 or position.step == run.total_steps:
            self.log_train(position)

    def log_train(self, position: Position) -> None:
        acc = self.run.accelerator
        mean = torch.tensor(sum(self.losses) / len(self.losses), device=acc.device)
        self.train_loss = acc.reduce(mean, reduction="mean").item()
        rate = self.examples / max(time.perf_counter() - self.since, 1e-9)
        lr = self.run.scheduler.get_last_lr()[0]
        self.write(kind="train", step=position.step, epoch=self.epoch(position), loss=self.train_loss, lr=lr,
                   examples_per_s=rate)
        self.bar.set_postfix(loss=f"{self.train_loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.1f}")
        self.losses, self.examples, self.since = [], 0, time.perf_counter()

    def evaluate(self, position: Position) -> None:
        if self.run.val_pairs and self.eval_step != position.step:
            self.val_loss, self.eval_step = evaluate(self.run), position.step
            self.write(kind="eval", step=position.step, epoch=self.epoch(position), val_loss=self.val_loss)

    def epoch(self, position: Position) -> float:
        return round(position.epoch + position.window / self.run.steps_per_epoch, 4)

    def write(self, **record) -> None:
        if self.main:
            with (self.run.cfg.output / METRICS_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def rate(self) -> float:
        return self.seen / max(time.perf_counter() - self.started, 1e-9)


def train(cfg: TrainConfig) -> TrainResult:
    """Run the whole fine-tuning described by ``cfg``; returns where the model went and its losses."""
    run = setup(cfg)
    start_output(run)
    acc, progress, position = run.accelerator, Progress(run), run.start
    run.model.train()
    try:
        for position, window, epoch_end in schedule(len(run.train_pairs), cfg, acc.process_index,
                                                    acc.num_processes, run.start, run.total_steps):
            progress.step(position, *train_step(run, window))
            if epoch_end or (cfg.eval_steps and position.step % cfg.eval_steps == 0):
                progress.evaluate(position)
            if cfg.save_steps and position.step % cfg.save_steps == 0:
                save_checkpoint(run, position)
    except KeyboardInterrupt:
        found = checkpoints(cfg.output)
        where = f"--resume continues from {found[-1].name}" if found else "no checkpoint was saved yet (see --save-steps)"
        log.warning("interrupted after %d steps; %s", progress.done, where)
        raise
    finally:
        progress.bar.close()
    progress.evaluate(position)  # a run stopped by --max-steps mid-epoch still reports its validation loss
    if acc.is_main_process:
        save_model(acc.unwrap_model(run.model), cfg.output, run.model_dir)
    acc.wait_for_everyone()
    log.info("saved %s after %d steps (%.1f examples/s)", cfg.output, position.step, progress.rate())
    return TrainResult(cfg.output, position.step, progress.train_loss, progress.val_loss, progress.rate())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig(data=Path(), output=Path())  # the defaults, shown in --help
    p = argparse.ArgumentParser(prog="bianque-finetune", description="Fine-tune BianQue-1.0 on input,target CSV rows "
                                "(docs/finetuning.md). Several GPUs: accelerate launch -m bianque.finetune ...",
                                epilog=env_help(list(HUB_ENV_VARS)), formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--data", required=True, type=Path, help="training CSV with columns input, target")
    add("--output", required=True, type=Path, help="directory for checkpoints and the final model")
    add("--model", default=d.model, help=f"base checkpoint, hub id or local directory (default {d.model})")
    add("--val-data", type=Path, help="validation CSV (default: the rows --train-ratio leaves out)")
    add("--input-column", default=d.input_column, help="default: input")
    add("--target-column", default=d.target_column, help="default: target")
    add("--max-source-length", type=int, default=d.max_source_length, help="prompt tokens kept, newest first (512)")
    add("--max-target-length", type=int, default=d.max_target_length, help="reply tokens kept (512)")
    add("--lr", type=float, default=d.lr, help="AdamW learning rate (5e-5)")
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (0)")
    add("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping, 0 turns it off (1.0)")
    add("--scheduler", choices=("constant", "linear"), default=d.scheduler, help="after the warm-up (constant)")
    add("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (0)")
    add("--epochs", type=int, default=d.epochs, help="passes over the data (1)")
    add("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    add("--batch-size", type=int, default=d.batch_size, help="examples per process and micro-batch (8)")
    add("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (1)")
    add("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: accelerate's setting, else no")
    add("--seed", type=int, default=d.seed, help="data order, sampling and splits (42)")
    add("--sample-fraction", type=float, default=d.sample_fraction, help="seeded share of the rows to use (1.0)")
    add("--train-ratio", type=float, default=d.train_ratio, help="share kept for training, the rest validates (1.0)")
    add("--save-steps", type=int, help="write checkpoint-<step>/ every N steps")
    add("--save-total-limit", type=int, help="keep only the newest N checkpoints")
    add("--eval-steps", type=int, help="validation loss every N steps (always at each epoch end)")
    add("--log-steps", type=int, default=d.log_steps, help="metrics every N steps (10)")
    add("--resume", action="store_true", help="continue from the last checkpoint in --output")
    add("--overwrite", action="store_true", help="start over in an existing --output")
    add("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    main_process = os.environ.get("RANK", "0") == "0"  # set by torchrun / accelerate launch
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    try:
        result = train(cfg)
    except (DataError, FinetuneError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: out of memory at --batch-size {cfg.batch_size}; lower it (raise --grad-accum to keep the "
              "global batch), shorten --max-source-length, or use --mixed-precision bf16", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if main_process:
        print(f"saved {result.output} ({result.steps} steps, {result.examples_per_s:.1f} examples/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

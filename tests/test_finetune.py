"""bianque.finetune on a tiny T5: batching, data order, training, checkpoints, resume, the CLI."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bianque.data import Example, dialogue_examples, write_csv
from bianque.finetune import (
    FinetuneError,
    Position,
    TrainConfig,
    collate,
    encode_source,
    epoch_batches,
    main,
    parse_args,
    schedule,
    tokenize,
    train,
)
from bianque.prompt import DOCTOR, PATIENT, Turn
from bianque.sampling import SamplingParams
from bianque.t5 import V1Params, load_questioner, load_tokenizer
from tiny_t5 import build_tiny_t5

ROWS = [
    Example("病人：头疼三天了\\n医生：", "多久了？"),
    Example("病人：我咳嗽一周了\\n医生：", "有没有发热？"),
    Example("病人：孩子发烧\\n医生：多久了？\\n病人：今天早上开始\\n医生：", "建议多喝水，注意休息。"),
    Example("病人：最近失眠\\n医生：", "晚上睡得怎么样？"),
    Example("病人：腹痛\\n医生：", "疼痛在什么部位？"),
    Example("病人：老人头晕\\n医生：", "有无过敏史？"),
    Example("病人：一直恶心\\n医生：吃过什么药吗？\\n病人：没有\\n医生：", "建议到医院做个检查。"),
    Example("病人：牙疼好几年了\\n医生：", "以前有过类似情况吗？"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def config(tmp_path: Path, model: Path, rows=ROWS, **overrides) -> TrainConfig:
    data = tmp_path / "train.csv"
    if not data.exists():
        write_csv(data, rows)
    base = TrainConfig(data=data, output=tmp_path / "run", model=str(model), batch_size=2, lr=3e-3,
                       log_steps=1, seed=7)
    return replace(base, **overrides)


def metrics(output: Path, kind: str = "train") -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ---------------------------------------------------------------- pure pieces


def test_collate_pads_each_batch_to_its_own_longest():
    batch = collate([([5, 6, 1], [7, 1]), ([5, 1], [7, 8, 9, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100, -100], [7, 8, 9, 1]]


def test_epoch_batches_are_seeded_and_shard_evenly():
    first = epoch_batches(10, 3, seed=1, epoch=0)
    assert first == epoch_batches(10, 3, seed=1, epoch=0)
    assert first != epoch_batches(10, 3, seed=1, epoch=1) and first != epoch_batches(10, 3, seed=2, epoch=0)
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [3, 3, 3, 1]
    ranks = [epoch_batches(10, 2, seed=1, epoch=0, rank=r, world=3) for r in range(3)]
    assert [len(r) for r in ranks] == [2, 2, 2]  # 10 wrapped to 12 examples, 4 per process
    assert set(sum(sum(ranks, []), [])) == set(range(10))


def test_schedule_from_a_saved_position_replays_the_rest_of_an_uninterrupted_run():
    cfg = TrainConfig(data=Path(), output=Path(), batch_size=2, grad_accum=2, seed=3)
    full = list(schedule(7, cfg, 0, 1, Position(), total=7))
    assert [p.step for p, _, _ in full] == list(range(1, 8))
    assert [end for _, _, end in full] == [False, True] * 3 + [False]  # 4 batches = 2 steps per epoch
    at = full[2][0]  # the position saved after step 3
    assert at == Position(step=3, epoch=1, window=1)
    assert list(schedule(7, cfg, 0, 1, at, total=7)) == full[3:]


def test_long_prompts_keep_their_newest_tokens(tokenizer):
    text = "病人：" + "头疼三天了，" * 40 + "\\n医生：多久了？\\n病人：晚上头晕\\n医生："
    full = tokenizer.encode(text, max_length=None)
    ids = encode_source(tokenizer, text, max_length=32)
    assert len(full) > 32 and ids == full[-32:] and ids[-1] == 1  # the end, </s> included
    assert tokenizer.decode(ids).endswith("病人：晚上头晕\\n医生：")
    short = "病人：头疼\\n医生："
    assert encode_source(tokenizer, short, max_length=32) == tokenizer.encode(short, max_length=None)


def test_training_ids_equal_the_ids_the_questioner_sends(tiny_model):
    """Builder row -> training tokenization gives exactly the ids inference feeds the model."""
    dialogue = [Turn(PATIENT, "头疼三天了"), Turn(DOCTOR, "有没有发热？"), Turn(PATIENT, "没有\n就是疼"),
                Turn(DOCTOR, "建议多喝水。"), Turn(PATIENT, "好的")]
    questioner = load_questioner(str(tiny_model))
    examples, _ = dialogue_examples(dialogue)
    pairs = tokenize(examples, questioner.tokenizer, TrainConfig(data=Path(), output=Path()))
    assert [src for src, _ in pairs] == [questioner.prompt_ids(dialogue[:1]), questioner.prompt_ids(dialogue[:3])]
    # the target is what the model must produce: decoding it gives the reply text back (escaped form)
    assert [questioner.tokenizer.decode(tgt) for _, tgt in pairs] == ["有没有发热？", "建议多喝水。"]


# ---------------------------------------------------------------- training runs


def test_loss_falls_on_a_repeated_batch_and_the_output_chats(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, rows=ROWS[:4], batch_size=4, epochs=8, lr=1e-2)
    result = train(cfg)
    losses = [r["loss"] for r in metrics(cfg.output)]
    assert result.steps == 8 and len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses
    for name in ("config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"):
        assert (cfg.output / name).is_file(), name
    assert json.loads((cfg.output / "config.json").read_text())["tie_word_embeddings"] is False
    questioner = load_questioner(str(cfg.output))
    greedy = V1Params(max_new_tokens=8, sampling=SamplingParams(False))
    replies = ["".join(questioner.reply([Turn(PATIENT, text)], greedy)) for text in ("头疼三天了", "我咳嗽一周了", "最近失眠")]
    assert replies == ["多久了？", "有没有发热？", "晚上睡得怎么样？"]  # the trained targets, learnt


def test_validation_loss_is_logged_each_epoch_and_every_n_steps(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, epochs=2, train_ratio=0.75, eval_steps=2, log_steps=2)
    result = train(cfg)
    evals = metrics(cfg.output, "eval")
    # 6 training rows, batch 2: 3 steps per epoch; evaluated at steps 2, 3 (epoch end), 4, 6
    assert [e["step"] for e in evals] == [2, 3, 4, 6]
    assert all(e["val_loss"] > 0 for e in evals) and result.val_loss == evals[-1]["val_loss"]
    trains = metrics(cfg.output)
    assert [t["step"] for t in trains] == [2, 4, 6] and all(t["examples_per_s"] > 0 for t in trains)


def with_dropout(model_dir: Path, target: Path) -> Path:
    """The tiny model with dropout on, so a resumed run must also restore the RNG to match."""
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.2}))
    return target


def test_resume_continues_from_the_saved_step_like_an_uninterrupted_run(tmp_path, tiny_model):
    model = with_dropout(tiny_model, tmp_path / "dropout_model")
    whole = config(tmp_path, model, max_steps=6, save_steps=2, scheduler="linear", warmup_steps=1,
                   grad_accum=2, batch_size=1, train_ratio=0.75)
    train(whole)
    # "interrupted" after step 4: only what existed then (checkpoint-4 and earlier metrics, plus junk after)
    cut = replace(whole, output=tmp_path / "cut")
    cut.output.mkdir()
    shutil.copytree(whole.output / "checkpoint-4", cut.output / "checkpoint-4")
    shutil.copyfile(whole.output / "metrics.jsonl", cut.output / "metrics.jsonl")
    with pytest.raises(FinetuneError, match="already exists; pass --resume"):
        train(cut)
    result = train(replace(cut, resume=True))
    assert result.steps == 6
    a, b = metrics(whole.output), metrics(cut.output)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # steps 5-6 were dropped from the log, then redone
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    assert [r["lr"] for r in b] == pytest.approx([r["lr"] for r in a])
    final_a, final_b = load_file(whole.output / "model.safetensors"), load_file(cut.output / "model.safetensors")
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], msg=name)
    state = json.loads((cut.output / "checkpoint-6" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["window"]) == (6, 2, 0)  # 3 rows/accum 2: 2 steps per epoch


def test_resume_refuses_settings_that_change_the_data_order(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, max_steps=2, save_steps=2)
    train(cfg)
    with pytest.raises(FinetuneError, match="batch_size differ"):
        train(replace(cfg, resume=True, batch_size=3))
    write_csv(cfg.data, ROWS[:5])
    with pytest.raises(FinetuneError, match="training data differ"):
        train(replace(cfg, resume=True))
    result = train(replace(cfg, overwrite=True, max_steps=1))
    assert result.steps == 1 and not (cfg.output / "checkpoint-2").exists()


def test_resume_skips_half_written_checkpoints_and_refuses_incomplete_ones(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, max_steps=3, save_steps=1)
    train(cfg)
    assert not list(cfg.output.glob("*.tmp"))  # every checkpoint was completed and renamed
    shutil.rmtree(cfg.output / "checkpoint-3")
    shutil.copytree(cfg.output / "checkpoint-2", cfg.output / "checkpoint-3.tmp")  # a save cut short
    assert train(replace(cfg, resume=True)).steps == 3
    assert [r["step"] for r in metrics(cfg.output)] == [1, 2, 3]
    (cfg.output / "checkpoint-3" / "optimizer.pt").unlink()
    with pytest.raises(FinetuneError, match=r"checkpoint-3: it lacks optimizer.pt.*delete it"):
        train(replace(cfg, resume=True))


def test_resume_without_a_checkpoint_starts_at_step_zero(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, max_steps=2)
    cfg.output.mkdir()
    (cfg.output / "notes.txt").write_text("mine")
    assert train(replace(cfg, resume=True)).steps == 2
    assert (cfg.output / "notes.txt").read_text() == "mine"


def test_two_processes_share_the_data_and_resume_needs_the_same_count(tmp_path, tiny_model):
    """`torchrun --nproc_per_node 2` on CPU: one gloo DDP group, not two independent runs."""
    cfg = config(tmp_path, tiny_model, max_steps=3, save_steps=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "bianque.finetune", "--data", str(cfg.data), "--model", str(tiny_model), "--output",
               str(cfg.output), "--batch-size", "2", "--max-steps", "3", "--save-steps", "2", "--log-steps", "1",
               "--seed", "7", "--lr", "3e-3"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("saved") == 1  # only rank 0 reports
    # 8 rows over 2 processes x batch 2: 2 steps per epoch, one metrics line per step
    assert [(r["step"], r["epoch"]) for r in metrics(cfg.output)] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    checkpoint = cfg.output / "checkpoint-2"
    assert (checkpoint / "rng-0.pt").is_file() and (checkpoint / "rng-1.pt").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    with pytest.raises(FinetuneError, match="world size"):
        train(replace(cfg, resume=True))


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, max_steps=5, save_steps=1, save_total_limit=2)
    train(cfg)
    assert sorted(p.name for p in cfg.output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert load_questioner(str(cfg.output / "checkpoint-5")).name == "BianQue-1.0"  # checkpoints load as models


def test_sample_fraction_and_train_ratio(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, sample_fraction=0.5, train_ratio=0.5, epochs=1, batch_size=1)
    result = train(cfg)
    assert result.steps == 2  # 8 rows -> 4 sampled -> 2 train + 2 validation
    assert len(metrics(cfg.output, "eval")) == 1


# ---------------------------------------------------------------- command line


def test_parse_args_defaults_mirror_the_original_script():
    cfg = parse_args(["--data", "d.csv", "--output", "runs/x"])
    assert (cfg.model, cfg.max_source_length, cfg.max_target_length, cfg.lr, cfg.scheduler) == (
        "scutcyr/BianQue-1.0", 512, 512, 5e-5, "constant")
    cfg = parse_args(["--data", "d.csv", "--output", "o", "--max-steps", "3", "--mixed-precision", "bf16",
                      "--input-column", "q", "--target-column", "a", "--resume"])
    assert (cfg.max_steps, cfg.mixed_precision, cfg.input_column, cfg.target_column, cfg.resume) == (3, "bf16", "q", "a", True)


def test_main_reports_bad_input_in_one_line(tmp_path, tiny_model, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("prompt,target\n病人：头疼\\n医生：,多久了？\n", encoding="utf-8")
    base = ["--data", str(csv), "--model", str(tiny_model), "--output", str(tmp_path / "o")]
    assert main(base) == 2
    assert "has no column 'input'" in capsys.readouterr().err
    csv.write_bytes("input,target\n".encode() + "病人：头疼,多久了\n".encode("gbk"))
    assert main(base) == 2
    assert "is not UTF-8" in capsys.readouterr().err
    assert main(base[:4] + ["--output", str(tmp_path / "o2"), "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
    assert main(base[:2] + ["--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o3")]) == 2
    assert "could not load" in capsys.readouterr().err
    assert main(base[:4] + ["--output", str(tmp_path / "o4"), "--mixed-precision", "fp16", "--cpu"]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("o", "o2", "o3", "o4"))  # failed runs leave nothing


def test_fine_tuned_output_chats_in_the_cli(tmp_path, tiny_model, capsys, monkeypatch):
    """The three user commands: JSONL -> CSV -> checkpoint -> `bianque chat` (in-process, same argv)."""
    from bianque import cli, data

    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text("".join(json.dumps([{"role": "patient", "text": ex.input[3:-5]},
                                             {"role": "doctor", "text": ex.target}], ensure_ascii=False) + "\n"
                                 for ex in ROWS[:2]), encoding="utf-8")
    assert data.main(["build", "--in", str(dialogues), "--out", str(tmp_path / "train.csv")]) == 0
    assert main(["--data", str(tmp_path / "train.csv"), "--model", str(tiny_model),
                 "--output", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "2"]) == 0
    printed = capsys.readouterr()
    assert "2 rows" in printed.out and "2 steps" in printed.out
    assert "头疼" not in printed.out + printed.err  # metadata only, never patient text
    monkeypatch.setattr(sys, "stdin", io.StringIO("头疼三天了\n"))
    argv = ["chat", "--mode", "v1", "--v1-model", str(tmp_path / "out"), "--json", "--greedy",
            "--device", "cpu", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trained = load_questioner(str(tmp_path / "out"))  # the checkpoint the CLI loaded, asked here
    expected = "".join(trained.reply([Turn(PATIENT, "头疼三天了")], V1Params(max_new_tokens=6, sampling=SamplingParams(False))))
    assert expected and reply == {"stage": "question", "model": "v1", "text": expected, "red_flags": []}


def test_saved_weights_are_readable_by_others(tmp_path, tiny_model):
    import stat

    from bianque.finetune import save_model
    from bianque.t5 import load_questioner

    model = load_questioner(str(tiny_model)).model
    old = os.umask(0o022)
    try:
        save_model(model, tmp_path / "out", tiny_model)
    finally:
        os.umask(old)
    weights = list((tmp_path / "out").glob("*.safetensors"))
    assert weights and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in weights)

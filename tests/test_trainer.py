"""Pre-training loop: metrics, exact resume after SIGKILL, damaged checkpoints, recipe errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openk2.config import ConfigError
from openk2.recipe import load_recipe
from openk2.train.checkpoint import latest_checkpoint, list_checkpoints
from openk2.train.metrics import read_metrics

SMALL = [
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.q_lora_rank=32", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.vocab_size=1024",
    "train.seq_len=32", "train.batch_size=4", "train.micro_batch_size=2", "train.eval_every=5",
    "train.eval_batches=2", "train.threads=1", "optim.lr=0.01", "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the king queen sword crown night day love war peace river stone fire storm".split()
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    with path.open("w") as f:
        for _ in range(400):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "."
            f.write(json.dumps({"text": text}) + "\n")
    return path


def run_pretrain(out: Path, corpus: Path, *extra: str, wait: bool = True,
                 command: str = "pretrain") -> subprocess.Popen:
    args = [sys.executable, "-m", "openk2", command, "--out", str(out), "--set", f"data.source={corpus}"]
    for item in SMALL + list(extra):
        args += [item] if item.startswith("--") else ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if wait:
        output, _ = proc.communicate(timeout=600)
        proc.output = output
        assert proc.returncode == 0, output
    return proc


def test_speedrun_writes_the_report(tmp_path, corpus):
    run = tmp_path / "speedrun"
    run_pretrain(run, corpus, "train.steps=5", "train.checkpoint_every=0", command="speedrun")
    report = (run / "report.md").read_text()
    for needle in ("final validation loss (nats/token)", "unigram baseline (bits per byte)",
                   "largest rise of the smoothed training loss", "![loss](pretrain_loss.png)", "Samples"):
        assert needle in report, needle
    assert (run / "pretrain_loss.png").is_file() and (run / "pretrain_max_logit.png").is_file()
    assert (run / "pretrain" / "final" / "config.json").is_file()
    assert json.loads((run / "speedrun.json").read_text())["pretrain"]["val_loss"] > 0


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def test_metrics_and_outputs(tmp_path, corpus):
    run = tmp_path / "run"
    run_pretrain(run, corpus, "train.steps=6", "train.checkpoint_every=3")
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "max_logit", "clipped_heads"):
        assert all(key in r for r in records), key
    assert [r["step"] for r in records if "val_loss" in r] == [5, 6]
    assert records[-1]["tokens"] == 6 * 4 * 32
    assert (run / "final" / "config.json").is_file() and (run / "final" / "tokenizer.json").is_file()
    assert [p.name for p in list_checkpoints(run)] == ["step_0000003"]


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, corpus):
    steps = ["train.steps=24", "train.checkpoint_every=4", "train.keep_checkpoints=3"]
    reference = tmp_path / "reference"
    run_pretrain(reference, corpus, *steps)

    run = tmp_path / "killed"
    proc = run_pretrain(run, corpus, *steps, wait=False)
    deadline = time.time() + 300
    while not list_checkpoints(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_metrics(run / "metrics.jsonl"))
    assert killed_at < 24, "the run finished before it could be killed"
    checkpoint_step = int(latest_checkpoint(run).name.split("_")[1])

    resumed = run_pretrain(run, corpus, *steps, "--resume")
    assert f"(step {checkpoint_step})" in resumed.output
    # Bitwise equal losses, the whole run through.
    assert losses(run) == losses(reference)


@pytest.mark.slow
def test_damaged_checkpoints_are_skipped(tmp_path, corpus):
    steps = ["train.steps=16", "train.checkpoint_every=4", "train.keep_checkpoints=3"]
    reference = tmp_path / "reference"
    run_pretrain(reference, corpus, *steps)

    run = tmp_path / "run"
    run_pretrain(run, corpus, *steps)
    oldest, middle, newest = list_checkpoints(run)
    assert [p.name for p in (oldest, middle, newest)] == ["step_0000004", "step_0000008", "step_0000012"]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    optimizer = middle / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    optimizer.write_bytes(bytes(data))
    resumed = run_pretrain(run, corpus, *steps, "--resume")
    assert "skipping checkpoint" in resumed.output and "step_0000012" in resumed.output
    assert "step_0000008" in resumed.output and "checksum" in resumed.output
    assert "(step 4)" in resumed.output
    assert losses(run) == losses(reference)


def test_unknown_recipe_key_is_named():
    with pytest.raises(ConfigError, match="train.stepz is not a known key"):
        load_recipe(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="optim"):
        load_recipe(None, ["optim.nme=adamw"])
    with pytest.raises(ConfigError, match="multiple of"):
        load_recipe(None, ["train.batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="should be int"):
        load_recipe(None, ["train.steps=many"])


def test_cli_reports_bad_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    result = subprocess.run([sys.executable, "-m", "openk2", "pretrain", "--out", str(tmp_path / "r"),
                             "--set", f"data.source={bad}", "--set", "model.vocab_size=1024"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "bad.jsonl:2" in result.stdout + result.stderr


def test_cli_errors_print_brackets_verbatim(tmp_path):
    """Error text quoting recipe sections ([train]) is not eaten as console markup."""
    result = subprocess.run([sys.executable, "-m", "openk2", "pretrain", "--out", str(tmp_path / "r"),
                             "--set", "train.stepz=3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "[train] takes steps" in " ".join((result.stdout + result.stderr).split())


def test_bfloat16_autocast(tmp_path, corpus):
    run = tmp_path / "bf16"
    run_pretrain(run, corpus, "train.steps=3", "train.checkpoint_every=0", "train.dtype=bfloat16")
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == 3 and all(r["loss"] == r["loss"] for r in records)
    assert records[-1]["loss"] < records[0]["loss"] + 0.5


def test_on_step_sees_each_step_and_extends_its_record(tmp_path, corpus):
    """pretrain(on_step=...) runs after every optimizer step with that step's micro-batches, before
    evaluation; what it adds to the record lands in metrics.jsonl."""
    import torch

    from openk2 import load_model
    from openk2.train.pretrain import pretrain

    seen, weights = [], []

    def probe(model, micro_batches, record):
        seen.append((record["step"], len(micro_batches), tuple(micro_batches[0][0].shape)))
        weights.append(model.lm_head.weight.detach().clone())
        record["probe"] = record["step"] * 10

    recipe = load_recipe("recipes/speedrun.toml", [f"data.source={corpus}", "train.steps=3",
                                                   "train.checkpoint_every=0", *SMALL])
    pretrain(recipe, tmp_path / "run", log=lambda message: None, show_progress=False, on_step=probe)
    assert seen == [(step, 2, (2, 33)) for step in (1, 2, 3)]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["probe"] for r in records] == [10, 20, 30]
    assert "val_loss" in records[-1]
    final = load_model(tmp_path / "run" / "final")
    assert torch.equal(weights[-1], final.lm_head.weight)  # the last call saw the updated weights


def test_resume_with_another_model_is_refused(tmp_path):
    """--resume checks the [model] section against the run's recipe.json before touching it, and
    a checkpoint that does not fit the model fails with a ConfigError, not a state_dict dump."""
    from openk2 import build_model, preset
    from openk2.optim import OptimConfig, build_optimizer
    from openk2.train.checkpoint import load_checkpoint, save_checkpoint
    from openk2.train.pretrain import check_resumable

    recipe = load_recipe(None, ["model.num_hidden_layers=2"])
    saved = tmp_path / "recipe.json"
    saved.write_text(json.dumps(recipe))
    check_resumable(load_recipe(None, ["model.num_hidden_layers=2", "train.steps=900"]), saved)  # fine
    with pytest.raises(ConfigError, match=r"model.num_hidden_layers=2 \(now 3\)"):
        check_resumable(load_recipe(None, ["model.num_hidden_layers=3"]), saved)
    assert json.loads(saved.read_text()) == recipe

    small = build_model(preset("tiny", num_hidden_layers=2, vocab_size=256), seed=0)
    path = save_checkpoint(tmp_path / "run", 1, small, build_optimizer(small, OptimConfig()), {})
    bigger = build_model(preset("tiny", num_hidden_layers=3, vocab_size=256), seed=0)
    with pytest.raises(ConfigError, match="could not be loaded into this model.*model.layers.2"):
        load_checkpoint(path, bigger, build_optimizer(bigger, OptimConfig()))


def test_fresh_run_refuses_a_folder_holding_a_run(tmp_path):
    """Without --resume, a run folder with checkpoints or a final model is not overwritten."""
    from openk2.train.checkpoint import previous_run, refuse_existing_run

    run = tmp_path / "run"
    refuse_existing_run(run)  # nothing there yet
    (run / "final").mkdir(parents=True)
    assert previous_run(run) == "a final model"
    (run / "checkpoints" / "step_0000200").mkdir(parents=True)
    with pytest.raises(ConfigError, match="checkpoints up to step_0000200.*--resume"):
        refuse_existing_run(run)


def test_speedrun_default_folder_moves_past_finished_runs(tmp_path, monkeypatch):
    """`./run.sh` twice: the second run goes to runs/speedrun-2; --resume keeps runs/speedrun."""
    from typer.testing import CliRunner

    import openk2.pipeline
    from openk2.cli import app

    folders = []
    monkeypatch.setattr(openk2.pipeline, "speedrun",
                        lambda recipe, out, resume, log: folders.append(out) or out)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "speedrun" / "pretrain" / "final").mkdir(parents=True)
    runner = CliRunner()
    assert runner.invoke(app, ["speedrun"]).exit_code == 0
    assert runner.invoke(app, ["speedrun", "--resume"]).exit_code == 0
    assert folders == [Path("runs/speedrun-2"), Path("runs/speedrun")]


def test_init_export_and_tokenizer_refuse_to_overwrite(tmp_path):
    """`openk2 init` / `export` never write over a model in --out, `tokenizer train` over a
    tokenizer."""
    from typer.testing import CliRunner

    from openk2.cli import app

    runner = CliRunner()
    folder = tmp_path / "model"
    assert runner.invoke(app, ["init", "--preset", "tiny", "--out", str(folder)]).exit_code == 0
    before = (folder / "model.safetensors").read_bytes()
    again = runner.invoke(app, ["init", "--preset", "tiny", "--seed", "1", "--out", str(folder)])
    assert again.exit_code == 2 and "already holds a model" in again.output
    export = runner.invoke(app, ["export", "--checkpoint", str(tmp_path), "--out", str(folder)])
    assert export.exit_code == 2 and "already holds a model" in export.output
    (folder / "tokenizer.json").write_text("{}")
    tokenizer = runner.invoke(app, ["tokenizer", "train", "--out", str(folder), "--vocab-size", "512"])
    assert tokenizer.exit_code == 2 and "already holds a tokenizer.json" in tokenizer.output
    assert (folder / "tokenizer.json").read_text() == "{}"
    assert (folder / "model.safetensors").read_bytes() == before

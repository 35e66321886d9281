"""``hetlm build`` and ``hetlm train`` on tiny models with real torch, real files and real signals."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hetlm.config import load_config
from hetlm.model import flops_per_token, parameter_counts
from hetlm.store import Checkpoint, RunDir, load_checkpoint
from hetlm.train import Segment, TrainState, fit_decay_steps, learning_rate_at

TINY = {
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context_length": 32},
    "train": {
        "micro_batch_size": 4, "max_steps": 40, "warmup_steps": 5, "learning_rate": 0.003, "min_lr": 0.0003,
        "eval_every": 10, "eval_windows": 8, "log_every": 5, "checkpoint_every": 10, "keep_last": 2,
    },
    "device": {"threads": 1, "compile": "off"},
}


def write_config(tmp_path: Path, data: Path, name: str = "tiny", **sections: dict) -> Path:
    config = {"data": {"dir": str(data)}}
    for section in set(TINY) | set(sections):
        config[section] = {**TINY.get(section, {}), **sections.get(section, {})}
    config["data"]["dir"] = str(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def steps_of(run: Path) -> list[int]:
    return [checkpoint.step for checkpoint in RunDir(run).checkpoints()]


def metrics(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    # Training applies the plan's thread count process-wide; later tests keep theirs.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def hetlm(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hetlm", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(process: subprocess.Popen, run: Path, step: int, timeout: float = 120.0) -> int:
    """Poll metrics.jsonl until a train record reaches ``step``; returns the step seen."""
    deadline = time.monotonic() + timeout
    path = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended early: {process.communicate()}"
        if path.is_file():
            seen = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
            if seen and max(seen) >= step:
                return max(seen)
        time.sleep(0.002)
    raise AssertionError(f"no step {step} within {timeout}s")


# --- pure pieces ---------------------------------------------------------------------------------------


def test_schedule_warms_up_then_decays_to_min_lr():
    train = load_config(None, ["train.learning_rate=0.01", "train.min_lr=0.001", "train.warmup_steps=10",
                               "train.max_steps=110"]).train
    assert learning_rate_at(0, train) == pytest.approx(0.001)
    assert learning_rate_at(9, train) == pytest.approx(0.01)
    assert learning_rate_at(60, train) == pytest.approx(0.0055)
    assert learning_rate_at(110, train) == pytest.approx(0.001)
    assert learning_rate_at(500, train) == pytest.approx(0.001)
    rates = [learning_rate_at(s, train) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_a_fitted_length_ends_the_decay_unless_decay_steps_is_set():
    train = load_config(None, ["train.learning_rate=0.01", "train.min_lr=0.001", "train.warmup_steps=10",
                               "train.max_steps=1000"]).train
    assert learning_rate_at(110, train, fitted_steps=110) == pytest.approx(0.001)
    assert learning_rate_at(60, train, fitted_steps=110) == pytest.approx(0.0055)
    assert learning_rate_at(110, train) > 0.009
    train.decay_steps = 210
    assert learning_rate_at(110, train, fitted_steps=110) == pytest.approx(0.0055)
    # 20 s left at 0.1 s per step: 200 more steps, never past max_steps nor before the next step.
    assert fit_decay_steps(50, 0.1, 20.0, train) == 250
    assert fit_decay_steps(50, 0.1, 1e6, train) == 1000
    assert fit_decay_steps(50, 10.0, 1.0, train) == 51


def test_train_state_saves_and_loads_symmetrically(tmp_path):
    segment = Segment(start=5, end=30, from_lr=1e-4, peak=1e-3, min_lr=1e-5, warmup=2, learning_rate=1e-3)
    state = TrainState(step=7, tokens=896, fitted_steps=40, segments=[segment], bad_steps=2, train_seconds=1.5, best=(2.5, 6),
                       world_size=2,
                       accumulation=3, scaler={"scale": 1024.0}, ranks=[{"data": torch.arange(4)}, {"data": torch.ones(2)}])
    torch.save(state.state_dict(), tmp_path / "state.pt")
    loaded = TrainState()
    loaded.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert loaded.state_dict().keys() == state.state_dict().keys()
    for field in ("step", "tokens", "fitted_steps", "segments", "bad_steps", "train_seconds", "best", "world_size", "accumulation",
                  "scaler"):
        assert getattr(loaded, field) == getattr(state, field), field
    assert all(torch.equal(a["data"], b["data"]) for a, b in zip(loaded.ranks, state.ranks, strict=True))


# --- build ---------------------------------------------------------------------------------------------


def test_build_reports_sizes_and_writes_the_run(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data)
    run = tmp_path / "run"
    result = cli("build", "--config", config, "--out", run)
    assert result.code == 0, result.err
    model = load_config(config, ["model.vocab_size=512"]).model
    counts = parameter_counts(model)
    for figure in (counts["total"], counts["embedding"], counts["non_embedding"], flops_per_token(model)):
        assert f"{figure:,}" in result.out
    assert "Plan: train on cpu" in result.out and "dtype" in result.out
    assert (run / "config.yaml").is_file()
    assert steps_of(run) == [0]
    loaded = load_checkpoint(run)
    assert loaded.model.config.vocab_size == 512
    assert Checkpoint.read(loaded.path).manifest["step"] == 0
    # The same seed builds the same weights: a rebuild elsewhere is byte-identical.
    assert cli("build", "--config", config, "--out", tmp_path / "again").code == 0
    weights = "checkpoints/step-000000/model.safetensors"
    assert (run / weights).read_bytes() == (tmp_path / "again" / weights).read_bytes()
    # Building an existing run of the same model changes nothing.
    again = cli("build", "--config", config, "--out", run)
    assert again.code == 0 and "kept run" in again.out


def one_line_error(result, code: int, fragment: str) -> None:
    assert result.code == code, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize("command", ["build", "train"])
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.d_model=33"], "divisible by model.n_heads"),
        (["model.n_heads=4", "model.n_kv_heads=3"], "multiple of model.n_kv_heads"),
        (["data.dir=no/such/folder"], "data folder no/such/folder not found"),
        (["model.vocab_size=1000"], "model.vocab_size is 1000 but the tokenizer"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(cli, tiny_data, tmp_path, command, overrides, fragment):
    config = write_config(tmp_path, tiny_data)
    sets = [arg for o in overrides for arg in ("--set", o)]
    one_line_error(cli(command, "--config", config, "--out", tmp_path / "run", *sets), 2, fragment)
    assert not (tmp_path / "run").exists()


def test_data_from_another_tokenizer_or_model_is_refused(cli, tiny_data, tmp_path):
    import sentencepiece as spm

    config = write_config(tmp_path, tiny_data)
    run = tmp_path / "run"
    assert cli("build", "--config", config, "--out", run).code == 0
    # The same corpus files, but tokenized by a different SentencePiece model.
    other = tmp_path / "other-data"
    shutil.copytree(tiny_data, other)
    text = tmp_path / "text.txt"
    text.write_text("".join(Path(p).read_text() for p in sorted(Path(spm.__file__).parent.glob("*.py"))))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=512,
                                   model_type="unigram", byte_fallback=True, minloglevel=2)
    shutil.copyfile(tmp_path / "sp.model", other / "tokenizer.model")
    for command in ("build", "train"):
        one_line_error(cli(command, "--config", config, "--out", run, "--set", f"data.dir={other}"), 2,
                       "was made with another tokenizer than run")
    one_line_error(cli("build", "--config", config, "--out", run, "--set", "model.n_layers=2"), 2,
                   "was built with another model (model.n_layers: 1 -> 2)")


# --- train ---------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_a_resumable_run(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, model={"dropout": 0.1})
    run = tmp_path / "run"
    result = cli("train", "--config", config, "--out", run)
    assert result.code == 0, result.err
    assert "Training summary" in result.out and "loss plot" in result.out
    train, evals = metrics(run, "train"), metrics(run, "eval")
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    # Untrained, the loss is about ln(vocab); 40 small steps take it well below.
    assert abs(train[0]["loss"] - math.log(512)) < 0.5
    assert evals[-1]["val_loss"] < math.log(512) - 0.6
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert 0 < evals[-1]["val_bpb"] < 8
    assert all(r["tok_per_s"] > 0 and 0 < r["mfu"] < 1 and r["tokens"] == r["step"] * 128 for r in train)
    assert (run / "loss.png").stat().st_size > 1000
    # Kept: the last two and the best by val loss (here the newest is also the best).
    steps = steps_of(run)
    assert steps == [30, 40]
    newest = run / "checkpoints" / "step-000040"
    manifest = Checkpoint.read(newest).manifest
    assert manifest["step"] == 40 and manifest["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    state = Checkpoint.read(newest).trainer_state()  # weights_only=True
    assert state["step"] == 40 and state["tokens"] == 40 * 128 and state["world_size"] == 1
    assert set(state["ranks"][0]) >= {"python", "numpy", "torch", "data"}
    assert state["optimizer"]["state"] and state["schedule"] == {"fitted_steps": 0, "segments": []}

    # At max_steps already: nothing to do. A higher --max-steps continues from step 40.
    done = cli("train", "--config", config, "--out", run)
    assert done.code == 0 and "nothing to train" in done.err
    more = cli("train", "--config", config, "--out", run, "--max-steps", "45")
    assert more.code == 0, more.err
    assert "from step 40" in more.err
    assert steps_of(run)[-1] == 45
    assert [r["step"] for r in metrics(run, "train")][-2:] == [40, 45]


def test_torn_checkpoint_is_skipped_and_replayed_exactly(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, model={"dropout": 0.1},
                          train={"max_steps": 20, "checkpoint_every": 5, "keep_last": 3, "deterministic": True})
    run = tmp_path / "run"
    assert cli("train", "--config", config, "--out", run).code == 0
    newest = run / "checkpoints" / "step-000020" / "model.safetensors"
    expected = newest.read_bytes()
    newest.write_bytes(expected[: len(expected) // 2])  # a torn write
    result = cli("train", "--config", config, "--out", run)
    assert result.code == 0, result.err
    assert "skipping incomplete checkpoint" in result.err and "step-000020" in result.err
    assert "from step 15" in result.err
    # Steps 16-20 replayed from step 15's state give the very same weights.
    assert newest.read_bytes() == expected


def test_non_finite_losses_skip_updates_then_stop_the_run(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, train={
        "learning_rate": 1e10, "min_lr": 0.0, "warmup_steps": 0, "max_bad_steps": 3, "log_every": 1,
        "checkpoint_every": 1, "keep_last": 10, "eval_every": 100,
    })
    run = tmp_path / "run"
    result = cli("train", "--config", config, "--out", run)
    assert result.code == 1 and "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 steps in a row with a non-finite loss or gradient by step 4" in errors[0]
    # Step 1 blew the weights up; steps 2 and 3 were skipped, so their checkpoints hold step 1's weights.
    weights = {c.step: load_file(str(c.path / "model.safetensors")) for c in RunDir(run).checkpoints()}
    assert sorted(weights) == [0, 1, 2, 3]
    assert all(torch.equal(weights[1][k], weights[s][k]) for s in (2, 3) for k in weights[1])
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert all(torch.isfinite(t).all() for t in weights[3].values())
    assert [r["bad_steps"] for r in metrics(run, "train")] == [0, 1, 2]


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, model={"dropout": 0.1}, train={
        "max_steps": 60, "checkpoint_every": 7, "log_every": 1, "eval_every": 9, "deterministic": True,
        "global_batch_tokens": 256,  # two micro-batches per step
    })
    reference = hetlm("train", "--config", config, "--out", tmp_path / "reference", cwd=tmp_path)
    killed_run = tmp_path / "killed"
    target = random.Random().randint(8, 45)
    killed = hetlm("train", "--config", config, "--out", killed_run, cwd=tmp_path)
    seen = wait_for_step(killed, killed_run, target)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert reference.wait(timeout=300) == 0, reference.communicate()
    newest = steps_of(killed_run)[-1]
    assert newest < 60, f"killed at step {seen} but the run had already finished"
    resumed = hetlm("train", "--config", config, "--out", killed_run, cwd=tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"from step {newest}" in err
    final = "checkpoints/step-000060/model.safetensors"
    assert (killed_run / final).read_bytes() == (tmp_path / "reference" / final).read_bytes(), (
        f"killed after step {seen}, resumed from {newest}: weights differ"
    )
    # The killed run's records past its checkpoint were dropped and replayed, not duplicated.
    assert [r["step"] for r in metrics(killed_run, "train")] == list(range(1, 61))


@pytest.mark.slow
def test_sigterm_and_sigint_finish_the_step_save_and_exit(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, train={"max_steps": 100_000, "log_every": 1, "checkpoint_every": 1000})
    runs = {sig: tmp_path / sig.name for sig in (signal.SIGTERM, signal.SIGINT)}
    procs = {sig: hetlm("train", "--config", config, "--out", run, cwd=tmp_path) for sig, run in runs.items()}
    for sig, proc in procs.items():
        wait_for_step(proc, runs[sig], 3)
        proc.send_signal(sig)
    for sig, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], err
        assert f"stopped by {sig.name}" in err
        checkpoint = RunDir(runs[sig]).checkpoints()[-1]
        assert checkpoint.step >= 3 and metrics(runs[sig], "train")[-1]["step"] == checkpoint.step
        assert checkpoint.trainer_state()["step"] == checkpoint.step


def test_max_time_fits_the_decay_to_the_budget_and_saves_it(cli, tiny_data, tmp_path):
    # Asserts relations that hold however fast the machine is: the fitted length is the one reported, it is
    # saved, the logged rates follow it, and a resumed run keeps it instead of fitting again.
    config = write_config(tmp_path, tiny_data, train={"max_steps": 1_000_000, "log_every": 1, "eval_every": 1_000_000,
                                                        "checkpoint_every": 1_000_000})
    run = tmp_path / "run"
    result = cli("train", "--config", config, "--out", run, "--max-time", "3s")
    assert result.code == 0, result.err
    reported = int(result.err.split("decays to train.min_lr by step ")[1].split()[0])
    final = RunDir(run).checkpoints()[-1]
    assert final.trainer_state()["schedule"]["fitted_steps"] == reported
    train = load_config(config).train
    # Steps before the fit follow max_steps' schedule, every step after it the fitted one.
    fitted = [r["lr"] == pytest.approx(learning_rate_at(r["step"] - 1, train, reported)) for r in metrics(run, "train")]
    unfitted = [r["lr"] == pytest.approx(learning_rate_at(r["step"] - 1, train)) for r in metrics(run, "train")]
    assert all(f or u for f, u in zip(fitted, unfitted, strict=True))
    switch = next(i for i, (f, u) in enumerate(zip(fitted, unfitted, strict=True)) if f and not u)
    assert all(unfitted[:switch]) and all(fitted[switch:])
    # A time budget is the invocation's: continuing under one re-plans the schedule from where the run is.
    resumed = cli("train", "--config", config, "--out", run, "--max-time", "3s", "--max-steps", str(final.step + 3))
    assert resumed.code == 0, resumed.err
    assert f"schedule re-planned at step {final.step}" in resumed.err
    schedule = RunDir(run).checkpoints()[-1].trainer_state()["schedule"]
    assert schedule["fitted_steps"] == reported and [s["start"] for s in schedule["segments"]] == [final.step]


def test_resume_from_a_checkpoint_path_into_a_new_run(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, train={"max_steps": 10, "checkpoint_every": 5, "keep_last": 5})
    assert cli("train", "--config", config, "--out", tmp_path / "a").code == 0
    start = tmp_path / "a" / "checkpoints" / "step-000005"
    result = cli("train", "--config", config, "--out", tmp_path / "b", "--resume", start, "--max-steps", "12")
    assert result.code == 0, result.err
    assert "from step 5" in result.err
    assert steps_of(tmp_path / "b")[-1] == 12
    one_line_error(cli("train", "--config", config, "--out", tmp_path / "c", "--resume", tmp_path / "nope"), 2,
                   "does not exist")
    # --resume never starts over in place.
    fresh = cli("train", "--config", config, "--out", tmp_path / "a", "--resume", "never", "--max-steps", "3")
    assert fresh.code == 0 and "from step 0" in fresh.err
    assert steps_of(tmp_path / "a") == [0, 3]
    assert os.path.exists(tmp_path / "a" / "config.yaml")


@pytest.mark.slow
def test_a_compiled_run_follows_the_eager_one(cli, tiny_data, tmp_path):
    # One process without dropout compiles the whole forward, embedding to loss, as one graph; evaluation stays
    # eager. The numbers are inductor's (fused kernels), so the runs agree to rounding, not bit for bit.
    short = {"max_steps": 6, "eval_every": 6, "checkpoint_every": 6, "log_every": 1}
    config = write_config(tmp_path, tiny_data, train=short)
    compiled = cli("train", "--config", config, "--out", tmp_path / "compiled", "--set", "device.compile=on")
    assert compiled.code == 0, compiled.err
    assert "compiled (the whole forward)" in " ".join(compiled.err.split())
    assert cli("train", "--config", config, "--out", tmp_path / "eager").code == 0
    for a, b in zip(metrics(tmp_path / "compiled", "train"), metrics(tmp_path / "eager", "train"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    ours = load_file(str(RunDir(tmp_path / "compiled").checkpoints()[-1].path / "model.safetensors"))
    reference = load_file(str(RunDir(tmp_path / "eager").checkpoints()[-1].path / "model.safetensors"))
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-3, atol=1e-4)

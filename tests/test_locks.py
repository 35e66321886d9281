"""One writer at a time: a second train, build, preprocess or deploy of the same folder is refused, a killed
holder blocks nobody, and every command cleans up what an interrupted one left, saying what went."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import one_error

from hetlm.io import FileLock
from hetlm.reporting import Reporter
from hetlm.store import LOCK, RunDir, bundle_lock_path, read_bundle_manifest, write_bundle

HETLM = [sys.executable, "-m", "hetlm"]
TINY = {
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context_length": 32},
    "train": {"micro_batch_size": 4, "max_steps": 10, "warmup_steps": 2, "eval_every": 5, "eval_windows": 4,
              "log_every": 1, "checkpoint_every": 5, "keep_last": 2},
    "device": {"threads": 1, "compile": "off"},
}


def write_config(tmp_path: Path, data: Path, **train) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], **train}, "data": {"dir": str(data)}}))
    return path


def unwrapped(text: str) -> str:
    return text.replace("\n", "")


def wait_for_training(process: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.01)


def test_a_second_train_or_build_of_a_run_is_refused_until_the_first_is_killed(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, max_steps=1_000_000, checkpoint_every=1_000_000)
    run = tmp_path / "run"
    first = subprocess.Popen([*HETLM, "train", "--config", str(config), "--out", str(run)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(first, run)
        for command in ("train", "build"):
            error = one_error(cli(command, "--config", config, "--out", run), 1)
            assert re.fullmatch(rf"error: run {run} is in use by another hetlm process \(pid {first.pid} on .+\): wait for "
                                rf"it to finish, or stop it \(it holds {run / LOCK}\)", error), error
        # The refused commands changed nothing: the run still has only its step-0 checkpoint.
        assert [c.step for c in RunDir(run).checkpoints()] == [0]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        # The OS dropped the killed process's lock.
        again = cli("train", "--config", config, "--out", run, "--max-steps", "3")
        assert again.code == 0, again.err
    finally:
        first.kill()
        first.communicate()
    assert not (run / LOCK).exists()


def test_eval_of_a_run_in_training_saves_without_waiting(cli, tiny_checkpoint, tiny_data, tmp_path):
    run = shutil.copytree(tiny_checkpoint, tmp_path / "run")
    with FileLock(run / LOCK, "the run"):
        result = cli("eval", run, "--max-tokens", "300", "--json")
    assert result.code == 0, result.err
    assert json.loads((run / "eval.json").read_text()) == json.loads(result.out)


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_when_rank_0_cannot_lock_the_run(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data)
    run = tmp_path / "run"
    run.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "hetlm", "train", "--config", str(config), "--out", str(run)]
    with FileLock(run / LOCK, "the run"):
        started = time.monotonic()
        ranks = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ranks.returncode != 0
    # Rank 0 says why; rank 1 stops at once instead of waiting for a run that is not coming.
    assert f"error: run {run} is in use by another hetlm process (pid {os.getpid()} " in ranks.stderr
    assert "error: rank 0: run " in ranks.stderr
    assert time.monotonic() - started < 120
    assert not (run / "checkpoints").exists()


def test_preprocess_is_refused_while_another_writes_the_folder_and_cleans_up_after_a_killed_one(cli, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(f"document {i}\n" + "the quick brown fox jumps over the lazy dog\n" * 20)
    out = tmp_path / "data"
    args = ("preprocess", corpus, "--out", out, "--vocab-size", "300")
    out.mkdir()
    with FileLock(out / LOCK, "x"):
        error = one_error(cli(*args), 1)
    assert f"data folder {out} is in use by another hetlm process" in error
    # Killed as the config is written into the work folder, where the finished token files already are.
    env = {**os.environ, "HETLM_CRASH_AT": "file-rename"}
    killed = subprocess.run([*HETLM, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [work] = [p for p in out.iterdir() if p.name.startswith(".preprocess-")]
    size = sum(f.stat().st_size for f in work.iterdir())
    assert size > (work / "train.bin").stat().st_size > 0
    result = cli(*args)
    assert result.code == 0, result.err
    # (Unwrapped: the console folds long lines.)
    assert f"cleaned up after an interrupted preprocess: removed {work} ({size / 1e6:.1f} MB)" in unwrapped(result.err)
    assert sorted(os.listdir(out)) == ["config.yaml", "manifest.json", "tokenizer.model", "train.bin", "val.bin"]
    # Killed as the manifest takes its name: the next run finds the folder unfinished, removes the
    # manifest's temporary file, and rebuilds.
    env["HETLM_CRASH_AT"] = "file-rename#2"
    killed = subprocess.run([*HETLM, *map(str, args), "--force"], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [manifest] = [p.name for p in out.iterdir() if p.name.startswith(".manifest.json.")]
    result = cli(*args)
    assert result.code == 0, result.err
    assert "cleaned up after an interrupted preprocess: removed " in unwrapped(result.err)
    assert manifest in unwrapped(result.err)
    assert sorted(os.listdir(out)) == ["config.yaml", "manifest.json", "tokenizer.model", "train.bin", "val.bin"]


class Notes(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def test_a_bundle_has_one_writer_and_says_what_it_cleaned_up(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    with FileLock(bundle_lock_path(out), "x"):
        error = one_error(cli("deploy", tiny_checkpoint, "--out", out), 1)
    assert f"bundle {out} is in use by another hetlm process" in error and not out.exists()
    leftover = tmp_path / ".bundle.a1b2c3d4.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(bytes(300_000))
    notes = Notes()

    def fill(folder: Path) -> dict:
        for name in ("model.safetensors", "tokenizer.model"):
            (folder / name).write_bytes(b"x")
        return {"config": {}}

    write_bundle(out, fill, notes)
    assert notes.lines == [f"cleaned up after an interrupted deploy: removed {leftover} (0.3 MB)"]
    assert read_bundle_manifest(out) and os.listdir(tmp_path) == ["bundle"]

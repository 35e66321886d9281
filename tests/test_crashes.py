"""SIGKILL at each rename of ``hetlm deploy`` and of checkpoint writing: a complete old or new folder is always
there, and the next run recovers by itself. The kills are real; HETLM_CRASH_AT (hetlm.io) only says where."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hetlm.io
from hetlm.cli import run as hetlm_main
from hetlm.config import load_config
from hetlm.deploy import deploy
from hetlm.io import aside_path
from hetlm.model import Transformer
from hetlm.reporting import Reporter
from hetlm.store import Checkpoint, RunDir, load_checkpoint, read_bundle_manifest

# (mode, crash point) of every step of replacing a folder: swapped in one step, or moved aside first.
REPLACING = [("exchange", "dir-exchange"), ("exchange", "dir-remove-old"),
             ("aside", "dir-move-old"), ("aside", "dir-move-new"), ("aside", "dir-remove-old")]

# Children fork from a server process that imported torch and hetlm and ran nothing else: they start in
# milliseconds, and no thread of this process is forked with them.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["torch", "torch._dynamo", "hetlm.cli", "hetlm.deploy"])


def _crash(point: str, exchange: bool, job, args) -> None:
    os.environ["HETLM_CRASH_AT"] = point
    if not exchange:
        hetlm.io._RENAMEAT2 = None
    job(*args)


def killed_at(point: str, job, *args, exchange: bool = True) -> None:
    """Run ``job(*args)`` in a child that SIGKILLs itself at crash point ``point``."""
    child = FORKS.Process(target=_crash, args=(point, exchange, job, args))
    child.start()
    child.join(180)
    assert child.exitcode == -signal.SIGKILL, f"the child was not killed at {point} (exit code {child.exitcode})"


class Notes(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture
def without_exchange(monkeypatch):
    """This process replaces folders the way systems without an atomic exchange do."""
    monkeypatch.setattr(hetlm.io, "_RENAMEAT2", None)


@pytest.mark.parametrize("mode, point", [*REPLACING, ("new", "dir-rename")])
def test_deploy_killed_at_each_rename_leaves_a_bundle_and_the_next_deploy_recovers(
        tiny_checkpoint, tmp_path, monkeypatch, mode, point):
    out = tmp_path / "bundle"
    if mode != "new":
        deploy(tiny_checkpoint, out, dtype="fp16")
    killed_at(point, deploy, tiny_checkpoint, out, exchange=mode == "exchange")
    if mode == "exchange":
        # At every instant the bundle path holds a complete bundle, the old one or the new.
        assert read_bundle_manifest(out)["dtype"] in ("fp16", "fp32")
    elif mode == "aside":
        # Complete at the bundle path, or waiting complete beside it for the next run to move it back.
        there = out if out.exists() else aside_path(out)
        assert there == out or point == "dir-move-new"
        assert read_bundle_manifest(there)["dtype"] in ("fp16", "fp32")
        monkeypatch.setattr(hetlm.io, "_RENAMEAT2", None)
        # Loading recovers it too, without a deploy.
        assert load_checkpoint(out).manifest["dtype"] in ("fp16", "fp32")
    else:
        assert not out.exists()
    deploy(tiny_checkpoint, out)
    assert read_bundle_manifest(out)["dtype"] == "fp32"
    assert os.listdir(tmp_path) == ["bundle"]


def tiny_config():
    return load_config(None, ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                              "model.context_length=16"])


def write_checkpoint(path: Path, seed: int) -> None:
    config = tiny_config()
    torch.manual_seed(seed)
    model = Transformer(config.model)
    tokenizer = path.parent.parent / "tok.model"
    Checkpoint.write(path, model, config, tokenizer, {"seed": torch.tensor(seed)}, info={"step": 5, "seed": seed})


@pytest.mark.parametrize("mode, point", REPLACING)
def test_a_checkpoint_replaced_under_sigkill_survives_the_next_runs_clean_up(tmp_path, mode, point):
    run = RunDir(tmp_path / "run")
    path = run.checkpoint_path(5)
    path.parent.mkdir(parents=True)
    (run.path / "tok.model").write_bytes(b"pieces")
    write_checkpoint(path, seed=1)
    killed_at(point, write_checkpoint, path, 2, exchange=mode == "exchange")
    if mode == "exchange":
        assert Checkpoint.read(path).manifest["seed"] in (1, 2)
    # What a training run does first: lock the run and clean up after crashed writers. It must put the
    # checkpoint back, not delete it with the temporary folders.
    notes = Notes()
    with run.claim(notes):
        pass
    [checkpoint] = run.checkpoints()
    assert checkpoint.path == path and checkpoint.manifest["seed"] in (1, 2)
    assert checkpoint.trainer_state()["seed"] == checkpoint.manifest["seed"]
    assert sorted(os.listdir(path.parent)) == ["step-000005"]
    assert notes.lines and "cleaned up after an interrupted run" in notes.lines[0]


TRAIN = {
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context_length": 32},
    "train": {"micro_batch_size": 4, "max_steps": 12, "warmup_steps": 2, "eval_every": 4, "eval_windows": 4,
              "log_every": 2, "checkpoint_every": 4, "keep_last": 5, "deterministic": True},
    "device": {"threads": 1, "compile": "off"},
}


@pytest.fixture(scope="module")
def train_config(tiny_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("crash-config") / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TRAIN, "data": {"dir": str(tiny_data)}}))
    return path


@pytest.fixture(scope="module")
def reference_weights(train_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("crash-reference") / "run"
    assert hetlm_main(["train", "--config", str(train_config), "--out", str(run)]) == 0
    return load_file(str(run / "checkpoints" / "step-000012" / "model.safetensors"))


# The build's step-0 checkpoint, the config saved right after it, and the step-4 and step-8 checkpoints.
@pytest.mark.parametrize("point", ["dir-rename", "file-rename", "dir-rename#2", "dir-rename#3"])
def test_training_killed_at_a_rename_resumes_to_the_same_weights(cli, train_config, reference_weights, tmp_path, point):
    run = tmp_path / "run"
    killed_at(point, hetlm_main, ["train", "--config", str(train_config), "--out", str(run)])
    resumed = cli("train", "--config", train_config, "--out", run)
    assert resumed.code == 0, resumed.err
    assert "cleaned up after an interrupted run" in resumed.err
    weights = load_file(str(run / "checkpoints" / "step-000012" / "model.safetensors"))
    assert all(torch.equal(weights[name], reference_weights[name]) for name in reference_weights)
    assert not list(run.rglob(".*"))

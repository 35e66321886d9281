"""Fine-tuning: preprocess --tokenizer-from encodes new text with a model's tokenizer, train --init starts from it."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from safetensors.torch import load_file

from hetlm.store import Checkpoint, RunDir
from tests.test_train import write_config


def one_line_error(result, code: int, fragment: str) -> None:
    assert result.code == code, (result.code, result.err)
    errors = [line for line in result.err.splitlines() if line.strip()]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in result.err, result.err


def new_text(folder, documents: int = 30):
    """Text unlike the stdlib source the tiny model saw: numbered lines of words."""
    folder.mkdir()
    rng = random.Random(0)
    words = ["river", "stone", "lantern", "harbor", "willow", "copper", "meadow", "thunder", "violet", "quiet"]
    for d in range(documents):
        lines = [f"{i}. " + " ".join(rng.choice(words) for _ in range(8)) for i in range(40)]
        (folder / f"doc{d:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def finetune_data(tiny_checkpoint, tmp_path_factory):
    from hetlm.cli import run

    root = tmp_path_factory.mktemp("finetune")
    out = root / "data"
    assert run(["preprocess", str(new_text(root / "text")), "--out", str(out), "--tokenizer-from", str(tiny_checkpoint),
                "--val-fraction", "0.1"]) == 0
    return out


def test_preprocess_with_another_models_tokenizer_trains_none(finetune_data, tiny_checkpoint, tiny_data):
    manifest = json.loads((finetune_data / "manifest.json").read_text())
    source = Checkpoint.read(RunDir(tiny_checkpoint).checkpoints()[-1].path)
    assert manifest["tokenizer"]["sha256"] == source.tokenizer_sha256
    assert manifest["tokenizer"]["from"].endswith("tokenizer.model") and "sample_bytes" not in manifest["tokenizer"]
    assert (finetune_data / "tokenizer.model").read_bytes() == (tiny_data / "tokenizer.model").read_bytes()
    assert yaml.safe_load((finetune_data / "config.yaml").read_text())["data"]["vocab_size"] == 512
    assert manifest["splits"]["val"]["documents"] >= 1 and manifest["splits"]["train"]["tokens"] > 1000


def test_train_init_starts_a_new_run_from_the_weights(cli, finetune_data, tiny_checkpoint, tmp_path):
    config = write_config(tmp_path, finetune_data, model={"n_layers": 2, "d_model": 64, "n_heads": 4, "context_length": 64},
                          train={"max_steps": 6, "checkpoint_every": 3, "keep_last": 5, "eval_every": 3, "learning_rate": 3e-4,
                                 "min_lr": 3e-5, "warmup_steps": 2})
    source = RunDir(tiny_checkpoint).checkpoints()[-1]
    run = tmp_path / "run"
    result = cli("train", "--init", tiny_checkpoint, "--config", config, "--out", run)
    assert result.code == 0, result.err
    assert "from step 0" in result.err and "starting from" in result.err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["n_kv_heads"] == 2 and saved["model"]["vocab_size"] == 512
    checkpoints = RunDir(run).checkpoints()
    assert [c.step for c in checkpoints] == [0, 3, 6]
    start = load_file(str(checkpoints[0].path / "model.safetensors"))
    original = load_file(str(source.path / "model.safetensors"))
    assert start.keys() == original.keys() and all((start[k] == original[k]).all() for k in start)
    for checkpoint in checkpoints:
        lineage = checkpoint.manifest["init"]
        assert lineage["weights_sha256"] == source.manifest["files"]["model.safetensors"]
        assert lineage["checkpoint"] == str(source.path.resolve())
    # A fresh optimizer and schedule: AdamW has made 3 steps, and the first logged rate is the new warmup's.
    state = checkpoints[1].trainer_state()
    assert state["step"] == 3 and state["optimizer"]["state"][0]["step"] == 3 and state["schedule"]["segments"] == []
    first = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train")
    assert first["step"] == 5 and first["lr"] < 3e-4

    # The bundle's model card names the weights the run started from.
    deployed = cli("deploy", run, "--out", tmp_path / "bundle")
    assert deployed.code == 0, deployed.err
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert f"initialized_from: `{source.path.name}`" in card
    assert f"initial_weights_sha256: `{source.manifest['files']['model.safetensors']}`" in card

    # An existing run is not overwritten by --init, and a rejected command writes nothing.
    before = (run / "config.yaml").read_bytes()
    one_line_error(cli("train", "--init", tiny_checkpoint, "--config", config, "--out", run), 2, "already has checkpoints")
    assert (run / "config.yaml").read_bytes() == before and [c.step for c in RunDir(run).checkpoints()] == [0, 3, 6]


def test_train_init_refuses_a_contradicting_model_or_another_tokenizer(cli, finetune_data, tiny_checkpoint, tiny_data,
                                                                     tmp_path):
    wider = write_config(tmp_path, finetune_data, name="wider", model={"d_model": 96, "n_heads": 4})
    one_line_error(cli("train", "--init", tiny_checkpoint, "--config", wider, "--out", tmp_path / "a"), 2,
                   "model.d_model: 64 in the source, 96 here")
    other = tmp_path / "other-data"
    assert cli("preprocess", new_text(tmp_path / "text"), "--out", other, "--vocab-size", "300").code == 0
    config = write_config(tmp_path, other, model={})
    one_line_error(cli("train", "--init", tiny_checkpoint, "--config", config, "--out", tmp_path / "b"), 2,
                   "--tokenizer-from")
    one_line_error(cli("train", "--init", tiny_checkpoint, "--config", config, "--out", tmp_path / "b", "--resume",
                       tiny_checkpoint), 2, "give one of them")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

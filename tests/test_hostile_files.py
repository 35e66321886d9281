"""Edited, incomplete or linked files: refused with one clear line before anything is built or deleted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import one_error
from safetensors.torch import load_file, save_file

from hetlm.config import load_config
from hetlm.deploy import deploy
from hetlm.errors import UsageError
from hetlm.io import sha256_file
from hetlm.model import Transformer
from hetlm.store import BUNDLE_MANIFEST, MANIFEST, Checkpoint, RunDir, load_checkpoint, resolve


def tiny(tmp_path: Path, **model):
    overrides = {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 64, "context_length": 16, **model}
    config = load_config(None, [f"model.{k}={v}" for k, v in overrides.items()])
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"pieces")
    torch.manual_seed(0)
    return config, Transformer(config.model), tokenizer


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    return deploy(tiny_checkpoint, tmp_path_factory.mktemp("hostile") / "bundle")


def edited_bundle(bundle: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``bundle`` whose hetlm.json ``edit`` changed (its hashes still vouch for the other files)."""
    copy = shutil.copytree(bundle, tmp_path / "edited")
    meta = json.loads((copy / BUNDLE_MANIFEST).read_text())
    edit(meta)
    (copy / BUNDLE_MANIFEST).write_text(json.dumps(meta))
    return copy


def test_a_bundle_config_claiming_a_huge_model_is_refused_before_it_is_built(cli, bundle, tmp_path):
    def huge(meta):
        meta["config"]["model"].update(n_layers=100_000, d_model=2048, n_heads=16, n_kv_heads=0)

    edited = edited_bundle(bundle, tmp_path, huge)
    started = time.monotonic()
    # In a child with a deadline: building 100,000 layers, even on the meta device, would take hours.
    child = subprocess.run([sys.executable, "-m", "hetlm", "eval", str(edited), "--text", str(edited / "README.md")],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 2, child.stderr
    assert f"error: {edited / 'model.safetensors'}: weights do not match the model (the config has " \
           "model.n_layers=100000, the weights 2 layers)" in child.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("key, value, fragment", [
    ("d_model", 2048, "model.embed_tokens.weight is [512, 64] in the weights, [512, 2048] in the config"),
    ("vocab_size", 10**9, "model.embed_tokens.weight is [512, 64] in the weights, [1000000000, 64] in the config"),
    ("n_kv_heads", 4, "model.layers.0.self_attn.k_proj.weight is [32, 64] in the weights, [64, 64] in the config"),
    ("tie_embeddings", False, "missing ['lm_head.weight']"),
])
def test_a_bundle_config_that_contradicts_the_weights_header_is_refused(cli, bundle, tmp_path, key, value, fragment):
    edited = edited_bundle(bundle, tmp_path, lambda meta: meta["config"]["model"].update({key: value}))
    error = one_error(cli("generate", edited, "--prompt", "x", "--max-new-tokens", "1"), 2)
    assert "weights do not match the model" in error and fragment in error, error


def test_weights_of_another_dtype_than_floats_are_refused(tmp_path):
    config, model, tokenizer = tiny(tmp_path)
    path = Checkpoint.write(tmp_path / "c", model, config, tokenizer).path
    weights = load_file(str(path / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int64)
    save_file(weights, path / "model.safetensors")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = sha256_file(path / "model.safetensors")
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"model\.norm\.weight is I64; weights are F32, F16, BF16"):
        load_checkpoint(path)


@pytest.mark.parametrize("edit", [
    lambda files: files.clear(),
    lambda files: files.pop("tokenizer.model"),
    lambda files: files.pop("model.safetensors"),
    lambda files: files.pop("trainer.pt"),
    lambda files: files.update({"../elsewhere": files["config.yaml"]}),
    lambda files: files.update({"config.yaml": "not a sha256"}),
], ids=["no files", "no tokenizer", "no weights", "unlisted trainer state", "a path outside", "not a hash"])
def test_a_checkpoint_manifest_that_does_not_vouch_for_every_file_is_not_complete(tmp_path, edit):
    config, model, tokenizer = tiny(tmp_path)
    run = RunDir(tmp_path / "run")
    good = Checkpoint.write(run.checkpoint_path(1), model, config, tokenizer, {"step": 1}, {"step": 1})
    edited = Checkpoint.write(run.checkpoint_path(2), model, config, tokenizer, {"step": 2}, {"step": 2})
    manifest = json.loads((edited.path / MANIFEST).read_text())
    edit(manifest["files"])
    (edited.path / MANIFEST).write_text(json.dumps(manifest))
    assert Checkpoint.read(edited.path) is None
    assert [c.path for c in run.checkpoints()] == [good.path]
    with pytest.raises(UsageError, match="incomplete or corrupt"):
        resolve(edited.path)


@pytest.mark.parametrize("edit, fragment", [
    (lambda files: files.clear(), "does not list model.safetensors, tokenizer.model"),
    (lambda files: files.pop("model.safetensors"), "does not list model.safetensors"),
])
def test_a_bundle_manifest_that_does_not_vouch_for_its_weights_is_refused(cli, bundle, tmp_path, edit, fragment):
    edited = edited_bundle(bundle, tmp_path, lambda meta: edit(meta["files"]))
    error = one_error(cli("eval", edited, "--text", edited / "README.md"), 2)
    assert f"bundle {edited} cannot be loaded: hetlm.json {fragment}" in error, error


def other_run_with_a_checkpoint(tmp_path: Path) -> Path:
    config, model, tokenizer = tiny(tmp_path)
    other = RunDir(tmp_path / "other")
    Checkpoint.write(other.checkpoint_path(7), model, config, tokenizer, info={"step": 7})
    return other.path


def test_a_run_whose_checkpoints_folder_links_into_another_run_is_refused(cli, tiny_data, tmp_path):
    other = other_run_with_a_checkpoint(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(other / "checkpoints")
    for args in (["train", "--resume", "never"], ["train"], ["build"]):
        error = one_error(cli(*args, "--set", f"data.dir={tiny_data}", "--out", run), 2)
        assert f"{run / 'checkpoints'} links to {other / 'checkpoints'}, outside the run" in error
    assert [c.step for c in RunDir(other).checkpoints()] == [7]


def test_starting_over_never_deletes_through_a_link(tmp_path):
    other = other_run_with_a_checkpoint(tmp_path)
    config, model, tokenizer = tiny(tmp_path)
    run = RunDir(tmp_path / "run")
    Checkpoint.write(run.checkpoint_path(1), model, config, tokenizer, info={"step": 1})
    # Links inside the run, to another run's checkpoint and records.
    (run.path / "checkpoints" / "step-000007").symlink_to(other / "checkpoints" / "step-000007")
    (other / "tensorboard").mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    run.tensorboard_path.symlink_to(other / "tensorboard")
    run.metrics_path.symlink_to(other / "metrics.jsonl")
    run.check_layout()
    assert run.start_over() == 2
    assert list((run.path / "checkpoints").iterdir()) == [] and not run.metrics_path.exists()
    assert [c.step for c in RunDir(other).checkpoints()] == [7]
    assert (other / "tensorboard").is_dir() and (other / "metrics.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize("command", ["train", "build"])
def test_out_naming_a_file_is_a_usage_error(cli, tiny_data, tmp_path, command):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for out in (file, file / "run"):
        error = one_error(cli(command, "--set", f"data.dir={tiny_data}", "--out", out), 2)
        assert f"error: {file} is a file, not a folder" in error and "--out names the run folder" in error
    assert file.read_text() == "mine"

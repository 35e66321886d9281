import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetlm.config import load_config
from hetlm.errors import UsageError
from hetlm.model import Transformer
from hetlm.store import Checkpoint, DataFolder, LoadedModel, RunDir, load_checkpoint, read_bundle_manifest, resolve, write_bundle


def tiny(tmp_path):
    config = load_config(None, ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                                "model.context_length=16"])
    torch.manual_seed(0)
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"not a real tokenizer, only copied")
    return config, Transformer(config.model), tokenizer


def test_round_trip_and_best(tmp_path):
    config, model, tokenizer = tiny(tmp_path)
    run = RunDir(tmp_path / "run")
    for step, loss in [(1, 3.0), (2, 2.0), (3, 2.5)]:
        state = {"step": step, "rng": torch.get_rng_state()}
        Checkpoint.write(run.checkpoint_path(step), model, config, tokenizer, state, {"step": step, "val_loss": loss})
    assert [c.step for c in run.checkpoints()] == [1, 2, 3]
    assert resolve(run.path).name == "step-000002"
    assert resolve(run.path, prefer="latest").name == "step-000003"
    loaded = load_checkpoint(run.path)
    x = torch.randint(0, 64, (1, 8))
    assert torch.equal(loaded.model(x)[0], model.eval()(x)[0])
    assert Checkpoint.read(loaded.path).trainer_state()["step"] == 2
    # The tied head is stored once, as the embedding, and is one parameter again once loaded.
    assert "lm_head.weight" not in load_file(str(loaded.path / "model.safetensors"))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_loading_builds_on_meta_and_keeps_every_weight_and_buffer(tmp_path):
    config, model, tokenizer = tiny(tmp_path)
    path = Checkpoint.write(tmp_path / "c", model, config, tokenizer).path
    loaded = Checkpoint.read(path).model()
    reference = dict(model.named_buffers())
    for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]:
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32, name
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, reference[name]), name
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters(), strict=True))


def test_weights_that_do_not_match_the_model_are_refused(tmp_path):
    config, model, tokenizer = tiny(tmp_path)
    path = Checkpoint.write(tmp_path / "c", model, config, tokenizer).path
    other = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                               "model.context_length=16"])
    (path / "config.yaml").write_text(other.to_yaml())
    with pytest.raises(Exception, match="weights do not match the model"):
        Checkpoint.read(path, verify=False).model()


def test_torn_checkpoint_is_skipped(tmp_path):
    config, model, tokenizer = tiny(tmp_path)
    run = RunDir(tmp_path / "run")
    good = Checkpoint.write(run.checkpoint_path(1), model, config, tokenizer, {"step": 1})
    torn = Checkpoint.write(run.checkpoint_path(2), model, config, tokenizer, {"step": 2})
    (torn.path / "model.safetensors").write_bytes(b"truncated")
    no_manifest = Checkpoint.write(run.checkpoint_path(3), model, config, tokenizer, {"step": 3})
    (no_manifest.path / "manifest.json").unlink()
    assert [c.path for c in run.checkpoints()] == [good.path]
    with pytest.raises(UsageError, match="incomplete or corrupt"):
        resolve(torn.path)


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    config, model, tokenizer = tiny(tmp_path)
    run = RunDir(tmp_path / "run")
    for step, loss in [(1, 2.0), (2, 1.0), (3, 3.0), (4, 2.5), (5, 2.6)]:
        Checkpoint.write(run.checkpoint_path(step), model, config, tokenizer, info={"step": step, "val_loss": loss})
    run.prune(keep_last=2)
    assert [c.step for c in run.checkpoints()] == [2, 4, 5]
    assert run.start_over() == 3
    assert run.checkpoints() == []


def test_eval_results_belong_to_their_checkpoint(tmp_path):
    config, model, tokenizer = tiny(tmp_path)
    run = RunDir(tmp_path / "run")
    Checkpoint.write(run.checkpoint_path(1), model, config, tokenizer, info={"step": 1})
    loaded = load_checkpoint(run.path)
    assert isinstance(loaded, LoadedModel) and loaded.run_dir == run
    assert loaded.eval_results_path == run.eval_path
    assert loaded.eval_results() is None
    loaded.save_eval_results({"loss": 1.5, "checkpoint": str(loaded.path)})
    assert loaded.eval_results() == {"loss": 1.5, "checkpoint": str(loaded.path)}
    run.eval_path.write_text(json.dumps({"loss": 9.0, "checkpoint": str(tmp_path / "elsewhere")}))
    assert loaded.eval_results() is None


def test_data_folder_reads_what_preprocess_wrote(tiny_data):
    data = DataFolder.open(tiny_data)
    assert data.vocab_size == 512 and data.tokenizer_path.name == "tokenizer.model"
    for split in ("train", "val"):
        assert len(data.split(split)) == data.split_tokens(split) > 0
    assert data.bytes_per_token("val") == data.manifest["splits"]["val"]["bytes"] / data.split_tokens("val")
    with pytest.raises(UsageError, match="run `hetlm preprocess` first"):
        DataFolder.open(tiny_data / "missing")


def test_bundles_get_the_modes_of_ordinary_new_files(tmp_path):
    def fill(folder):
        (folder / "a.json").write_text("{}")
        torch.save({"x": torch.ones(1)}, folder / "b.pt")
        # safetensors writes a file of its own and renames it: 0600.
        save_file({"x": torch.ones(1)}, folder / "model.safetensors")
        (folder / "tokenizer.model").write_bytes(b"pieces")
        return {"config": {}}

    umask = os.umask(0o022)
    try:
        out = write_bundle(tmp_path / "bundle", fill)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        "a.json": 0o644, "b.pt": 0o644, "model.safetensors": 0o644, "tokenizer.model": 0o644, "hetlm.json": 0o644}
    assert read_bundle_manifest(out)["files"].keys() == {"a.json", "b.pt", "model.safetensors", "tokenizer.model"}

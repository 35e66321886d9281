import torch
from safetensors.torch import load_file

from hetlm.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from hetlm.config import load_config
from hetlm.errors import UsageError
from hetlm.model import Transformer


def tiny(tmp_path):
    config = load_config(None, ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                                "model.context_length=16"])
    torch.manual_seed(0)
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"not a real tokenizer, only copied")
    return config, Transformer(config.model), tokenizer


def test_round_trip_and_best(tmp_path):
    config, model, tokenizer = tiny(tmp_path)
    run = tmp_path / "run"
    for step, loss in [(1, 3.0), (2, 2.0), (3, 2.5)]:
        state = {"step": step, "rng": torch.get_rng_state()}
        save_checkpoint(run / "checkpoints" / step_dir_name(step), model, config, tokenizer, state,
                        {"step": step, "val_loss": loss})
    assert [s for s, _ in list_checkpoints(run)] == [1, 2, 3]
    assert resolve_checkpoint(run).name == "step-000002"
    assert resolve_checkpoint(run, prefer="latest").name == "step-000003"
    loaded = load_checkpoint(run)
    x = torch.randint(0, 64, (1, 8))
    assert torch.equal(loaded.model(x)[0], model.eval()(x)[0])
    assert load_trainer_state(loaded.path)["step"] == 2
    # The tied head is stored once, as the embedding.
    assert "lm_head.weight" not in load_file(str(loaded.path / "model.safetensors"))


def test_torn_checkpoint_is_skipped(tmp_path):
    config, model, tokenizer = tiny(tmp_path)
    run = tmp_path / "run"
    good = save_checkpoint(run / "checkpoints" / step_dir_name(1), model, config, tokenizer, {"step": 1})
    torn = save_checkpoint(run / "checkpoints" / step_dir_name(2), model, config, tokenizer, {"step": 2})
    (torn / "model.safetensors").write_bytes(b"truncated")
    no_manifest = save_checkpoint(run / "checkpoints" / step_dir_name(3), model, config, tokenizer, {"step": 3})
    (no_manifest / "manifest.json").unlink()
    assert list_checkpoints(run) == [(1, good)]
    try:
        resolve_checkpoint(torn)
    except UsageError as exc:
        assert "incomplete or corrupt" in str(exc)
    else:
        raise AssertionError("a torn checkpoint must be refused")

"""Shared fixtures: run the CLI in-process and capture what it prints."""

from __future__ import annotations

import pytest
import torch

from hetlm.cli import run


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny test models run fastest on one thread; more threads only fight over the cores.

    Reset around every test: the CLI applies the plan (one thread per core), which lasts for the process.
    """
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Call ``cli("preprocess", "x")`` and get the exit code, stdout and stderr."""

    def invoke(*args: str) -> CliResult:
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A finished data folder (vocab 512, about 300 KB of stdlib source, 10% val) shared by the session."""
    from hetlm.config import load_config
    from hetlm.preprocess import preprocess, stdlib_root

    corpus = tmp_path_factory.mktemp("tiny-corpus")
    size = 0
    for path in sorted(stdlib_root().glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if size + len(text) > 300_000 or len(text) > 40_000:
            continue
        (corpus / path.name).write_text(text, encoding="utf-8")
        size += len(text)
    out = tmp_path_factory.mktemp("tiny-data") / "data"
    config = load_config(overrides=["data.vocab_size=512", "data.val_fraction=0.1"])
    return preprocess(config, [str(corpus)], out, workers=1).out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory):
    """A run folder with one checkpoint of a tiny model (2 layers, d_model 64, context 64) on tiny_data's tokenizer,
    trained for 60 steps so its samples are not pure noise."""
    from hetlm.config import load_config
    from hetlm.data import sample_windows
    from hetlm.model import Transformer
    from hetlm.store import Checkpoint, RunDir, open_split

    config = load_config(overrides=[
        f"data.dir={tiny_data}", "data.vocab_size=512", "model.vocab_size=512", "model.n_layers=2", "model.d_model=64",
        "model.n_heads=4", "model.n_kv_heads=2", "model.context_length=64", "device.device=cpu",
    ])
    torch.manual_seed(0)
    model = Transformer(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = open_split(tiny_data, "train")
    generator = torch.Generator().manual_seed(0)
    steps = 60
    for _ in range(steps):
        batch = sample_windows(tokens, 16, config.model.context_length + 1, generator)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        val = sample_windows(open_split(tiny_data, "val"), 16, config.model.context_length + 1, generator)
        val_loss = float(model(val[:, :-1], val[:, 1:])[1])
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    Checkpoint.write(RunDir(run).checkpoint_path(steps), model, config, tiny_data / "tokenizer.model",
                     info={"step": steps, "val_loss": val_loss})
    return run


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """The tiny checkpoint's model, loaded once per test module."""
    from hetlm.store import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    """The tiny data folder's tokenizer (the tiny checkpoint's too)."""
    from hetlm.tokenizer import Tokenizer

    return Tokenizer.load(tiny_data / "tokenizer.model")


# One clear line on stderr and an exit code, no traceback: what every rejected command must give.
def one_error(result, code: int) -> str:
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.err
    return errors[0]

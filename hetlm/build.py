"""``hetlm build``: resolve the model against the data folder's tokenizer and create the run folder.

A run folder holds ``config.yaml`` (the resolved configuration of the latest build or train),
``checkpoints/step-NNNNNN/`` and, once training has run, ``metrics.jsonl``, ``loss.png`` and
``tensorboard/``. The step-0 checkpoint holds the seeded initial weights, so every training run
of a given config starts from the same bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetlm.checkpoint import (
    CONFIG,
    TOKENIZER,
    list_checkpoints,
    load_config_file,
    read_manifest,
    save_checkpoint,
    step_dir_name,
)
from hetlm.config import Config, save_config
from hetlm.errors import UsageError
from hetlm.io import sha256_file
from hetlm.model import Transformer, flops_per_token, parameter_counts
from hetlm.reporting import NullReporter, Reporter


@dataclass(frozen=True)
class DataFolder:
    """A preprocessed data folder: its manifest, tokenizer and vocabulary size."""

    path: Path
    manifest: dict[str, Any]
    tokenizer_path: Path
    tokenizer_sha256: str
    vocab_size: int

    def bytes_per_token(self, split: str = "val") -> float | None:
        info = self.manifest.get("splits", {}).get(split, {})
        tokens, size = info.get("tokens"), info.get("bytes")
        if not tokens or not size:
            return None
        return size / tokens


@dataclass(frozen=True)
class BuildResult:
    run_dir: Path
    # The configuration with model.vocab_size filled in from the tokenizer.
    config: Config
    checkpoint: Path
    params: dict[str, int]
    flops_per_token: int
    # False when the run folder already held this model (build is then a no-op).
    created: bool
    latest_step: int


def open_data_folder(config: Config) -> DataFolder:
    """The data folder named by ``data.dir``; UsageError when it is missing or unreadable."""
    from hetlm.preprocess import load_data_manifest

    path = Path(config.data.dir)
    if not path.is_dir():
        raise UsageError(f"data folder {path} not found: run `hetlm preprocess` first (or set data.dir)")
    manifest = load_data_manifest(path)
    tokenizer = path / TOKENIZER
    if not tokenizer.is_file():
        raise UsageError(f"data folder {path} has no {TOKENIZER}: run `hetlm preprocess` again")
    return DataFolder(path, manifest, tokenizer, sha256_file(tokenizer), _tokenizer_vocab_size(tokenizer))


def _tokenizer_vocab_size(path: Path) -> int:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"{path} is not a readable SentencePiece model ({exc})") from None


def resolve_config(config: Config, data: DataFolder) -> Config:
    """``config`` with model.vocab_size taken from the tokenizer; a conflicting explicit value is an error."""
    wanted = config.model.vocab_size
    if wanted and wanted != data.vocab_size:
        raise UsageError(
            f"model.vocab_size is {wanted} but the tokenizer in {data.path} has {data.vocab_size} pieces "
            "(leave model.vocab_size at 0 to take it from the tokenizer)"
        )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=data.vocab_size))


def default_run_dir(config: Config) -> Path:
    return Path("runs") / config.name


def model_differences(saved: Config, wanted: Config) -> list[str]:
    """``key: saved -> wanted`` for each model key that differs."""
    old, new = dataclasses.asdict(saved.model), dataclasses.asdict(wanted.model)
    return [f"model.{key}: {old[key]} -> {new[key]}" for key in old if old[key] != new[key]]


def check_compatible(checkpoint: Path, config: Config, data: DataFolder, run_dir: Path) -> None:
    """UsageError unless ``checkpoint`` was made for this model and this data folder's tokenizer."""
    manifest = read_manifest(checkpoint, verify=False) or {}
    saved_tokenizer = manifest.get("files", {}).get(TOKENIZER)
    if saved_tokenizer != data.tokenizer_sha256:
        raise UsageError(
            f"data folder {data.path} was made with another tokenizer than run {run_dir}: "
            "preprocess with the run's settings, or use a new --out"
        )
    changed = model_differences(load_config_file(checkpoint), config)
    if changed:
        raise UsageError(
            f"run {run_dir} was built with another model ({'; '.join(changed[:3])}): use a new --out or remove the run"
        )


def init_model(config: Config) -> Transformer:
    """The initial model, seeded by train.seed so the same config always starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        return Transformer(config.model)


def build_run(config: Config, out: Path | None = None, reporter: Reporter = NullReporter(),
              data: DataFolder | None = None) -> BuildResult:
    """Create (or confirm) the run folder for ``config`` with its step-0 checkpoint."""
    data = data or open_data_folder(config)
    config = resolve_config(config, data)
    run_dir = Path(out) if out is not None else default_run_dir(config)
    counts = parameter_counts(config.model)
    flops = flops_per_token(config.model)
    existing = list_checkpoints(run_dir, reporter)
    if existing:
        latest_step, latest = existing[-1]
        check_compatible(latest, config, data, run_dir)
        reporter.info(f"run {run_dir} already holds this model (newest checkpoint: step {latest_step}); nothing to build")
        return BuildResult(run_dir, config, latest, counts, flops, created=False, latest_step=latest_step)
    checkpoint = run_dir / "checkpoints" / step_dir_name(0)
    save_checkpoint(checkpoint, init_model(config), config, data.tokenizer_path, info={"step": 0, "tokens": 0})
    save_config(config, run_dir / CONFIG)
    return BuildResult(run_dir, config, checkpoint, counts, flops, created=True, latest_step=0)

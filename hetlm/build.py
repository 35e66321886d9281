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

from hetlm.config import Config, ModelConfig
from hetlm.errors import ConfigError, UsageError
from hetlm.hf_import import hf_tokenizer, is_hf_folder, read_hf_llama
from hetlm.io import sha256_file
from hetlm.model import Transformer, flops_per_token, parameter_counts
from hetlm.reporting import NullReporter, Reporter
from hetlm.store import MANIFEST, TOKENIZER, WEIGHTS, Checkpoint, DataFolder, RunDir, is_bundle, load_checkpoint, resolve

# Model keys that shape training, not the weights: a run started with --init may set its own.
TRAINING_MODEL_KEYS = ("context_length", "dropout", "attention_dropout")


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


def config_changes(saved: Config, wanted: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, wanted value) for each configuration key that differs."""
    old, new = flat_config(saved), flat_config(wanted)
    return [(key, old[key], new[key]) for key in new if old.get(key) != new[key]]


def flat_config(config: Config) -> dict[str, Any]:
    """``section.key`` (and ``name``) -> value."""
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{leaf}": v for leaf, v in value.items()})
        else:
            flat[key] = value
    return flat


def check_compatible(checkpoint: Checkpoint, config: Config, data: DataFolder, run_dir: Path) -> None:
    """UsageError unless ``checkpoint`` was made for this model and this data folder's tokenizer."""
    if checkpoint.tokenizer_sha256 != data.tokenizer_sha256:
        raise UsageError(
            f"data folder {data.path} was made with another tokenizer than run {run_dir}: "
            "preprocess with the run's settings, or use a new --out"
        )
    changed = model_differences(checkpoint.config(), config)
    if changed:
        raise UsageError(
            f"run {run_dir} was built with another model ({'; '.join(changed[:3])}): use a new --out or remove the run"
        )


@dataclass(frozen=True)
class InitSource:
    """Weights a new run starts from (``train --init``): a hetlm run, checkpoint or bundle, or a HF Llama folder."""

    model: Transformer
    model_config: ModelConfig
    tokenizer_path: Path
    # What the run records: the source as given, the checkpoint or folder read, the sha256 of its weights.
    lineage: dict[str, str]


def _hf_first(path: Path) -> bool:
    """A Hugging Face folder that is not a hetlm bundle (which carries a config.json too)."""
    return is_hf_folder(path) and not is_bundle(path) and not RunDir.is_run(path) and not (path / MANIFEST).is_file()


def open_init(source: Path) -> InitSource:
    """The model, tokenizer and lineage of ``source`` (a run's best checkpoint, by val loss, else its newest)."""
    source = Path(source)
    if _hf_first(source):
        hf = read_hf_llama(source)
        model = Transformer.from_state_dict(hf.model, hf.state)
        return InitSource(model, hf.model, hf.tokenizer_path, {
            "source": str(source), "checkpoint": str(source.resolve()), "format": "hf", "weights_sha256": hf.weights_sha256})
    loaded = load_checkpoint(source, prefer="best")
    return InitSource(loaded.model, loaded.config.model, loaded.tokenizer_path, {
        "source": str(source), "checkpoint": str(loaded.path.resolve()), "format": "hetlm",
        "weights_sha256": loaded.manifest["files"][WEIGHTS]})


def tokenizer_source(source: Path) -> Path:
    """The tokenizer.model of a run, checkpoint, bundle, data folder or HF Llama folder (``--tokenizer-from``)."""
    source = Path(source)
    if _hf_first(source):
        return hf_tokenizer(source)
    if (source / MANIFEST).is_file() and (source / TOKENIZER).is_file() and not RunDir.is_run(source):
        # A checkpoint or a data folder: both keep the tokenizer beside their manifest.
        return source / TOKENIZER
    return resolve(source) / TOKENIZER


def init_config(config: Config, source: InitSource, data: DataFolder) -> Config:
    """``config`` with the model of ``source``; a model key set to something else is an error, bar TRAINING_MODEL_KEYS.

    A key counts as set when it differs from the built-in default. The data folder must use the source's tokenizer.
    """
    if sha256_file(source.tokenizer_path) != data.tokenizer_sha256:
        raise UsageError(f"data folder {data.path} was made with another tokenizer than --init {source.lineage['source']}: "
                         f"preprocess with --tokenizer-from {source.lineage['source']}")
    wanted, base = dataclasses.asdict(config.model), dataclasses.asdict(source.model_config)
    defaults = dataclasses.asdict(ModelConfig())
    own = {key: wanted[key] for key in TRAINING_MODEL_KEYS if wanted[key] != defaults[key]}
    conflicts = [f"model.{key}: {base[key]} in the source, {wanted[key]} here" for key in wanted
                 if key not in TRAINING_MODEL_KEYS and wanted[key] not in (defaults[key], base[key])]
    if conflicts:
        raise UsageError(f"--init {source.lineage['source']} brings its model, and the config contradicts it "
                         f"({'; '.join(conflicts[:3])}): leave model keys out of the config")
    resolved = dataclasses.replace(config, model=dataclasses.replace(source.model_config, **own))
    try:
        resolved.validate()
    except ConfigError as exc:
        raise UsageError(f"--init {source.lineage['source']}: {exc}") from None
    return resolved


def init_model(config: Config) -> Transformer:
    """The initial model, seeded by train.seed so the same config always starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        return Transformer(config.model)


def build_run(config: Config, out: Path | None = None, reporter: Reporter = NullReporter(),
              data: DataFolder | None = None, init: InitSource | None = None) -> BuildResult:
    """Create (or confirm) the run folder for ``config`` with its step-0 checkpoint (``init``'s weights, if given)."""
    data = data or DataFolder.open(config.data.dir)
    config = resolve_config(config, data)
    run_dir = Path(out) if out is not None else default_run_dir(config)
    run = RunDir(run_dir)
    counts = parameter_counts(config.model)
    flops = flops_per_token(config.model)
    existing = run.checkpoints(reporter)
    if existing:
        latest = existing[-1]
        check_compatible(latest, config, data, run_dir)
        reporter.info(f"run {run_dir} already holds this model (newest checkpoint: step {latest.step}); nothing to build")
        return BuildResult(run_dir, config, latest.path, counts, flops, created=False, latest_step=latest.step)
    info: dict[str, Any] = {"step": 0, "tokens": 0}
    if init is not None:
        info["init"] = init.lineage
    model = init.model if init is not None else init_model(config)
    checkpoint = Checkpoint.write(run.checkpoint_path(0), model, config, data.tokenizer_path, info=info)
    run.save_config(config)
    return BuildResult(run_dir, config, checkpoint.path, counts, flops, created=True, latest_step=0)

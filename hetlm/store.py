"""Every on-disk format hetlm reads and writes, and its file names, in one place.

Data folder (written by ``hetlm preprocess``)::

    tokenizer.model   the SentencePiece model
    train.bin         token ids, little-endian uint16 (uint32 above 65536 pieces), each document <s> ... </s>
    val.bin
    train.mask.bin    chat data only (manifest "chat": true): one uint8 per token, 1 where training learns the
    val.mask.bin      token (the assistant's replies), 0 where it is only context
    config.yaml       the resolved configuration
    manifest.json     written last: format version, dtype, tokenizer sha256, per-split counts, sources

Run folder (``hetlm build`` / ``hetlm train``)::

    config.yaml       the resolved configuration of the latest build or train
    changes.json      what each ``hetlm train`` changed in it: [{"step", "key", "from", "to"}], oldest first
    checkpoints/step-NNNNNN/
    metrics.jsonl     one JSON record per log interval and evaluation
    eval.json         the latest ``hetlm eval`` of one of its checkpoints
    loss.png, tensorboard/

Checkpoint folder ``RUN/checkpoints/step-NNNNNN/``::

    model.safetensors learned weights (fp32; a tied lm_head is stored once, as the embedding)
    trainer.pt        the trainer's state (torch.load(weights_only=True))
    config.yaml
    tokenizer.model
    manifest.json     written last: the completeness marker, with the sha256 of every other file

Bundle folder (``hetlm deploy``): Hugging Face files (``--format hf``) and/or ``model.gguf`` with an Ollama
``Modelfile`` (``--format gguf``) beside ``hetlm.json``, written last, which holds hetlm's config, metrics and
source and the sha256 of every other file.

Checkpoints and bundles are assembled under a temporary name, fsynced and renamed (``hetlm.io``), so a
crash leaves either the previous state or a complete folder; one whose manifest is missing, does not list
every file it needs with its sha256, or whose hashes do not match is treated as torn and skipped.
Weights are checked against the config from the safetensors header before any model is built.

Writers lock what they write (``.hetlm.lock`` in a run or data folder, ``.NAME.lock`` beside a bundle),
and clean up what crashed writers left there once they hold the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hetlm import __version__
from hetlm.config import Config, ModelConfig, config_from_dict, save_config
from hetlm.errors import HetlmError, UsageError
from hetlm.io import (
    FileLock,
    aside_path,
    atomic_dir,
    atomic_write_json,
    clean_up,
    disk_full_errors,
    recover,
    remove_path,
    sha256_file,
    size_of,
)
from hetlm.model import Transformer
from hetlm.reporting import NullReporter, Reporter

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"
BUNDLE_MANIFEST = "hetlm.json"
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CHANGES = "changes.json"
EVAL_RESULTS = "eval.json"
LOSS_PLOT = "loss.png"
TENSORBOARD = "tensorboard"
LOCK = ".hetlm.lock"
SPLITS = ("train", "val")
# What loading needs; a manifest that leaves one out does not vouch for it (a bundle may hold other formats only).
CHECKPOINT_FILES = (WEIGHTS, CONFIG, TOKENIZER)
BUNDLE_FILES = (WEIGHTS, TOKENIZER)
WEIGHT_DTYPES = ("F32", "F16", "BF16")
LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.")
SHA256 = re.compile(r"[0-9a-f]{64}")

DATA_FORMAT_VERSION = 1
CHECKPOINT_FORMAT_VERSION = 1
BUNDLE_FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


def _unlisted(files: Any, required: tuple[str, ...]) -> str | None:
    """What is wrong with a manifest's "files" (name -> sha256 of each plain file name), or None."""
    if not isinstance(files, dict):
        return "it lists no files"
    for name, digest in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            return f"it lists {name!r}, which is not a file name in the folder"
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            return f"its sha256 of {name} is not one"
    missing = [name for name in required if name not in files]
    return f"it does not list {', '.join(missing)}" if missing else None


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_config(folder: Path) -> Config:
    """The configuration saved beside an output (a checkpoint, a run)."""
    try:
        return config_from_dict(yaml.safe_load((Path(folder) / CONFIG).read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise HetlmError(f"cannot read the configuration saved in {folder}: {exc}") from None


# --- data folders ---------------------------------------------------------------------------------------


def read_data_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a finished data folder; UsageError (exit 2) when there is none."""
    folder = Path(path)
    if not folder.exists():
        raise UsageError(f"data folder {folder} not found: run `hetlm preprocess` first (or set data.dir)")
    if not folder.is_dir():
        raise UsageError(f"not a data folder: {folder} is a file")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UsageError(f"{folder} has no {MANIFEST}: preprocessing did not finish there (run `hetlm preprocess`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {manifest_path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != DATA_FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UsageError(f"{manifest_path}: data format {found!r} is not supported (expected {DATA_FORMAT_VERSION}); "
                         "run `hetlm preprocess --force`")
    return manifest


def split_file_name(split: str) -> str:
    return f"{split}.bin"


def mask_file_name(split: str) -> str:
    return f"{split}.mask.bin"


def finished_data_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder`` when every file it lists is there at its size; None otherwise (no errors)."""
    manifest = _read_json(Path(folder) / MANIFEST)
    if not isinstance(manifest, dict):
        return None
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in SPLITS:
            entry = manifest["splits"][split]
            if (Path(folder) / entry["file"]).stat().st_size != entry["tokens"] * itemsize:
                return None
            if manifest.get("chat") and (Path(folder) / entry["mask_file"]).stat().st_size != entry["tokens"]:
                return None
    except (KeyError, TypeError, OSError):
        return None
    return manifest if (Path(folder) / TOKENIZER).is_file() else None


def open_split(path: str | Path, split: str, manifest: dict[str, Any] | None = None) -> np.memmap:
    """The token ids of ``split`` ("train" or "val") of a data folder, as a read-only memmap."""
    manifest = manifest if manifest is not None else read_data_manifest(path)
    if split not in manifest.get("splits", {}):
        raise UsageError(f"unknown split {split!r}: choose from {', '.join(manifest.get('splits', {}))}")
    entry = manifest["splits"][split]
    file = Path(path) / entry["file"]
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    expected = entry["tokens"] * dtype.itemsize
    if not file.is_file() or file.stat().st_size != expected:
        raise HetlmError(f"{file} is missing or truncated (expected {expected} bytes); run `hetlm preprocess --force`")
    return np.memmap(file, dtype=dtype, mode="r")


def open_mask(path: str | Path, split: str, manifest: dict[str, Any]) -> np.memmap | None:
    """The loss mask of ``split`` of a chat data folder (uint8, one per token, 1 = learned), None for plain data."""
    if not manifest.get("chat"):
        return None
    entry = manifest["splits"][split]
    file = Path(path) / entry.get("mask_file", mask_file_name(split))
    if not file.is_file() or file.stat().st_size != entry["tokens"]:
        raise HetlmError(f"{file} is missing or truncated (expected {entry['tokens']} bytes); "
                         "run `hetlm preprocess --force`")
    return np.memmap(file, dtype=np.uint8, mode="r")


@dataclass(frozen=True)
class DataFolder:
    """A preprocessed data folder: its manifest, tokenizer and vocabulary size."""

    path: Path
    manifest: dict[str, Any]
    tokenizer_path: Path
    tokenizer_sha256: str
    vocab_size: int

    @classmethod
    def open(cls, path: str | Path) -> DataFolder:
        """The finished data folder at ``path``; UsageError when it is missing, unfinished or unreadable."""
        path = Path(path)
        manifest = read_data_manifest(path)
        tokenizer = path / TOKENIZER
        if not tokenizer.is_file():
            raise UsageError(f"data folder {path} has no {TOKENIZER}: run `hetlm preprocess` again")
        try:
            vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
        except (OSError, RuntimeError) as exc:
            raise UsageError(f"{tokenizer} is not a readable SentencePiece model ({exc})") from None
        return cls(path, manifest, tokenizer, sha256_file(tokenizer), vocab_size)

    def split(self, name: str) -> np.memmap:
        return open_split(self.path, name, self.manifest)

    @property
    def chat(self) -> bool:
        return bool(self.manifest.get("chat"))

    def mask(self, name: str) -> np.memmap | None:
        """The loss mask of split ``name`` (see ``open_mask``)."""
        return open_mask(self.path, name, self.manifest)

    def split_tokens(self, name: str) -> int:
        return int(self.manifest.get("splits", {}).get(name, {}).get("tokens", 0))

    def bytes_per_token(self, split: str = "val") -> float | None:
        """The split's UTF-8 bytes per token, from the manifest's totals."""
        info = self.manifest.get("splits", {}).get(split, {})
        tokens, size = info.get("tokens"), info.get("bytes")
        if not tokens or not size:
            return None
        return size / tokens


# --- checkpoints --------------------------------------------------------------------------------------


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as contiguous fp32 CPU tensors, a tied lm_head left out."""
    model = getattr(model, "_orig_mod", model)
    tied = getattr(model, "config", None) is not None and model.config.tie_embeddings
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        state[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return state


def weights_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of each tensor in a safetensors file, from its header: no tensor is read."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                    for name in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file ({exc})") from None


def expected_weights(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each weight a checkpoint of ``model`` holds (a tied lm_head is the embedding)."""
    with torch.device("meta"):
        # One layer stands for all of them: a config claiming thousands of layers costs nothing here.
        one = Transformer(dataclasses.replace(model, n_layers=1))
    shapes = {}
    for name, param in one.named_parameters():
        if (match := LAYER_WEIGHT.match(name)) is None:
            shapes[name] = tuple(param.shape)
            continue
        rest = name[match.end():]
        for layer in range(model.n_layers):
            shapes[f"model.layers.{layer}.{rest}"] = tuple(param.shape)
    return shapes


def check_weights(config: Config, weights_path: Path) -> None:
    """UsageError unless ``weights_path`` holds exactly the weights of ``config``'s model, in shape and dtype.

    Only the header is read, and nothing the size of the model is built, so an edited config cannot make
    loading allocate what it claims before the weights contradict it.
    """
    header = weights_header(weights_path)
    model = config.model
    mismatch = f"{weights_path}: weights do not match the model"
    layers = {int(match.group(1)) for name in header if (match := LAYER_WEIGHT.match(name))}
    if layers != set(range(model.n_layers)):
        raise UsageError(f"{mismatch} (the config has model.n_layers={model.n_layers}, the weights {len(layers)} layers)")
    expected = expected_weights(model)
    if model.tie_embeddings and "lm_head.weight" in header:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    if unknown := sorted(set(header) - set(expected)):
        raise UsageError(f"{mismatch} (unexpected {unknown[:3]})")
    if missing := sorted(set(expected) - set(header)):
        raise UsageError(f"{mismatch} (missing {missing[:3]})")
    for name, (shape, dtype) in header.items():
        if shape != expected[name]:
            raise UsageError(f"{mismatch} ({name} is {list(shape)} in the weights, {list(expected[name])} in the config)")
        if dtype not in WEIGHT_DTYPES:
            raise UsageError(f"{mismatch} ({name} is {dtype}; weights are {', '.join(WEIGHT_DTYPES)})")


def model_from_weights(config: Config, weights_path: Path, device: str | torch.device = "cpu") -> Transformer:
    """The model of ``config`` with the weights in ``weights_path`` (fp32 whatever they are stored in), on ``device``."""
    check_weights(config, weights_path)
    return Transformer.from_state_dict(config.model, load_file(str(weights_path)), device)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(map(_tensor_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(_tensor_bytes, obj))
    return 0


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def write(cls, path: Path, model: torch.nn.Module, config: Config, tokenizer_path: Path,
              trainer_state: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
              weights: dict[str, torch.Tensor] | None = None) -> Checkpoint:
        """Write a complete checkpoint folder at ``path`` atomically; ``info`` (step, val_loss...) goes in the manifest.

        ``weights`` replaces the model's own (an offloaded optimizer's fp32 masters)."""
        path = Path(path)
        state = weights_state_dict(model) if weights is None else {
            name: tensor.to("cpu", torch.float32).contiguous() for name, tensor in weights.items()}
        needs = _tensor_bytes(state) + _tensor_bytes(trainer_state) + os.path.getsize(tokenizer_path)
        with disk_full_errors(path, needs), atomic_dir(path) as tmp:
            save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
            if trainer_state is not None:
                # Through a Python file: a full disk then surfaces as an OSError, not as torch's "unexpected pos".
                with open(tmp / TRAINER_STATE, "wb") as handle:
                    torch.save(trainer_state, handle)
            (tmp / CONFIG).write_text(config.to_yaml(), encoding="utf-8")
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {
                "format_version": CHECKPOINT_FORMAT_VERSION,
                "kind": "checkpoint",
                "hetlm_version": __version__,
                **(info or {}),
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return cls(path, manifest)

    @classmethod
    def read(cls, path: Path, verify: bool = True) -> Checkpoint | None:
        """The checkpoint at ``path``, or None when its manifest is missing, unreadable or does not match its files."""
        path = Path(path)
        manifest = _read_json(path / MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("kind") != "checkpoint" \
                or _unlisted(manifest.get("files"), CHECKPOINT_FILES) is not None:
            return None
        if TRAINER_STATE not in manifest["files"] and os.path.lexists(path / TRAINER_STATE):
            # Optimizer state nothing vouches for is not resumed from.
            return None
        for name, digest in manifest["files"].items():
            file = path / name
            if not file.is_file() or (verify and sha256_file(file) != digest):
                return None
        return cls(path, manifest)

    @property
    def step(self) -> int:
        """The optimizer steps the weights have seen (the folder's number when the manifest does not say)."""
        if isinstance(self.manifest.get("step"), int):
            return self.manifest["step"]
        match = STEP_DIR.match(self.path.name)
        return int(match.group(1)) if match else 0

    @property
    def val_loss(self) -> float | None:
        loss = self.manifest.get("val_loss")
        return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.manifest["files"].get(TOKENIZER)

    @property
    def has_trainer_state(self) -> bool:
        return TRAINER_STATE in self.manifest["files"]

    def config(self) -> Config:
        return read_config(self.path)

    def model(self, device: str | torch.device = "cpu") -> Transformer:
        return model_from_weights(self.config(), self.path / WEIGHTS, device)

    def trainer_state(self) -> dict[str, Any]:
        return torch.load(self.path / TRAINER_STATE, map_location="cpu", weights_only=True)


# --- run folders -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """A run folder: its configuration, checkpoints, metrics and evaluation results."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @staticmethod
    def is_run(path: Path) -> bool:
        return (Path(path) / CHECKPOINTS).is_dir()

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def changes_path(self) -> Path:
        return self.path / CHANGES

    def changes(self) -> list[dict[str, Any]]:
        """What ``hetlm train`` changed in the run's config, oldest first (empty when nothing was)."""
        recorded = _read_json(self.changes_path)
        return recorded if isinstance(recorded, list) else []

    def record_changes(self, step: int, changes: list[tuple[str, Any, Any]]) -> None:
        """Append ``changes`` (key, old, new), which take effect at ``step``, to changes.json (hold the run's lock)."""
        records = self.changes() + [{"step": step, "key": key, "from": old, "to": new} for key, old, new in changes]
        atomic_write_json(self.changes_path, records)

    @property
    def eval_path(self) -> Path:
        return self.path / EVAL_RESULTS

    @property
    def loss_plot_path(self) -> Path:
        return self.path / LOSS_PLOT

    @property
    def tensorboard_path(self) -> Path:
        return self.path / TENSORBOARD

    def checkpoint_path(self, step: int) -> Path:
        return self.path / CHECKPOINTS / f"step-{step:06d}"

    def save_config(self, config: Config) -> None:
        save_config(config, self.config_path)

    def saved_config(self) -> Config | None:
        """The run's config.yaml, else its newest checkpoint's config; None for a folder that is no run yet."""
        if self.config_path.is_file():
            return read_config(self.path)
        found = self.checkpoints(verify=False)
        return found[-1].config() if found else None

    def check_layout(self) -> None:
        """UsageError unless training may write and delete here: a folder (or room for one) with its checkpoints inside."""
        probe = self.path
        while not os.path.lexists(probe) and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            where = "" if probe == self.path else f" (cannot make {self.path})"
            raise UsageError(f"{probe} is a file, not a folder{where}: --out names the run folder")
        root = self.path / CHECKPOINTS
        if root.is_symlink():
            target = root.resolve()
            if not target.is_relative_to(self.path.resolve()):
                raise UsageError(f"{root} links to {target}, outside the run: training deletes old checkpoints there, "
                                 "so it refuses such a run (give the run its own checkpoints folder, or start "
                                 "from the other run with --resume PATH)")
        if os.path.lexists(root) and not root.is_dir():
            raise UsageError(f"{root} is not a folder")

    @contextlib.contextmanager
    def claim(self, reporter: Reporter = NullReporter()) -> Iterator[None]:
        """Lock the run for writing (refused while another process holds it), then clean up after crashed writers."""
        self.check_layout()
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path / LOCK, f"run {self.path}"):
            self.remove_stale(reporter)
            yield

    def checkpoints(self, reporter: Reporter = NullReporter(), verify: bool = True) -> list[Checkpoint]:
        """Complete checkpoints, oldest first; torn ones are reported and skipped."""
        root = self.path / CHECKPOINTS
        if not root.is_dir():
            return []
        found = []
        for child in root.iterdir():
            match = STEP_DIR.match(child.name)
            if not match or not child.is_dir():
                continue
            checkpoint = Checkpoint.read(child, verify=verify)
            if checkpoint is None:
                reporter.warning(f"skipping incomplete checkpoint {child} (no valid manifest)")
                continue
            found.append((int(match.group(1)), checkpoint))
        return [checkpoint for _, checkpoint in sorted(found, key=lambda item: item[0])]

    @staticmethod
    def best(checkpoints: list[Checkpoint]) -> Checkpoint | None:
        """The checkpoint with the lowest finite val_loss (the newest on a tie), or None."""
        scored = [(c.val_loss, -i, c) for i, c in enumerate(checkpoints) if c.val_loss is not None]
        return min(scored, key=lambda item: item[:2])[2] if scored else None

    def prune(self, keep_last: int) -> None:
        """Delete all but the newest ``keep_last`` checkpoints and the best by val loss, and any torn ones."""
        found = self.checkpoints(verify=False)
        complete = {c.path for c in found}
        for path in (self.path / CHECKPOINTS).glob("step-*"):
            if STEP_DIR.match(path.name) and path not in complete:
                _remove_checkpoint(path)
        keep = {c.path for c in found[-keep_last:]}
        if (best := self.best(found)) is not None:
            keep.add(best.path)
        for checkpoint in found:
            if checkpoint.path not in keep:
                _remove_checkpoint(checkpoint.path)

    def start_over(self) -> int:
        """Remove every checkpoint and the training records; returns how many checkpoints went."""
        removed = len(self.checkpoints(verify=False))
        for old in (self.path / CHECKPOINTS).glob("step-*"):
            _remove_checkpoint(old)
        for target in (self.metrics_path, self.loss_plot_path, self.tensorboard_path, self.changes_path):
            remove_path(target)
        return removed

    def remove_stale(self, reporter: Reporter = NullReporter()) -> None:
        """Finish or undo what a process that died while writing left (hold the run's lock), and say what."""
        done = clean_up(self.path / CHECKPOINTS, r"step-\d+")
        # eval.json is left out: hetlm eval writes it without waiting for a training run's lock.
        done += clean_up(self.path, "|".join(map(re.escape, (CONFIG, METRICS, CHANGES))))
        if done:
            reporter.info(f"cleaned up after an interrupted run in {self.path}: {'; '.join(done)}")


def _remove_checkpoint(path: Path) -> None:
    if path.is_symlink():
        # Never delete through a link: what it points to may be another run's.
        path.unlink()
        return
    # Removing the manifest first makes a half-deleted folder read as torn, never as complete.
    (path / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


# --- bundles -------------------------------------------------------------------------------------------


def is_bundle(path: Path) -> bool:
    return (Path(path) / BUNDLE_MANIFEST).is_file()


def read_bundle_manifest(path: Path, verify: bool = True) -> dict[str, Any]:
    """The bundle's hetlm.json; with ``verify`` every listed file must exist and match its sha256."""
    path = Path(path)
    try:
        meta = json.loads((path / BUNDLE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path / BUNDLE_MANIFEST} is not readable JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("kind") != "bundle" or not isinstance(meta.get("config"), dict):
        raise UsageError(f"{path / BUNDLE_MANIFEST} is not a hetlm bundle manifest")
    if (problem := _unlisted(meta.get("files"), ())) is not None:
        raise UsageError(f"bundle {path} is edited or corrupt: {problem} in {BUNDLE_MANIFEST}")
    for name, digest in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise UsageError(f"bundle {path} is incomplete: {name} is missing")
        if verify and sha256_file(file) != digest:
            raise UsageError(f"bundle {path} is corrupt: {name} does not match its sha256 in {BUNDLE_MANIFEST}")
    return meta


def bundle_lock_path(out: Path) -> Path:
    # Beside the bundle, not in it: the folder itself is replaced.
    return Path(out).with_name(f".{Path(out).name}.lock")


def write_bundle(out: Path, fill: Callable[[Path], dict[str, Any]], reporter: Reporter = NullReporter()) -> Path:
    """Write a bundle at ``out`` atomically: ``fill(folder)`` writes its files and returns hetlm.json's facts.

    Another process writing the same bundle makes this one fail; what crashed ones left is cleaned up first.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(bundle_lock_path(out), f"bundle {out}"):
        if done := clean_up(out.parent, re.escape(out.name)):
            reporter.info(f"cleaned up after an interrupted deploy: {'; '.join(done)}")
        # A bundle being replaced is the best guess of what the new one takes.
        needs = size_of(out) if is_bundle(out) else None
        with disk_full_errors(out, needs), atomic_dir(out) as tmp:
            meta = fill(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / BUNDLE_MANIFEST).write_text(json.dumps({
                "format_version": BUNDLE_FORMAT_VERSION, "kind": "bundle", "hetlm_version": __version__,
                **meta, "files": files}, indent=2) + "\n", encoding="utf-8")
    return out


# --- resolving and loading a trained model --------------------------------------------------------------


def resolve(target: Path, prefer: str = "best", reporter: Reporter = NullReporter()) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its best by val loss, else newest); a bundle as is."""
    target = Path(target)
    if not target.exists() and is_bundle(aside_path(target)):
        # A deploy was killed between moving the old bundle aside and moving the new one in (where folders
        # cannot be swapped in one step): put the old one back, unless a deploy is running.
        with contextlib.suppress(HetlmError), FileLock(bundle_lock_path(target), f"bundle {target}", patience=0.0):
            recover(target)
    if not target.exists():
        raise UsageError(f"{target} does not exist")
    if (target / MANIFEST).is_file():
        if (target / split_file_name("train")).is_file() and not (target / WEIGHTS).exists():
            raise UsageError(f"{target} is a data folder, not a model: give a run, checkpoint or bundle (hetlm eval "
                             "takes a data folder after --data)")
        if Checkpoint.read(target) is None:
            raise UsageError(f"{target} is an incomplete or corrupt checkpoint (its manifest does not match its files)")
        return target
    if RunDir.is_run(target):
        checkpoints = RunDir(target).checkpoints(reporter)
        if not checkpoints:
            raise UsageError(f"run {target} has no complete checkpoint yet")
        if prefer == "best" and (best := RunDir.best(checkpoints)) is not None:
            return best.path
        return checkpoints[-1].path
    if is_bundle(target):
        return target
    raise UsageError(f"{target} is not a run, checkpoint or bundle")


@dataclass
class LoadedModel:
    model: Transformer
    config: Config
    tokenizer_path: Path
    path: Path
    manifest: dict[str, Any]

    @property
    def is_bundle(self) -> bool:
        return self.manifest.get("kind") == "bundle"

    @property
    def run_dir(self) -> RunDir | None:
        """The run a checkpoint belongs to (None for a bundle or a checkpoint outside a run)."""
        if self.is_bundle or self.path.parent.name != CHECKPOINTS:
            return None
        return RunDir(self.path.parent.parent)

    @property
    def eval_results_path(self) -> Path | None:
        """Where ``hetlm eval`` records its results: the run folder, else the checkpoint folder; None for a bundle."""
        if self.is_bundle:
            return None
        run = self.run_dir
        return run.eval_path if run is not None else self.path / EVAL_RESULTS

    def eval_results(self, reporter: Reporter = NullReporter()) -> dict[str, Any] | None:
        """What ``hetlm eval`` recorded for this very checkpoint (a bundle carries its own), if anything."""
        if self.is_bundle:
            return self.manifest.get("eval") if isinstance(self.manifest.get("eval"), dict) else None
        candidates = [self.path / EVAL_RESULTS]
        if self.run_dir is not None:
            candidates.append(self.run_dir.eval_path)
        for file in candidates:
            metrics = _read_json(file)
            if not isinstance(metrics, dict):
                continue
            scored = metrics.get("checkpoint")
            if scored and Path(scored).resolve() != self.path.resolve():
                reporter.warning(f"{file} scores {scored}, not the deployed {self.path}: its metrics are left out "
                                 f"(run `hetlm eval {self.path}` to include them)")
                continue
            return metrics
        return None

    def save_eval_results(self, record: dict[str, Any], reporter: Reporter = NullReporter()) -> Path | None:
        """Write eval.json (OSError or HetlmError when it cannot be); None for a bundle, which has no place for it."""
        path = self.eval_results_path
        if path is None:
            return None
        lock = FileLock(path.parent / LOCK, str(path.parent), patience=0.0)
        try:
            lock.acquire()
        except HetlmError:
            # Training holds the run, or the folder is read-only: the write is atomic all the same, only the
            # clean-up of leftovers waits for a later eval.
            lock = None
        try:
            if lock is not None and (done := clean_up(path.parent, re.escape(EVAL_RESULTS))):
                reporter.info(f"cleaned up after an interrupted eval: {'; '.join(done)}")
            with disk_full_errors(path):
                atomic_write_json(path, record)
        finally:
            if lock is not None:
                lock.release()
        return path


def load_checkpoint(target: Path, device: str | torch.device = "cpu", prefer: str = "best",
                    reporter: Reporter = NullReporter()) -> LoadedModel:
    """Load the model (fp32, eval mode) of a checkpoint, run or bundle folder onto ``device``."""
    path = resolve(target, prefer, reporter)
    if is_bundle(path):
        meta = read_bundle_manifest(path)
        if WEIGHTS not in meta["files"] and GGUF_FILE in meta["files"]:
            raise UsageError(f"bundle {path} holds only {GGUF_FILE} (for llama.cpp and Ollama): deploy with --format hf or "
                             "all for hetlm to load it")
        if missing := [name for name in BUNDLE_FILES if name not in meta["files"]]:
            raise UsageError(f"bundle {path} cannot be loaded: {BUNDLE_MANIFEST} does not list {', '.join(missing)}")
        try:
            config = config_from_dict(meta["config"])
        except HetlmError as exc:
            raise UsageError(f"{path / BUNDLE_MANIFEST}: invalid config ({exc})") from None
        model = model_from_weights(config, path / WEIGHTS, device)
        return LoadedModel(model=model.eval(), config=config, tokenizer_path=path / TOKENIZER, path=path, manifest=meta)
    checkpoint = Checkpoint.read(path, verify=False)
    config = checkpoint.config()
    model = model_from_weights(config, path / WEIGHTS, device)
    return LoadedModel(model=model.eval(), config=config, tokenizer_path=checkpoint.tokenizer_path, path=path,
                       manifest=checkpoint.manifest)

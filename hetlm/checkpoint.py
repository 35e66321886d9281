"""Checkpoints: one folder per step, written whole or not at all.

Layout of ``RUN/checkpoints/step-000123/``::

    model.safetensors   learned weights (fp32; a tied lm_head is stored once, as the embedding)
    trainer.pt          optimizer, schedule, scaler, RNG states, data cursor (torch.load(weights_only=True))
    config.yaml         the resolved configuration
    tokenizer.model     the SentencePiece model the weights were trained with
    manifest.json       written last: the completeness marker, with the sha256 of every other file

The folder is assembled under a temporary name, fsynced and renamed, so a crash leaves either the
previous state or a complete checkpoint; a folder whose manifest is missing or whose hashes do not
match is treated as torn and skipped.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hetlm import __version__
from hetlm.config import Config, config_from_dict
from hetlm.errors import HetlmError, UsageError
from hetlm.io import atomic_dir, sha256_file
from hetlm.model import Transformer
from hetlm.reporting import NullReporter, Reporter

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


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


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    config: Config,
    tokenizer_path: Path,
    trainer_state: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically; ``info`` (step, val_loss...) goes in the manifest."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(weights_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt"})
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / CONFIG).write_text(config.to_yaml(), encoding="utf-8")
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "checkpoint",
            "hetlm_version": __version__,
            **(info or {}),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(path: Path, verify: bool = True) -> dict[str, Any] | None:
    """The manifest of a complete checkpoint, or None when it is missing, unreadable or torn."""
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") != "checkpoint" or not isinstance(manifest.get("files"), dict):
        return None
    for name, digest in manifest["files"].items():
        file = Path(path) / name
        if not file.is_file():
            return None
        if verify and sha256_file(file) != digest:
            return None
    return manifest


def list_checkpoints(run_dir: Path, reporter: Reporter = NullReporter(), verify: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first; torn ones are reported and skipped."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if not match or not child.is_dir():
            continue
        if read_manifest(child, verify=verify) is None:
            reporter.warning(f"skipping incomplete checkpoint {child} (no valid manifest)")
            continue
        found.append((int(match.group(1)), child))
    return sorted(found)


def best_checkpoint(checkpoints: list[tuple[int, Path]]) -> Path | None:
    """The checkpoint with the lowest finite val_loss in its manifest (the newest on a tie), or None."""
    scored = []
    for step, path in checkpoints:
        loss = (read_manifest(path, verify=False) or {}).get("val_loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            scored.append((loss, -step, path))
    return min(scored)[2] if scored else None


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "checkpoints").is_dir()


def resolve_checkpoint(target: Path, prefer: str = "best", reporter: Reporter = NullReporter()) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its best by val loss, else newest); a bundle as is."""
    target = Path(target)
    if not target.exists():
        raise UsageError(f"{target} does not exist")
    if (target / MANIFEST).is_file():
        if read_manifest(target) is None:
            raise UsageError(f"{target} is an incomplete or corrupt checkpoint (its manifest does not match its files)")
        return target
    if is_run_dir(target):
        checkpoints = list_checkpoints(target, reporter)
        if not checkpoints:
            raise UsageError(f"run {target} has no complete checkpoint yet")
        if prefer == "best" and (best := best_checkpoint(checkpoints)) is not None:
            return best
        return checkpoints[-1][1]
    if (target / "hetlm.json").is_file():
        return target
    raise UsageError(f"{target} is not a run, checkpoint or bundle")


@dataclass
class LoadedModel:
    model: Transformer
    config: Config
    tokenizer_path: Path
    path: Path
    manifest: dict[str, Any]


def load_config_file(path: Path) -> Config:
    import yaml

    try:
        return config_from_dict(yaml.safe_load((Path(path) / CONFIG).read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise HetlmError(f"cannot read the configuration saved in {path}: {exc}") from None


def load_weights(model: Transformer, weights_path: Path) -> None:
    state = load_file(str(weights_path))
    if model.config.tie_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("rope_")]
    if missing or unexpected:
        raise HetlmError(f"{weights_path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_checkpoint(target: Path, device: str | torch.device = "cpu", prefer: str = "best",
                    reporter: Reporter = NullReporter()) -> LoadedModel:
    """Load the model (fp32, eval mode) of a checkpoint, run or bundle folder onto ``device``."""
    path = resolve_checkpoint(target, prefer, reporter)
    if (path / "hetlm.json").is_file():
        from hetlm.deploy import load_bundle  # deploy imports this module

        return load_bundle(path, device)
    manifest = read_manifest(path, verify=False) or {}
    config = load_config_file(path)
    model = Transformer(config.model)
    load_weights(model, path / WEIGHTS)
    model.to(device).eval()
    return LoadedModel(model=model, config=config, tokenizer_path=path / TOKENIZER, path=path, manifest=manifest)


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)

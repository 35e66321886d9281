"""A local Hugging Face ``LlamaForCausalLM`` folder read as a hetlm model (``train --init``, ``--tokenizer-from``).

hetlm's weights carry transformers' Llama parameter names and its RoPE is the rotate-half form Llama uses,
so importing is a plain copy: ``config.json`` maps onto ``ModelConfig`` key by key, and the safetensors
weights load as they are. What hetlm cannot represent (biases, scaled RoPE, another architecture or
activation, a head size other than d_model / n_heads, a padded vocabulary) is refused with one line
rather than approximated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hetlm.config import ModelConfig
from hetlm.errors import ConfigError, UsageError
from hetlm.io import sha256_file
from hetlm.store import TOKENIZER, WEIGHTS, expected_weights
from hetlm.tokenizer import Tokenizer

HF_CONFIG = "config.json"
SHARD_INDEX = "model.safetensors.index.json"
# Non-learned buffers some older exports saved; hetlm derives them from the config.
DERIVED = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class HFLlama:
    path: Path
    model: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer_path: Path
    # sha256 of model.safetensors, or of the shards' sha256s in name order for a sharded folder.
    weights_sha256: str


def is_hf_folder(path: Path) -> bool:
    return (Path(path) / HF_CONFIG).is_file()


def read_hf_config(path: Path) -> ModelConfig:
    """The ModelConfig of ``path/config.json``; UsageError naming what hetlm cannot represent."""
    file = Path(path) / HF_CONFIG
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{file} is not a model config")
    where = f"{path} cannot be imported:"
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    if architectures != ["LlamaForCausalLM"] or raw.get("model_type", "llama") != "llama":
        raise UsageError(f"{where} it is a {'/'.join(map(str, architectures))} ({raw.get('model_type')}); hetlm imports "
                         "LlamaForCausalLM only")
    if biased := [key for key in ("attention_bias", "mlp_bias") if raw.get(key)]:
        raise UsageError(f"{where} {' and '.join(biased)} is set, and hetlm's layers have no biases")
    if raw.get("hidden_act", "silu") != "silu":
        raise UsageError(f"{where} hidden_act is {raw['hidden_act']}; hetlm's MLP is SwiGLU (silu)")
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type not in ("default", None):
        raise UsageError(f"{where} its RoPE scaling is {rope_type!r}; hetlm has plain RoPE only")
    theta = raw.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
    try:
        d_model, n_heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim")
        if head_dim is not None and int(head_dim) * n_heads != d_model:
            raise UsageError(f"{where} head_dim {head_dim} is not hidden_size / num_attention_heads "
                             f"({d_model} / {n_heads}), which hetlm's attention assumes")
        model = ModelConfig(
            n_layers=int(raw["num_hidden_layers"]), d_model=d_model, n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads), d_ff=int(raw["intermediate_size"]),
            context_length=int(raw.get("max_position_embeddings", 2048)), rope_theta=float(theta),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            # LlamaConfig's default: an untied head.
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_dropout=float(raw.get("attention_dropout", 0.0)),
            init_std=float(raw.get("initializer_range", 0.02)), vocab_size=int(raw["vocab_size"]),
        )
    except KeyError as exc:
        raise UsageError(f"{where} {HF_CONFIG} has no {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where} {HF_CONFIG} has a value hetlm cannot read ({exc})") from None
    try:
        model.validate()
    except ConfigError as exc:
        raise UsageError(f"{where} {exc}") from None
    return model


def hf_tokenizer(path: Path) -> Path:
    """The folder's SentencePiece model; UsageError when it has none."""
    file = Path(path) / TOKENIZER
    if not file.is_file():
        raise UsageError(f"{path} has no {TOKENIZER}: hetlm needs the SentencePiece model (a tokenizer.json alone "
                         "is not one)")
    return file


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    index = path / SHARD_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{index} is not a readable shard index ({exc})") from None
        return [path / Path(name).name for name in shards]
    raise UsageError(f"{path} has no {WEIGHTS} (nor {SHARD_INDEX}): hetlm imports safetensors weights only")


def read_hf_llama(path: Path) -> HFLlama:
    """The model config, fp32-ready weights and tokenizer of a LlamaForCausalLM folder, checked against each other."""
    path = Path(path)
    model = read_hf_config(path)
    tokenizer_path = hf_tokenizer(path)
    pieces = Tokenizer.load(tokenizer_path).vocab_size
    if pieces != model.vocab_size:
        raise UsageError(f"{path} cannot be imported: config.json's vocab_size is {model.vocab_size} but {TOKENIZER} has "
                         f"{pieces} pieces (hetlm's embedding has a row per piece, no padding)")
    files = _weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (OSError, SafetensorError) as exc:
            raise UsageError(f"{file} is not a readable safetensors file ({exc})") from None
    state = {name: tensor for name, tensor in state.items() if not name.endswith(DERIVED)}
    if model.tie_embeddings and "lm_head.weight" in state:
        if not torch.equal(state.pop("lm_head.weight"), state.get("model.embed_tokens.weight", torch.empty(0))):
            raise UsageError(f"{path} cannot be imported: tie_word_embeddings is true but lm_head.weight differs from "
                             "the embedding")
    if not model.tie_embeddings and "lm_head.weight" not in state:
        raise UsageError(f"{path} cannot be imported: tie_word_embeddings is false but there is no lm_head.weight")
    _check_shapes(path, model, state)
    digests = [sha256_file(file) for file in files]
    weights_sha256 = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
    return HFLlama(path, model, state, tokenizer_path, weights_sha256)


def _check_shapes(path: Path, model: ModelConfig, state: dict[str, Any]) -> None:
    expected = expected_weights(model)
    if model.tie_embeddings:
        expected.pop("lm_head.weight", None)
    mismatch = f"{path} cannot be imported: its weights do not match its config.json"
    if unknown := sorted(set(state) - set(expected)):
        raise UsageError(f"{mismatch} (unexpected {unknown[:3]}; biases or other layers hetlm does not have)")
    if missing := sorted(set(expected) - set(state)):
        raise UsageError(f"{mismatch} (missing {missing[:3]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise UsageError(f"{mismatch} ({name} is {list(tensor.shape)}, the config says {list(expected[name])})")
        if not tensor.is_floating_point():
            raise UsageError(f"{mismatch} ({name} is {tensor.dtype}; quantized weights are not imported)")

"""Configuration: one typed dataclass per stage, resolved as defaults < YAML file < --set.

Every value is checked against its field's type when the config is built, and each section
validates its own invariants in ``validate``. Unknown keys are errors that name the closest
valid key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hetlm.errors import ConfigError
from hetlm.sampling_settings import SamplingError, SamplingSettings


@dataclass
class DataConfig:
    """Where the corpus comes from and how it is tokenized (``hetlm preprocess``)."""

    # Preprocessed data folder that build/train/eval read. Preprocess writes here when --out is not given.
    dir: str = "data/python-stdlib"
    vocab_size: int = 4096
    tokenizer: str = "bpe"
    val_fraction: float = 0.01
    text_field: str = "text"
    # Bytes of training text the tokenizer learns from; bounds its time and memory on large corpora.
    tokenizer_sample_bytes: int = 64_000_000
    # 0 lets the device planner choose.
    workers: int = 0
    seed: int = 1337

    def validate(self) -> None:
        _check(self.vocab_size >= 260, "data.vocab_size must be at least 260 (256 byte pieces + 4 specials)")
        _check(self.vocab_size <= 1_000_000, "data.vocab_size must be at most 1000000")
        _check(self.tokenizer in ("bpe", "unigram"), "data.tokenizer must be 'bpe' or 'unigram'")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction must be between 0 and 1 (exclusive)")
        _check(self.tokenizer_sample_bytes > 0, "data.tokenizer_sample_bytes must be positive")
        _check(self.workers >= 0, "data.workers must be >= 0 (0 = let the planner choose)")


@dataclass
class ModelConfig:
    """Shape of the Llama-style Transformer."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    # 0 means the same as n_heads (plain multi-head attention).
    n_kv_heads: int = 0
    # 0 means 8/3 * d_model rounded up to a multiple of ffn_multiple_of (the Llama rule).
    d_ff: int = 0
    ffn_multiple_of: int = 32
    context_length: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Dropout on the embedding and on each residual branch (attention and MLP outputs).
    dropout: float = 0.0
    # Dropout on the attention weights (Hugging Face's name). It moves CPU attention off the flash kernel
    # onto a path that materialises the scores: measured ~1.6x slower steps there, against ~1.1x for ``dropout``.
    attention_dropout: float = 0.0
    init_std: float = 0.02
    # 0 means "take it from the data folder's tokenizer".
    vocab_size: int = 0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        hidden = int(8 * self.d_model / 3)
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)

    def validate(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "context_length", "ffn_multiple_of"):
            _check(getattr(self, name) > 0, f"model.{name} must be positive")
        _check(self.n_kv_heads >= 0 and self.d_ff >= 0 and self.vocab_size >= 0,
               "model.n_kv_heads, model.d_ff and model.vocab_size must be >= 0")
        _check(self.d_model % self.n_heads == 0,
               f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        _check(self.head_dim % 2 == 0, f"model.d_model / model.n_heads ({self.head_dim}) must be even for RoPE")
        _check(self.n_heads % self.kv_heads == 0,
               f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.kv_heads})")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _check(0.0 <= self.attention_dropout < 1.0, "model.attention_dropout must be in [0, 1)")
        _check(self.rope_theta > 0 and self.norm_eps > 0 and self.init_std > 0,
               "model.rope_theta, model.norm_eps and model.init_std must be positive")


@dataclass
class TrainConfig:
    """Optimisation, evaluation during training, checkpoints and logging."""

    seed: int = 1337
    # Sequences per forward/backward pass on one device.
    micro_batch_size: int = 16
    # Tokens per optimizer step across all devices; 0 means one micro-batch per device.
    global_batch_tokens: int = 0
    max_steps: int = 1000
    # Stop after this much wall time ("90s", "10m", "1h"); empty for no limit.
    max_time: str = ""
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    # Cosine decay length; 0 means max_steps.
    decay_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    # Number of fixed validation windows scored at each evaluation.
    eval_windows: int = 64
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    # Consecutive non-finite losses tolerated before the run stops.
    max_bad_steps: int = 5
    deterministic: bool = False

    def validate(self) -> None:
        for name in ("micro_batch_size", "max_steps", "eval_every", "eval_windows", "log_every",
                     "checkpoint_every", "keep_last", "max_bad_steps"):
            _check(getattr(self, name) > 0, f"train.{name} must be positive")
        _check(self.global_batch_tokens >= 0, "train.global_batch_tokens must be >= 0")
        _check(self.learning_rate > 0, "train.learning_rate must be positive")
        _check(0 <= self.min_lr <= self.learning_rate, "train.min_lr must be between 0 and train.learning_rate")
        _check(self.warmup_steps >= 0 and self.decay_steps >= 0, "train.warmup_steps and train.decay_steps must be >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        if self.max_time:
            parse_duration(self.max_time, "train.max_time")


@dataclass
class DeviceConfig:
    """Overrides for the device planner; "auto" lets it decide."""

    device: str = "auto"
    dtype: str = "auto"
    compile: str = "auto"
    # 0 lets the planner choose.
    threads: int = 0
    # Batches the background loader keeps ready.
    prefetch: int = 4

    def validate(self) -> None:
        _check(self.device == "auto" or self.device in ("cpu", "mps", "cuda") or self.device.startswith("cuda:"),
               "device.device must be auto, cpu, mps, cuda or cuda:N")
        _check(self.dtype in ("auto", "fp32", "bf16", "fp16"), "device.dtype must be auto, fp32, bf16 or fp16")
        _check(self.compile in ("auto", "on", "off"), "device.compile must be auto, on or off")
        _check(self.threads >= 0, "device.threads must be >= 0 (0 = let the planner choose)")
        _check(self.prefetch >= 1, "device.prefetch must be >= 1")


@dataclass
class EvalConfig:
    """``hetlm eval``: how much text is scored and how."""

    max_tokens: int = 0
    # 0 means non-overlapping windows of the model's context.
    stride: int = 0
    batch_size: int = 8

    def validate(self) -> None:
        _check(self.max_tokens >= 0 and self.stride >= 0, "eval.max_tokens and eval.stride must be >= 0")
        _check(self.batch_size > 0, "eval.batch_size must be positive")


QUANTIZE_CHOICES = ("none", "int8")


@dataclass
class SampleConfig:
    """Sampling defaults shared by ``hetlm generate`` and the server."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    # "int8": single-token steps read int8 weights with a scale per output channel, a quarter of the fp32
    # bytes; batch-1 decoding of larger models waits on reading the weights. Opt-in, as it changes logits.
    quantize: str = "none"

    def validate(self) -> None:
        _check(self.quantize in QUANTIZE_CHOICES, f"sample.quantize must be one of {', '.join(QUANTIZE_CHOICES)}")
        # The rules live with SamplingSettings, so a config, generate's options and a request refuse a value alike.
        try:
            SamplingSettings.from_config(self)
        except SamplingError as exc:
            raise ConfigError(exc.message(f"sample.{exc.name}")) from None


@dataclass
class ServeConfig:
    """``hetlm serve``: the OpenAI-compatible HTTP server."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrency: int = 4
    # Requests waiting beyond this are answered 503.
    max_queue: int = 64
    max_tokens_limit: int = 4096

    def validate(self) -> None:
        _check(0 <= self.port < 65536, "serve.port must be in 0..65535")
        _check(self.max_concurrency > 0 and self.max_queue >= 0, "serve.max_concurrency must be positive")
        _check(self.max_tokens_limit > 0, "serve.max_tokens_limit must be positive")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # The preset's name (its file stem); names the default run folder.
    name: str = "default"

    def validate(self) -> None:
        for section in SECTIONS:
            getattr(self, section).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "name")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds in "90", "90s", "10m", "1.5h" or "1d"."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = str(text).strip().lower()
    scale = 1
    if value and value[-1] in units:
        scale = units[value[-1]]
        value = value[:-1]
    try:
        seconds = float(value) * scale
    except ValueError:
        raise ConfigError(f"{what}: cannot read {text!r} as a duration (try 90s, 10m or 1h)") from None
    if seconds <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}")
    return seconds


def all_keys() -> list[str]:
    keys = ["name"]
    for section in SECTIONS:
        cls = _section_type(section)
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _section_type(section: str) -> type:
    return typing.get_type_hints(Config)[section]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f" — did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown key {key}{hint}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot (1e-6) as strings.
            with contextlib.suppress(ValueError):
                return float(value)
    elif annotation is str:
        if isinstance(value, bool):
            # YAML 1.1 reads on/off/yes/no as booleans; switch-like string keys (device.compile) mean on/off.
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
    else:
        return value
    raise ConfigError(f"{key} must be {annotation.__name__}, got {value!r}")


def _apply(config: Config, key: str, value: Any) -> None:
    if key == "name":
        config.name = _coerce(key, value, str)
        return
    section, _, leaf = key.partition(".")
    if section not in SECTIONS or not leaf or "." in leaf:
        raise _unknown(key)
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if leaf not in hints:
        raise _unknown(key)
    setattr(target, leaf, _coerce(key, value, hints[leaf]))


def _flatten(mapping: Any, source: str) -> list[tuple[str, Any]]:
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    items = []
    for section, body in mapping.items():
        if section == "name" or section not in SECTIONS:
            items.append((str(section), body))
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {section} must be a mapping")
        items += [(f"{section}.{k}", v) for k, v in body.items()]
    return items


def parse_set(assignment: str) -> tuple[str, Any]:
    """``section.key=value`` with the value read as a YAML scalar."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        raise ConfigError(f"--set {key}: expected a single value, got {raw!r}")
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve defaults < YAML file < ``--set`` overrides into a validated Config."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        config.name = path.stem
        for key, value in _flatten(loaded, str(path)):
            _apply(config, key, value)
    for assignment in overrides:
        _apply(config, *parse_set(assignment))
    config.validate()
    return config


def config_from_dict(mapping: dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. from a checkpoint)."""
    config = Config()
    for key, value in _flatten(mapping, "saved config"):
        _apply(config, key, value)
    config.validate()
    return config


def with_overrides(saved: Config, assignments: list[str] | tuple[str, ...], sections: tuple[str, ...]) -> Config:
    """A model's saved configuration with ``--set section.key=value`` applied, only to ``sections``.

    Commands that take a trained model (eval, generate, serve) may change how it runs, never what it is.
    """
    data = saved.to_dict()
    for assignment in assignments:
        key, value = parse_set(assignment)
        section, _, leaf = key.partition(".")
        if section not in sections or not leaf:
            allowed = ", ".join(f"{name}.*" for name in sections)
            raise ConfigError(f"--set {key}: only {allowed} keys can be changed here; the rest comes with the model")
        data[section][leaf] = value
    return config_from_dict(data)


def save_config(config: Config, path: str | Path) -> None:
    from hetlm.io import atomic_write_text

    atomic_write_text(Path(path), config.to_yaml())

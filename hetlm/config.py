"""Configuration: one typed dataclass per stage, resolved as defaults < YAML file < --set.

Every value is checked against its field's type when the config is built, and each section
validates its own invariants in ``validate``. Unknown keys are errors that name the closest
valid key.

Each key's default, help text and allowed values are declared once, with ``setting`` on its field;
``describe_keys`` lists them for ``hetlm config keys``, the README's table and the CLI options' help.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hetlm.errors import ConfigError
from hetlm.io import atomic_write_text
from hetlm.sampling_settings import SamplingError, SamplingSettings

TOKENIZERS = ("bpe", "unigram")
HTML_MODES = ("text", "raw")
DEVICES = ("auto", "cpu", "mps", "cuda", "cuda:N")
DTYPES = ("auto", "fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "on", "off")
QUANTIZE_CHOICES = ("none", "int8")
OFFLOAD_CHOICES = ("auto", "off", "on")
PARALLEL_CHOICES = ("auto", "ddp", "fsdp")
SWITCH_CHOICES = ("on", "off")
# serve.max_concurrency=auto takes at most this many slots, so a machine with memory for thousands still queues
# requests instead of stretching every step over all of them.
MAX_AUTO_SLOTS = 64


def setting(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A config field's default with its help text and, for a string with a fixed set of values, those values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DataConfig:
    """Where the corpus comes from and how it is tokenized (``hetlm preprocess``)."""

    dir: str = setting("data/python-stdlib", "Preprocessed data folder that build, train and eval read; preprocess writes "
                                             "here when it is set and --out is not given")
    vocab_size: int = setting(4096, "Tokenizer vocabulary size, at least 261 (256 byte pieces, 4 special tokens and one character)")
    tokenizer: str = setting("bpe", "SentencePiece model type; unigram trains 20-40 times slower than bpe", TOKENIZERS)
    val_fraction: float = setting(0.01, "Share of the documents (or of the text, with few documents) held out for validation")
    text_field: str = setting("text", "Field of a JSONL record that holds its text")
    tokenizer_sample_bytes: int = setting(
        64_000_000, "Bytes of training text the tokenizer learns from; bounds its time and memory on large corpora")
    workers: int = setting(0, "Preprocessing processes; 0 lets the planner choose (one per usable CPU)")
    seed: int = setting(1337, "Key of the hash that splits the documents into train and val and picks the tokenizer's sample")
    chat: bool = setting(False, "Inputs are JSON Lines of chat conversations ({\"messages\": [{\"role\", \"content\"}, ...]}), "
                                "rendered with the chat template; training learns only the assistant turns")
    html: str = setting("text", "What .html/.htm files become: their text (markup, scripts and styles left out) or the raw "
                                "markup", HTML_MODES)

    def validate(self) -> None:
        _check(self.vocab_size >= 261, "data.vocab_size must be at least 261 (256 byte pieces, 4 specials and one character)")
        _check(self.vocab_size <= 1_000_000, "data.vocab_size must be at most 1000000")
        _check(self.tokenizer in TOKENIZERS, f"data.tokenizer must be {_either([repr(t) for t in TOKENIZERS])}")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction must be between 0 and 1 (exclusive)")
        _check(self.tokenizer_sample_bytes > 0, "data.tokenizer_sample_bytes must be positive")
        _check(self.workers >= 0, "data.workers must be >= 0 (0 = let the planner choose)")
        _check(self.html in HTML_MODES, f"data.html must be {_either([repr(m) for m in HTML_MODES])}")


@dataclass
class ModelConfig:
    """Shape of the Llama-style Transformer."""

    n_layers: int = setting(4, "Transformer blocks")
    d_model: int = setting(128, "Width of the residual stream")
    n_heads: int = setting(4, "Query heads; d_model / n_heads, the head size, must be even for RoPE")
    n_kv_heads: int = setting(0, "Key/value heads, shared by groups of query heads; 0 means n_heads (plain multi-head attention)")
    d_ff: int = setting(0, "Hidden width of the SwiGLU MLP; 0 means 8/3 × d_model rounded up to a multiple of ffn_multiple_of "
                           "(the Llama rule)")
    ffn_multiple_of: int = setting(32, "What a d_ff of 0 is rounded up to a multiple of")
    context_length: int = setting(128, "Tokens the model attends over: the length of training windows and of the KV cache")
    rope_theta: float = setting(10000.0, "Base of the rotary position embedding's frequencies")
    norm_eps: float = setting(1e-5, "Epsilon of RMSNorm")
    tie_embeddings: bool = setting(True, "The output layer reuses the token embedding matrix")
    dropout: float = setting(0.0, "Dropout on the embedding and on each residual branch (attention and MLP outputs)")
    attention_dropout: float = setting(
        0.0, "Dropout on the attention weights (Hugging Face's name); it takes CPU attention off the flash kernel onto a path "
             "that materialises the scores: measured ~1.6x slower steps there, against ~1.1x for dropout")
    init_std: float = setting(0.02, "Standard deviation of the initial weights (scaled down with depth for residual outputs)")
    vocab_size: int = setting(0, "Embedding rows; 0 takes the data folder's tokenizer size, any other value must equal it")

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

    seed: int = setting(1337, "Seeds the initial weights and the order in which training windows are drawn")
    micro_batch_size: int = setting(
        0, "Sequences per forward/backward pass on one device; 0 lets the planner take the largest that fits, up to the "
           "global batch (16 sequences when global_batch_tokens is 0)")
    global_batch_tokens: int = setting(
        0, "Tokens per optimizer step across all devices, reached by accumulating micro-batches; 0 means one micro-batch "
           "per device")
    max_steps: int = setting(1000, "Train up to this optimizer step")
    max_time: str = setting("", "Stop after this much wall time (90s, 10m, 1h); empty for no limit")
    learning_rate: float = setting(1e-3, "Peak learning rate, reached at the end of the warmup")
    min_lr: float = setting(1e-4, "Learning rate at the end of the cosine decay")
    warmup_steps: int = setting(100, "Steps of linear learning-rate warmup")
    decay_steps: int = setting(
        0, "Step at which the cosine decay reaches min_lr; 0 means max_steps, or the step at which max_time will stop the run")
    weight_decay: float = setting(0.1, "AdamW weight decay, applied to the weight matrices but not to norms and embeddings")
    beta1: float = setting(0.9, "AdamW's decay rate of the gradient mean")
    beta2: float = setting(0.95, "AdamW's decay rate of the squared-gradient mean")
    grad_clip: float = setting(1.0, "Largest global gradient norm; 0 disables clipping")
    eval_every: int = setting(200, "Steps between evaluations on the validation windows")
    eval_windows: int = setting(64, "Fixed validation windows scored at each evaluation")
    log_every: int = setting(10, "Steps between progress lines and metrics.jsonl records")
    checkpoint_every: int = setting(500, "Steps between checkpoints")
    keep_last: int = setting(2, "Newest checkpoints kept; the best by validation loss is kept as well")
    max_bad_steps: int = setting(5, "Consecutive non-finite losses tolerated before the run stops")
    deterministic: bool = setting(False, "Use torch's deterministic algorithms, so a resumed CPU run is bit-identical")
    sample_every: int = setting(
        0, "Steps between greedy continuations of sample_prompt, printed and written to metrics.jsonl (kind sample); "
           "0 = off. They draw no random numbers, so training is unchanged")
    sample_prompt: str = setting("The", "What the samples continue")
    sample_tokens: int = setting(32, "Tokens a sample generates at most (it stops at </s>)")
    activation_checkpointing: str = setting(
        "auto", "Recompute blocks' activations in backward instead of keeping them: none, all, N (every N-th block), or "
                "auto: the least recomputation that lets the micro-batch fit")
    rank_shares: str = setting(
        "auto", "Under torchrun, each process's share of a step's sequences: auto (in proportion to each device's "
                "predicted speed), measure (timed on every process before the run), equal, or weights such as 1,3")
    parallel: str = setting(
        "auto", "Under torchrun: ddp (every process holds the whole model), fsdp (FSDP2 shards weights, gradients and "
                "AdamW state over the processes), or auto: fsdp when they do not fit the smallest device under ddp",
        PARALLEL_CHOICES)
    optimizer_offload: str = setting(
        "auto", "Keep the fp32 master weights and AdamW moments in CPU RAM and step them on the CPU while backward runs: "
                "on, off, or auto: on when weights, gradients and AdamW state do not fit the device but fit RAM",
        OFFLOAD_CHOICES)

    def validate(self) -> None:
        for name in ("max_steps", "eval_every", "eval_windows", "log_every", "checkpoint_every", "keep_last",
                     "max_bad_steps"):
            _check(getattr(self, name) > 0, f"train.{name} must be positive")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size must be >= 0 (0 = let the planner choose)")
        spacing = self.activation_checkpointing
        _check(spacing in ("auto", "none", "all") or (spacing.isdigit() and int(spacing) > 0),
               "train.activation_checkpointing must be auto, none, all or a positive N (every N-th block)")
        _check(self.parallel in PARALLEL_CHOICES, f"train.parallel must be {_either(PARALLEL_CHOICES)}")
        _check(self.optimizer_offload in OFFLOAD_CHOICES, f"train.optimizer_offload must be {_either(OFFLOAD_CHOICES)}")
        weights = self.rank_shares.split(",")
        _check(self.rank_shares in ("auto", "measure", "equal") or all(_positive_number(w) for w in weights),
               "train.rank_shares must be auto, measure, equal or positive weights such as 1,3")
        _check(self.global_batch_tokens >= 0, "train.global_batch_tokens must be >= 0")
        _check(self.learning_rate > 0, "train.learning_rate must be positive")
        _check(0 <= self.min_lr <= self.learning_rate, "train.min_lr must be between 0 and train.learning_rate")
        _check(self.warmup_steps >= 0 and self.decay_steps >= 0, "train.warmup_steps and train.decay_steps must be >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        _check(self.sample_every >= 0, "train.sample_every must be >= 0 (0 = no samples)")
        _check(self.sample_tokens > 0, "train.sample_tokens must be positive")
        if self.max_time:
            parse_duration(self.max_time, "train.max_time")


@dataclass
class DeviceConfig:
    """Overrides for the device planner; "auto" lets it decide."""

    device: str = setting("auto", "Where to run; auto takes CUDA, then MPS, then the CPU", DEVICES)
    dtype: str = setting("auto", "Autocast dtype (weights stay fp32); auto lets the planner choose for the hardware", DTYPES)
    compile: str = setting(
        "auto", "torch.compile each Transformer block; auto compiles when the estimated run is long enough to pay it back",
        COMPILE_CHOICES)
    threads: int = setting(0, "Torch CPU threads; 0 lets the planner choose")
    prefetch: int = setting(4, "Batches the background loader keeps ready")
    memory: str = setting(
        "", "Memory caps per device, e.g. cuda:0=6GiB,cpu=16GiB: the planner takes each as that device's free memory; "
            "empty = what the device reports")
    margin: str = setting(
        "auto", "Memory left free on each device for inference: a share (10%), a size (512MiB), or auto = the larger "
                "of 10% and 512 MiB")
    layers: str = setting(
        "", "Inference layer map, e.g. cuda:0=0-17,cpu=18-23 (blocks per device; embed=DEV and head=DEV name the "
            "embedding's and the LM head's, else they go with the first and last block); empty = the planner's split")
    gpu_layers: int = setting(
        -1, "Inference: this many of the last blocks (and the LM head) on the accelerators, the rest on the CPU, "
            "like llama.cpp's -ngl; -1 = the planner's split")
    alias: str = setting(
        "", "Run a plan made for a simulated inventory on this machine's devices, e.g. cuda:0=cpu,cuda:1=cpu; the "
            "simulated memory budgets still bind")

    def validate(self) -> None:
        _check(self.device in DEVICES or self.device.startswith("cuda:"), f"device.device must be {_either(DEVICES)}")
        _check(self.gpu_layers >= -1, "device.gpu_layers must be >= 0 (-1 = let the planner choose)")
        _check(self.dtype in DTYPES, f"device.dtype must be {_either(DTYPES)}")
        _check(self.compile in COMPILE_CHOICES, f"device.compile must be {_either(COMPILE_CHOICES)}")
        _check(self.threads >= 0, "device.threads must be >= 0 (0 = let the planner choose)")
        _check(self.prefetch >= 1, "device.prefetch must be >= 1")


@dataclass
class EvalConfig:
    """``hetlm eval``: how much text is scored and how."""

    max_tokens: int = setting(0, "Score only the first N tokens; 0 scores them all")
    stride: int = setting(
        0, "Start a window every S tokens and score only the tokens no earlier window scored; 0 means the context length "
           "(non-overlapping windows)")
    batch_size: int = setting(8, "Windows scored per forward pass")

    def validate(self) -> None:
        _check(self.max_tokens >= 0 and self.stride >= 0, "eval.max_tokens and eval.stride must be >= 0")
        _check(self.batch_size > 0, "eval.batch_size must be positive")


@dataclass
class SampleConfig:
    """Sampling defaults shared by ``hetlm generate`` and the server."""

    max_new_tokens: int = setting(256, "Tokens generated at most; the server's default for a request's max_tokens")
    temperature: float = setting(0.8, "Sampling temperature; 0 is greedy")
    top_k: int = setting(0, "Sample among the K likeliest tokens; 0 switches this filter off")
    top_p: float = setting(1.0, "Sample among the likeliest tokens holding P of the probability; 1 switches this filter off")
    seed: int = setting(0, "Seed of hetlm generate's sampling: the same seed gives the same text (serve takes a request's)")
    quantize: str = setting(
        "none", "int8 decodes with int8 weights, one scale per output channel: a quarter of fp32's bytes to read, faster "
                "on the CPU for larger models; opt-in, as it changes the logits", QUANTIZE_CHOICES)

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

    host: str = setting("127.0.0.1", "Address to bind")
    port: int = setting(8000, "Port to listen on; 0 picks a free one")
    max_concurrency: str = setting(
        "auto", "Sequences generated at once, a KV-cache slot each (a request takes one per choice); auto takes as many "
                f"as fit beside the weights on the inference device, at most {MAX_AUTO_SLOTS}")
    batching: str = setting(
        "on", "on advances every active sequence in one batched step; off steps them one at a time in turn (the earlier "
              "engine, kept for comparison)", SWITCH_CHOICES)
    max_queue: int = setting(64, "Requests waiting for free slots; more are answered 503")
    max_tokens_limit: int = setting(4096, "Largest max_tokens a request may ask for")
    max_connections: int = setting(256, "Open connections at most; a request beyond them is answered 503")
    keep_alive_timeout: float = setting(5.0, "Seconds an idle keep-alive connection stays open")
    header_timeout: float = setting(10.0, "Seconds a connection has to send a complete request head once it is ready for one")

    @property
    def slots(self) -> int | None:
        """max_concurrency as a number; None for auto."""
        return None if self.max_concurrency == "auto" else int(self.max_concurrency)

    def validate(self) -> None:
        _check(0 <= self.port < 65536, "serve.port must be in 0..65535")
        text = str(self.max_concurrency).strip()
        _check(text == "auto" or (text.isdigit() and int(text) > 0),
               f"serve.max_concurrency must be auto or a positive integer, got {self.max_concurrency!r}")
        self.max_concurrency = text
        _check(self.batching in SWITCH_CHOICES, f"serve.batching must be {_either(SWITCH_CHOICES)}")
        _check(self.max_queue >= 0, "serve.max_queue must be >= 0")
        _check(self.max_tokens_limit > 0, "serve.max_tokens_limit must be positive")
        _check(self.max_connections > 0, "serve.max_connections must be positive")
        _check(self.keep_alive_timeout > 0 and self.header_timeout > 0,
               "serve.keep_alive_timeout and serve.header_timeout must be positive")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    name: str = setting("default", "The preset's name (its config file's stem); names the default run folder")

    def validate(self) -> None:
        for section in SECTIONS:
            getattr(self, section).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "name")


@dataclass(frozen=True)
class KeyInfo:
    """One configuration key as ``hetlm config keys`` lists it."""

    key: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...]

    @property
    def kind(self) -> str:
        """The type, or the allowed values of a key that has a fixed set of them: ``bpe|unigram``."""
        return "|".join(self.choices) or self.type

    @property
    def default_text(self) -> str:
        """The default as one would write it after --set."""
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if self.default == "":
            return '""'
        return str(self.default)


# Cached: the listing never changes, and key_help asks for it once per option while the CLI starts.
@functools.cache
def describe_keys() -> tuple[KeyInfo, ...]:
    """Every key, ``name`` first and then section by section in field order, with its type, default, help and choices."""
    groups = [("", Config, [f for f in dataclasses.fields(Config) if f.name not in SECTIONS])]
    groups += [(f"{section}.", _section_type(section), dataclasses.fields(_section_type(section))) for section in SECTIONS]
    keys: list[KeyInfo] = []
    for prefix, cls, members in groups:
        hints = typing.get_type_hints(cls)
        keys += [KeyInfo(prefix + f.name, hints[f.name].__name__, f.default, f.metadata["help"], f.metadata["choices"])
                 for f in members]
    return tuple(keys)


def describe_key(key: str) -> KeyInfo:
    info = next((k for k in describe_keys() if k.key == key), None)
    if info is None:
        raise _unknown(key)
    return info


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _either(words: list[str] | tuple[str, ...]) -> str:
    """``a, b or c``: the allowed values as the validation messages name them."""
    *rest, last = words
    return f"{', '.join(rest)} or {last}" if rest else last


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
    return [info.key for info in describe_keys()]


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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Config | None = None) -> Config:
    """Resolve defaults < YAML file < ``--set`` overrides into a validated Config.

    With ``base`` (a run's saved config), the file and the overrides change only the keys they name, and the
    name stays the base's.
    """
    config = Config() if base is None else config_from_dict(base.to_dict())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if base is None:
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
    atomic_write_text(Path(path), config.to_yaml())

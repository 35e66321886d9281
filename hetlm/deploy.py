"""``hetlm deploy``: a self-contained bundle that hetlm, Hugging Face ``transformers`` and the server all load.

Layout of a bundle folder::

    model.safetensors        weights in the chosen dtype (a tied lm_head stored once, as the embedding)
    config.json              a LlamaForCausalLM config
    generation_config.json   hetlm's sampling defaults in transformers' terms
    tokenizer.model          the SentencePiece model
    tokenizer_config.json    LlamaTokenizer settings that reproduce SentencePiece's ids exactly
    special_tokens_map.json
    README.md                the model card
    hetlm.json               written last: hetlm's config, metrics, source, and the sha256 of every other file

hetlm's parameter names are Hugging Face's and its RoPE is rotate-half, so the export is a plain copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from hetlm import __version__
from hetlm.config import Config
from hetlm.errors import HetlmError, UsageError
from hetlm.io import sha256_file
from hetlm.model import DTYPES, parameter_counts
from hetlm.reporting import NullReporter, Reporter
from hetlm.store import (
    TOKENIZER,
    WEIGHTS,
    LoadedModel,
    is_bundle,
    load_checkpoint,
    read_data_manifest,
    weights_state_dict,
    write_bundle,
)
from hetlm.tokenizer import SPECIAL_IDS

HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# The template the server renders chat messages with. The model is a base model, so the roles are plain
# text labels it can pick up from a few examples; the same template goes into tokenizer_config.json so
# transformers' apply_chat_template gives the same text.
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}{{ 'System: ' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' }}"
    "{% else %}{{ 'Assistant: ' }}{% endif %}"
    "{{ message['content'] }}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CHAT_STOP = ["\nUser:", "\nSystem:"]
# The eval.json figures the model card shows, when present.
CARD_METRICS = ("loss", "perplexity", "bits_per_byte", "bits_per_char", "tokens")


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Messages ({"role", "content"}) as one prompt: "Role: content" blocks separated by blank lines."""
    text = "".join(f"{CHAT_ROLES[m['role']]}: {m['content']}\n\n" for m in messages)
    return text + "Assistant:" if add_generation_prompt else text


def hf_config(config: Config, dtype: str) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM."""
    m = config.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "max_position_embeddings": m.context_length,
        "rms_norm_eps": m.norm_eps,
        # transformers < 5 reads rope_theta, 5.x rope_parameters; both say the same.
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": m.attention_dropout,
        "initializer_range": m.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": SPECIAL_IDS["bos"],
        "eos_token_id": SPECIAL_IDS["eos"],
        "pad_token_id": SPECIAL_IDS["pad"],
        "torch_dtype": HF_DTYPE_NAMES[dtype],
    }


def hf_generation_config(config: Config) -> dict[str, Any]:
    s = config.sample
    greedy = s.temperature == 0
    generation: dict[str, Any] = {
        "bos_token_id": SPECIAL_IDS["bos"],
        "eos_token_id": SPECIAL_IDS["eos"],
        "pad_token_id": SPECIAL_IDS["pad"],
        # RoPE tables in hetlm stop at the context length; transformers would extrapolate past it.
        "max_length": config.model.context_length,
        "do_sample": not greedy,
    }
    if not greedy:
        generation.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    return generation


def _special_pieces(tokenizer_path: Path) -> dict[str, str]:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"{tokenizer_path} is not a readable SentencePiece model ({exc})") from None
    if sp.get_piece_size() <= max(SPECIAL_IDS.values()):
        raise UsageError(f"{tokenizer_path} has too few pieces to be a hetlm tokenizer")
    return {name: sp.id_to_piece(i) for name, i in SPECIAL_IDS.items()}


def _adds_dummy_prefix(tokenizer_path: Path) -> bool:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    pieces = sp.encode("a", out_type=str)
    return bool(pieces) and pieces[0].startswith("\u2581")


def hf_tokenizer_config(pieces: dict[str, str], context_length: int) -> dict[str, Any]:
    # legacy=false with add_prefix_space=false makes LlamaTokenizer reproduce SentencePiece's ids for a
    # tokenizer trained without a dummy prefix (measured in shared/FACTS.md); clean_up_tokenization_spaces
    # would otherwise rewrite decoded text (" ." -> ".") and break exact round trips.
    return {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_prefix_space": False,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": pieces["bos"],
        "eos_token": pieces["eos"],
        "unk_token": pieces["unk"],
        "pad_token": pieces["pad"],
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": context_length,
        "sp_model_kwargs": {},
        "chat_template": CHAT_TEMPLATE,
    }


def _source_info(loaded: LoadedModel) -> dict[str, Any]:
    """Where the weights came from, and the scalar facts its manifest records (step, val_loss...)."""
    path = Path(loaded.path).resolve()
    manifest = loaded.manifest
    if loaded.is_bundle:
        return dict(manifest.get("source") or {})
    info = {k: v for k, v in manifest.items()
            if k not in ("files", "format_version", "kind") and isinstance(v, (int, float, str, bool))}
    run = path.parent.parent if path.parent.name == "checkpoints" else None
    return {"checkpoint": str(path), "run": str(run) if run else None, **info}


def data_summary(loaded: LoadedModel) -> dict[str, Any] | None:
    """What the model was trained on, from its data folder's manifest (when that folder is still here)."""
    if loaded.is_bundle:
        return loaded.manifest.get("data") if isinstance(loaded.manifest.get("data"), dict) else None
    try:
        data = read_data_manifest(loaded.config.data.dir)
    except UsageError:
        return None
    if data.get("tokenizer", {}).get("sha256") != sha256_file(loaded.tokenizer_path):
        # The folder was preprocessed again since: it no longer describes this model's data.
        return None
    splits = {name: {k: v for k, v in entry.items() if k in ("documents", "bytes", "tokens")}
              for name, entry in (data.get("splits") or {}).items() if isinstance(entry, dict)}
    return {"corpus": data.get("corpus"), "splits": splits}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(name: str, config: Config, counts: dict[str, int], dtype: str, source: dict[str, Any],
               metrics: dict[str, Any] | None, data: dict[str, Any] | None = None) -> str:
    m = config.model
    lines = [
        f"# {name}",
        "",
        f"A small Llama-style base language model trained with hetlm {__version__}.",
        "It continues text; it was not instruction-tuned.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {counts['total']:,} ({counts['non_embedding']:,} non-embedding) |",
        f"| layers / d_model / heads / kv heads | {m.n_layers} / {m.d_model} / {m.n_heads} / {m.kv_heads} |",
        f"| feed-forward (SwiGLU) | {m.ffn_dim} |",
        f"| context length | {m.context_length} tokens |",
        f"| vocabulary | {m.vocab_size} ({config.data.tokenizer.upper()} SentencePiece, byte fallback) |",
        f"| RoPE theta | {_fmt(m.rope_theta)} |",
        f"| tied embeddings | {'yes' if m.tie_embeddings else 'no'} |",
        f"| weights dtype | {dtype} |",
        "",
        "## Data and training",
        "",
        f"- data folder: `{Path(config.data.dir).name}`",
    ]
    if data:
        lines.append(f"- corpus: {data.get('corpus') or 'unnamed'}")
        for split, entry in (data.get("splits") or {}).items():
            figures = ", ".join(f"{entry[k]:,} {k}" for k in ("documents", "bytes", "tokens") if isinstance(entry.get(k), int))
            lines.append(f"- {split} split: {figures}")
    for key, value in source.items():
        if key in ("checkpoint", "run") and value:
            # Only the folder name: the card travels with the bundle, the local path means nothing elsewhere.
            value = Path(value).name
        if value is not None:
            lines.append(f"- {key}: `{_fmt(value)}`")
    lines += ["", "## Metrics", ""]
    scalars = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    shown = {k: scalars[k] for k in CARD_METRICS if k in scalars} or scalars
    if shown:
        if metrics.get("source"):
            inputs = ", ".join(Path(str(i)).name for i in metrics.get("inputs") or [])
            lines += [f"From `hetlm eval` on the {metrics['source']} data" + (f" ({inputs})" if inputs else "") + ":", ""]
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in shown.items()]
    else:
        lines.append("No `hetlm eval` results were found for this checkpoint; run `hetlm eval` on the run first.")
    lines += [
        "",
        "## Use it",
        "",
        "With hetlm:",
        "",
        "```bash",
        "hetlm generate THIS_FOLDER --prompt 'def main('",
        "hetlm eval THIS_FOLDER",
        "hetlm serve THIS_FOLDER --port 8000",
        "```",
        "",
        "With Hugging Face transformers (needs `sentencepiece` and `protobuf` for the tokenizer):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
        "# The tokenizer starts the prompt with <s>, as every training document began.",
        'inputs = tokenizer("def main(", return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=40, do_sample=True)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        "Chat messages are rendered as `Role: content` blocks separated by blank lines, ending with",
        "`Assistant:` (the tokenizer's chat template does the same).",
        "",
    ]
    return "\n".join(lines)


def deploy(target: Path, out: Path, dtype: str = "fp32", prefer: str = "best",
           reporter: Reporter = NullReporter()) -> Path:
    """Write a bundle for a run, checkpoint or bundle ``target`` at ``out``, atomically; returns ``out``."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    target = Path(target)
    if out.exists() and not (out.is_dir() and (is_bundle(out) or not any(out.iterdir()))):
        raise UsageError(f"{out} exists and is not a hetlm bundle; refusing to replace it")
    if out.resolve() == target.resolve():
        raise UsageError("--out must differ from the target")
    loaded = load_checkpoint(target, "cpu", prefer=prefer, reporter=reporter)
    config = loaded.config
    if not loaded.tokenizer_path.is_file():
        raise HetlmError(f"{loaded.tokenizer_path} is missing")
    pieces = _special_pieces(loaded.tokenizer_path)
    if _adds_dummy_prefix(loaded.tokenizer_path):
        reporter.warning("the tokenizer adds a dummy prefix space; transformers' LlamaTokenizer will not give "
                         "hetlm's ids for text that starts without a space")
    source = _source_info(loaded)
    metrics = loaded.eval_results(reporter)
    data = data_summary(loaded)
    counts = parameter_counts(config.model)

    def fill(folder: Path) -> dict[str, Any]:
        state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in weights_state_dict(loaded.model).items()}
        save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
        del state
        _write_json(folder / "config.json", hf_config(config, dtype))
        _write_json(folder / "generation_config.json", hf_generation_config(config))
        shutil.copyfile(loaded.tokenizer_path, folder / TOKENIZER)
        _write_json(folder / "tokenizer_config.json", hf_tokenizer_config(pieces, config.model.context_length))
        _write_json(folder / "special_tokens_map.json",
                    {f"{name}_token": pieces[name] for name in ("bos", "eos", "unk", "pad")})
        (folder / "README.md").write_text(model_card(out.name, config, counts, dtype, source, metrics, data),
                                          encoding="utf-8")
        return {
            "dtype": dtype,
            "parameters": counts,
            "chat_template": "Role: content blocks separated by blank lines, ending with 'Assistant:'",
            "source": source,
            "data": data,
            "eval": metrics,
            "config": config.to_dict(),
        }

    reporter.start("deploy", total=None)
    write_bundle(out, fill)
    reporter.finish("deploy")
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

"""``hetlm deploy``: a self-contained bundle for hetlm, Hugging Face ``transformers``, llama.cpp and Ollama.

Layout of a bundle folder; ``--format hf`` (the default) writes the Hugging Face files, ``gguf`` the
llama.cpp and Ollama files, ``all`` both::

    model.safetensors        hf: weights in the chosen dtype (a tied lm_head stored once, as the embedding)
    config.json              hf: a LlamaForCausalLM config
    generation_config.json   hf: hetlm's sampling defaults in transformers' terms
    tokenizer_config.json    hf: LlamaTokenizer settings that reproduce SentencePiece's ids exactly
    special_tokens_map.json  hf
    model.gguf               gguf: weights, hyperparameters, tokenizer, chat template, sampling defaults
    Modelfile                gguf: Ollama's recipe for model.gguf (chat template, stop strings, context)
    tokenizer.model          the SentencePiece model
    README.md                the model card
    hetlm.json               written last: hetlm's config, metrics, source, and the sha256 of every other file

hetlm's parameter names are Hugging Face's and its RoPE is rotate-half, so the Hugging Face export is a
plain copy; the GGUF export is described in ``hetlm.gguf_export``. hetlm's own commands load bundles with
``model.safetensors``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from hetlm import __version__
from hetlm.chat import CHAT_ROLES, CHAT_STOP, CHAT_TEMPLATE
from hetlm.config import Config
from hetlm.errors import HetlmError, UsageError
from hetlm.gguf_export import GGUF_DTYPES, check_tokenizer, modelfile, ollama_template, write_gguf
from hetlm.io import sha256_file
from hetlm.model import DTYPES, parameter_counts
from hetlm.reporting import NullReporter, Reporter
from hetlm.store import (
    GGUF_FILE,
    MODELFILE,
    TOKENIZER,
    WEIGHTS,
    LoadedModel,
    is_bundle,
    load_checkpoint,
    read_data_manifest,
    weights_state_dict,
    write_bundle,
)
from hetlm.tokenizer import SPECIAL_IDS, Tokenizer

FORMATS = ("hf", "gguf", "all")
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# The eval.json figures the model card shows, when present.
CARD_METRICS = ("loss", "perplexity", "bits_per_byte", "bits_per_char", "tokens")




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


def _special_pieces(tokenizer: Tokenizer) -> dict[str, str]:
    if tokenizer.vocab_size <= max(SPECIAL_IDS.values()):
        raise UsageError(f"{tokenizer.path} has too few pieces to be a hetlm tokenizer")
    return {name: tokenizer.id_to_piece(i) for name, i in SPECIAL_IDS.items()}


def _adds_dummy_prefix(tokenizer: Tokenizer) -> bool:
    pieces = tokenizer.processor.encode("a", out_type=str)
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
    lineage = manifest.get("init")
    if isinstance(lineage, dict):
        # A fine-tuned run: the weights it started from (train --init).
        info["initialized_from"] = Path(str(lineage.get("checkpoint", ""))).name
        info["initial_weights_sha256"] = lineage.get("weights_sha256")
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


def _hf_usage() -> list[str]:
    return [
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
    ]


def _gguf_usage(name: str, context: int) -> list[str]:
    return [
        f"With llama.cpp: `{GGUF_FILE}` holds the tokenizer (it starts the prompt with `<s>`), the chat template and "
        "the sampling defaults.",
        "",
        "```bash",
        f"llama-server -m THIS_FOLDER/{GGUF_FILE} --ctx-size {context} --jinja",
        "curl http://127.0.0.1:8080/v1/completions -d '" + json.dumps({"prompt": "def main(", "max_tokens": 40}) + "'",
        "curl http://127.0.0.1:8080/v1/chat/completions -d '"
        + json.dumps({"messages": [{"role": "user", "content": "Hi"}], "stop": CHAT_STOP}) + "'",
        "```",
        "",
        f"With Ollama: `{MODELFILE}` sets the chat template, the stop strings, the context and the sampling defaults.",
        "",
        "```bash",
        f"cd THIS_FOLDER && ollama create {name} -f {MODELFILE}",
        f"ollama run {name} 'def main('",
        "```",
        "",
        f"The context is {context} tokens, the length the model was trained at: it has never seen positions past it, "
        f"so give llama.cpp `--ctx-size {context}` or less (the Modelfile sets `num_ctx {context}`).",
        "",
    ]


def model_card(name: str, config: Config, counts: dict[str, int], dtype: str, source: dict[str, Any],
               metrics: dict[str, Any] | None, data: dict[str, Any] | None = None,
               formats: tuple[str, ...] = ("hf",)) -> str:
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
    lines += ["", "## Use it", ""]
    if "hf" in formats:
        lines += _hf_usage()
    if "gguf" in formats:
        lines += _gguf_usage(name, m.context_length)
    lines += [
        "Chat messages are rendered as `Role: content` blocks separated by blank lines, ending with",
        "`Assistant:` (the chat templates do the same); a reply ends where the model starts the next turn, at "
        + " or ".join(f"`{json.dumps(text)[1:-1]}`" for text in CHAT_STOP) + ".",
        "",
    ]
    return "\n".join(lines)


def _check_format(output_format: str, dtype: str) -> tuple[str, ...]:
    """The formats ``--format`` names, once ``--dtype`` is known to suit them."""
    if output_format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    formats = ("hf", "gguf") if output_format == "all" else (output_format,)
    allowed = GGUF_DTYPES if formats == ("gguf",) else tuple(DTYPES)
    if dtype not in allowed:
        if dtype in GGUF_DTYPES:
            raise UsageError(f"--dtype {dtype} is for GGUF only: use --format gguf (safetensors hold {', '.join(DTYPES)})")
        raise UsageError(f"--dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return formats


def deploy(target: Path, out: Path, dtype: str = "fp32", prefer: str = "best", output_format: str = "hf",
           reporter: Reporter = NullReporter()) -> Path:
    """Write a bundle for a run, checkpoint or bundle ``target`` at ``out``, atomically; returns ``out``.

    ``output_format`` is one of ``FORMATS``: the Hugging Face files, the GGUF file and Modelfile, or both.
    """
    formats = _check_format(output_format, dtype)
    out = Path(out)
    target = Path(target)
    if out.exists() and not (out.is_dir() and (is_bundle(out) or not any(out.iterdir()))):
        raise UsageError(f"{out} exists and is not a hetlm bundle; refusing to replace it")
    if out.resolve() == target.resolve():
        raise UsageError("--out must differ from the target")
    if is_bundle(target) and not (target / WEIGHTS).is_file():
        raise UsageError(f"{target} holds GGUF weights only; deploy from its run or checkpoint, or from a bundle "
                         "written with --format hf or all")
    loaded = load_checkpoint(target, "cpu", prefer=prefer, reporter=reporter)
    config = loaded.config
    if not loaded.tokenizer_path.is_file():
        raise HetlmError(f"{loaded.tokenizer_path} is missing")
    tokenizer = Tokenizer.load(loaded.tokenizer_path)
    pieces = _special_pieces(tokenizer)
    if "gguf" in formats:
        check_tokenizer(tokenizer)
    dummy_prefix = _adds_dummy_prefix(tokenizer)
    if dummy_prefix and "hf" in formats:
        reporter.warning("the tokenizer adds a dummy prefix space; transformers' LlamaTokenizer will not give "
                         "hetlm's ids for text that starts without a space")
    source = _source_info(loaded)
    metrics = loaded.eval_results(reporter)
    data = data_summary(loaded)
    counts = parameter_counts(config.model)

    def fill(folder: Path) -> dict[str, Any]:
        if "hf" in formats:
            state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in weights_state_dict(loaded.model).items()}
            save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
            del state
            _write_json(folder / "config.json", hf_config(config, dtype))
            _write_json(folder / "generation_config.json", hf_generation_config(config))
            _write_json(folder / "tokenizer_config.json", hf_tokenizer_config(pieces, config.model.context_length))
            _write_json(folder / "special_tokens_map.json",
                        {f"{name}_token": pieces[name] for name in ("bos", "eos", "unk", "pad")})
        if "gguf" in formats:
            # llama.cpp adds a leading space only if told to: say what this tokenizer does.
            write_gguf(folder / GGUF_FILE, loaded.model, config, tokenizer, dtype, out.name, CHAT_TEMPLATE,
                       add_space_prefix=dummy_prefix, reporter=reporter)
            (folder / MODELFILE).write_text(modelfile(config, ollama_template(CHAT_ROLES), CHAT_STOP), encoding="utf-8")
        shutil.copyfile(loaded.tokenizer_path, folder / TOKENIZER)
        (folder / "README.md").write_text(model_card(out.name, config, counts, dtype, source, metrics, data, formats),
                                          encoding="utf-8")
        return {
            "formats": list(formats),
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

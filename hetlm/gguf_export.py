"""GGUF, the file llama.cpp and Ollama load, written with llama.cpp's own ``gguf`` package, and an Ollama Modelfile.

A GGUF file holds the hyperparameters, the tokenizer (pieces, scores, types, special ids), the chat
template, the sampling defaults and the weights under llama.cpp's tensor names. Two things differ from
the Hugging Face export:

- RoPE. hetlm, like Hugging Face, rotates the two halves of each head (dimension i with i + E/2);
  llama.cpp's ``llama`` architecture rotates interleaved pairs (2i with 2i + 1). The rows of the q and k
  projections are permuted per head on the way out (q with the query heads, k with the key/value
  heads; v is not rotated and stays as it is), so llama.cpp computes the same attention scores.
- The tokenizer. llama.cpp's ``llama`` tokenizer is SentencePiece BPE with byte fallback: it merges
  pieces by score. A BPE model's pieces and scores carry over exactly; a unigram model's do not (it
  would tokenize differently there, and llama.cpp's unigram type has no byte fallback), so it is refused.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from hetlm.config import Config
from hetlm.errors import HetlmError, UsageError
from hetlm.reporting import NullReporter, Reporter
from hetlm.store import GGUF_FILE, weights_state_dict
from hetlm.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

GGUF_DTYPES = ("fp32", "fp16", "bf16", "q8_0")
_TENSOR_TYPES = {
    "fp32": gguf.GGMLQuantizationType.F32,
    "fp16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
_FILE_TYPES = {
    "fp32": gguf.LlamaFileType.ALL_F32,
    "fp16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
ARCHITECTURE = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
# hetlm's sampling has neither of these; llama.cpp (min_p 0.05) and Ollama (repeat_penalty 1.1 in some
# versions) would otherwise apply their own defaults.
NO_MIN_P, NO_REPEAT_PENALTY = 0.0, 1.0


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """UsageError unless llama.cpp's ``llama`` tokenizer gives this tokenizer's ids."""
    if tokenizer.model_type != "bpe":
        raise UsageError(
            f"--format gguf needs a bpe tokenizer, and this model's is {tokenizer.model_type}: llama.cpp merges "
            "SentencePiece pieces by score like BPE (a unigram model would tokenize differently there, and its "
            "unigram type has no byte fallback); preprocess with --tokenizer bpe and train again")


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A q or k projection (heads * E, D) with each head's rows from rotate-half order (0..E/2-1, then their
    partners E/2..E-1) to llama.cpp's interleaved pairs (0, E/2, 1, E/2+1, ...)."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def _token_types(tokenizer: Tokenizer) -> list[int]:
    p = tokenizer.processor
    types = []
    for i in range(tokenizer.vocab_size):
        if p.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif p.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif p.IsByte(i):
            kind = gguf.TokenType.BYTE
        elif p.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    return types


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, add_space_prefix: bool, chat_template: str) -> None:
    p = tokenizer.processor
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.IdToPiece(i) for i in range(tokenizer.vocab_size)])
    writer.add_token_scores([p.GetScore(i) for i in range(tokenizer.vocab_size)])
    writer.add_token_types(_token_types(tokenizer))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    # Every training document began with <s> and none of the prompts end with </s>.
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    # Without this key llama.cpp puts a space before the text, as SentencePiece's default dummy prefix
    # would, and every id differs.
    writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template(chat_template)


def _tensor_data(array: np.ndarray, dtype: str, name: str, reporter: Reporter) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    # Norm weights stay fp32 in every file type, as llama.cpp's own converter writes them.
    qtype = _TENSOR_TYPES[dtype] if array.ndim > 1 else gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        # q8_0 quantizes blocks of 32 along a row; a row of another length goes in fp16, like llama.cpp does.
        reporter.warning(f"{name}: rows of {array.shape[-1]} are not a multiple of 32; written as fp16")
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def write_gguf(path: Path, model: torch.nn.Module, config: Config, tokenizer: Tokenizer, dtype: str, name: str,
               chat_template: str, add_space_prefix: bool = False, reporter: Reporter = NullReporter()) -> None:
    """Write ``model`` with its tokenizer as a GGUF file for llama.cpp's ``llama`` architecture."""
    check_tokenizer(tokenizer)
    m, s = config.model, config.sample
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    writer.add_name(name)
    writer.add_vocab_size(m.vocab_size)
    writer.add_context_length(m.context_length)
    writer.add_embedding_length(m.d_model)
    writer.add_block_count(m.n_layers)
    writer.add_feed_forward_length(m.ffn_dim)
    writer.add_head_count(m.n_heads)
    writer.add_head_count_kv(m.kv_heads)
    writer.add_key_length(m.head_dim)
    writer.add_value_length(m.head_dim)
    writer.add_rope_dimension_count(m.head_dim)
    writer.add_rope_freq_base(m.rope_theta)
    writer.add_layer_norm_rms_eps(m.norm_eps)
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, add_space_prefix, chat_template)
    writer.add_sampling_temp(s.temperature)
    writer.add_sampling_top_k(s.top_k)
    writer.add_sampling_top_p(s.top_p)
    writer.add_sampling_min_p(NO_MIN_P)
    writer.add_sampling_penalty_repeat(NO_REPEAT_PENALTY)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, m.n_layers)
    for hf_name, tensor in weights_state_dict(model).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise HetlmError(f"no GGUF name for the weight {hf_name}")
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = interleave_rope_rows(tensor, m.n_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = interleave_rope_rows(tensor, m.kv_heads)
        data, qtype = _tensor_data(tensor.numpy(), dtype, gguf_name, reporter)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def ollama_template(roles: dict[str, str]) -> str:
    """The chat as Ollama's Go template: each message as "Label: content" and a blank line, then "Assistant:";
    ``roles`` maps message roles to labels, and any other role is the assistant's, as in the Jinja template."""
    branches = [(role, label) for role, label in roles.items() if role != "assistant"]
    template = "{{ range .Messages }}"
    for index, (role, label) in enumerate(branches):
        template += f'{{{{ {"if" if index == 0 else "else if"} eq .Role "{role}" }}}}{label}: '
    template += "{{ else }}Assistant: {{ end }}{{ .Content }}\n\n{{ end }}Assistant:"
    return template


def modelfile(config: Config, template: str, stop: list[str]) -> str:
    """An Ollama Modelfile for the GGUF file beside it: the chat template, stop strings, context and sampling."""
    s = config.sample
    lines = [
        "# Ollama: ollama create NAME -f Modelfile, then ollama run NAME",
        f"FROM ./{GGUF_FILE}",
        f'TEMPLATE """{template}"""',
        # Ollama's Modelfile has no escapes: a newline in a stop string is a line break inside the quotes.
        *(f'PARAMETER stop "{text}"' for text in stop),
        # The trained context: RoPE positions past it were never seen.
        f"PARAMETER num_ctx {config.model.context_length}",
        f"PARAMETER temperature {s.temperature:g}",
        f"PARAMETER top_k {s.top_k}",
        f"PARAMETER top_p {s.top_p:g}",
        f"PARAMETER min_p {NO_MIN_P:g}",
        f"PARAMETER repeat_penalty {NO_REPEAT_PENALTY:g}",
    ]
    return "\n".join(lines) + "\n"


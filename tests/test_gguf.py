"""``hetlm deploy --format gguf``: the file read back with llama.cpp's own reader, and a llama.cpp-style forward pass.

Nothing here runs llama.cpp. Every key and tensor is read back with ``gguf.GGUFReader``; the tensors are
un-permuted and compared with the model's, and logits computed from the file's tensors alone, with
llama.cpp's interleaved-pair RoPE, are compared with hetlm's.
"""

from __future__ import annotations

import json
import math
import re

import gguf
import numpy as np
import pytest
import torch

from hetlm.chat import CHAT_ROLES, CHAT_STOP, CHAT_TEMPLATE, render_chat
from hetlm.config import load_config
from hetlm.deploy import deploy
from hetlm.errors import UsageError
from hetlm.model import Transformer
from hetlm.preprocess import stdlib_root
from hetlm.store import BUNDLE_MANIFEST, Checkpoint, RunDir, load_checkpoint
from hetlm.tokenizer import Tokenizer, train_tokenizer, training_sentences

GGML = gguf.GGMLQuantizationType
TEXTS = ["def f(x):\n    return x  # 注释\n", "\t\tif y:\n\t\t\tpass\n", "   three leading spaces", "日本語 🎉 x"]


def small_config(data, *overrides):
    return load_config(overrides=[
        f"data.dir={data}", "data.vocab_size=512", "model.vocab_size=512", "model.n_layers=2", "model.d_model=64",
        "model.n_heads=4", "model.context_length=64", "device.device=cpu", *overrides])


@pytest.fixture(scope="module")
def untied_checkpoint(tiny_data, tmp_path_factory):
    """Grouped-query (4 query heads, 1 key/value head), untied, and a feed-forward width (100) that q8_0 cannot
    quantize; random weights with norms away from one, so every tensor is told apart."""
    config = small_config(tiny_data, "model.n_kv_heads=1", "model.tie_embeddings=false", "model.d_ff=100")
    torch.manual_seed(1)
    model = Transformer(config.model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    run = tmp_path_factory.mktemp("untied") / "run"
    Checkpoint.write(RunDir(run).checkpoint_path(1), model, config, tiny_data / "tokenizer.model", info={"step": 1})
    return run


@pytest.fixture(scope="module", params=["tied", "untied"])
def case(request, tiny_checkpoint, untied_checkpoint, tmp_path_factory):
    """(checkpoint, its model, its fp32 GGUF read back)."""
    source = tiny_checkpoint if request.param == "tied" else untied_checkpoint
    out = deploy(source, tmp_path_factory.mktemp("gguf") / "bundle", output_format="gguf")
    return source, load_checkpoint(source), gguf.GGUFReader(out / "model.gguf")


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def tensors(reader: gguf.GGUFReader) -> dict[str, torch.Tensor]:
    """Each tensor in fp32, shaped as torch shapes it (rows first)."""
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist())))
    return out


def rotate_half_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo the export's permutation: per head, interleaved pairs (0, E/2, 1, E/2+1, ...) back to halves."""
    rows, columns = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def test_keys(case):
    _, loaded, reader = case
    m = loaded.config.model
    assert field(reader, "general.architecture") == "llama"
    expected = {
        "llama.context_length": m.context_length, "llama.embedding_length": m.d_model, "llama.block_count": m.n_layers,
        "llama.feed_forward_length": m.ffn_dim, "llama.attention.head_count": m.n_heads,
        "llama.attention.head_count_kv": m.kv_heads, "llama.attention.key_length": m.head_dim,
        "llama.attention.value_length": m.head_dim, "llama.rope.dimension_count": m.head_dim,
        "llama.vocab_size": m.vocab_size, "general.file_type": int(gguf.LlamaFileType.ALL_F32),
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(m.rope_theta)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(m.norm_eps)
    s = loaded.config.sample
    assert field(reader, "general.sampling.temp") == pytest.approx(s.temperature)
    assert field(reader, "general.sampling.top_k") == s.top_k
    assert field(reader, "general.sampling.top_p") == pytest.approx(s.top_p)
    assert field(reader, "general.sampling.min_p") == 0.0 and field(reader, "general.sampling.penalty_repeat") == 1.0


def test_tokenizer_keys(case):
    _, loaded, reader = case
    tok = Tokenizer.load(loaded.tokenizer_path)
    p = tok.processor
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.tokens") == [p.IdToPiece(i) for i in range(tok.vocab_size)]
    assert field(reader, "tokenizer.ggml.scores") == pytest.approx([p.GetScore(i) for i in range(tok.vocab_size)])
    types = field(reader, "tokenizer.ggml.token_type")
    T = gguf.TokenType
    assert types[:4] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.CONTROL]
    assert all(types[i] == T.BYTE for i in range(4, 260)) and tok.id_to_piece(4) == "<0x00>"
    assert set(types[260:]) == {T.NORMAL}
    ids = {name: field(reader, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": 1, "eos": 2, "unknown": 0, "padding": 3}
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.add_eos_token") is False
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


def test_every_tensor_equals_the_model_after_unpermuting(case):
    _, loaded, reader = case
    m = loaded.config.model
    state = loaded.model.state_dict()
    got = tensors(reader)
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not m.tie_embeddings else set())
    for i in range(m.n_layers):
        names |= {f"blk.{i}.{part}.weight" for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                         "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(got) == names
    assert {t.tensor_type for t in reader.tensors} == {GGML.F32}
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    hf_parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for name, tensor in got.items():
        if name.startswith("blk."):
            _, layer, part, _ = name.split(".")
            hf = f"model.layers.{layer}.{hf_parts[part]}.weight"
        else:
            hf = pairs[name]
        expected = state[hf]
        assert tensor.shape == expected.shape, name
        if name.endswith("attn_q.weight"):
            assert not torch.equal(tensor, expected)
            tensor = rotate_half_rows(tensor, m.n_heads)
        elif name.endswith("attn_k.weight"):
            assert not torch.equal(tensor, expected)
            tensor = rotate_half_rows(tensor, m.kv_heads)
        assert torch.equal(tensor, expected), name


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's rope for the llama architecture: dimensions (2i, 2i+1) rotate by position * theta^(-2i/E)."""
    T, E = x.shape[-2], x.shape[-1]
    freqs = theta ** (-torch.arange(0, E, 2, dtype=torch.float64) / E)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]  # (T, E/2)
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def reference_logits(reader: gguf.GGUFReader, ids: list[int], weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (T, V) from the GGUF's keys and tensors (or ``weights`` under the same names) alone, in float64."""
    w = {name: t.double() for name, t in (weights or tensors(reader)).items()}
    H, K = field(reader, "llama.attention.head_count"), field(reader, "llama.attention.head_count_kv")
    eps, theta = field(reader, "llama.attention.layer_norm_rms_epsilon"), field(reader, "llama.rope.freq_base")
    T = len(ids)
    x = w["token_embd.weight"][ids]  # (T, D)
    mask = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    for i in range(field(reader, "llama.block_count")):
        layer = {name.split(".")[2]: t for name, t in w.items() if name.startswith(f"blk.{i}.")}
        blk = layer.__getitem__
        h = rms_norm(x, blk("attn_norm"), eps)
        q = (h @ blk("attn_q").T).view(T, H, -1).transpose(0, 1)  # (H, T, E)
        k = (h @ blk("attn_k").T).view(T, K, -1).transpose(0, 1)
        v = (h @ blk("attn_v").T).view(T, K, -1).transpose(0, 1)
        q, k = interleaved_rope(q, theta), interleaved_rope(k, theta)
        # Query head j reads key/value head j // (H / K), as llama.cpp groups them.
        k, v = k.repeat_interleave(H // K, dim=0), v.repeat_interleave(H // K, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]) + mask
        attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
        x = x + attended @ blk("attn_output").T
        h = rms_norm(x, blk("ffn_norm"), eps)
        x = x + (torch.nn.functional.silu(h @ blk("ffn_gate").T) * (h @ blk("ffn_up").T)) @ blk("ffn_down").T
    x = rms_norm(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def test_a_llama_cpp_style_forward_on_the_gguf_gives_hetlms_logits(case):
    _, loaded, reader = case
    tok = Tokenizer.load(loaded.tokenizer_path)
    context = loaded.config.model.context_length
    sequences = [[tok.bos_id] + tok.encode(text)[: context - 1] for text in TEXTS]
    # A whole context of positions exercises the rotation at every position the model knows.
    sequences.append(torch.randint(4, tok.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist())
    for ids in sequences:
        with torch.no_grad():
            expected = loaded.model(torch.tensor([ids]))[0][0].double()
        got = reference_logits(reader, ids)
        assert (got - expected).abs().max().item() < 1e-4
    # The same forward pass on q and k in hetlm's own layout is wrong: the check tells the layouts apart.
    m = loaded.config.model
    unpermuted = {name: rotate_half_rows(t, m.n_heads if "attn_q" in name else m.kv_heads)
                  if re.search(r"attn_[qk]\.", name) else t for name, t in tensors(reader).items()}
    ids = sequences[-1]
    with torch.no_grad():
        expected = loaded.model(torch.tensor([ids]))[0][0].double()
    assert (reference_logits(reader, ids, unpermuted) - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("dtype, qtype, tolerance", [("fp16", GGML.F16, 1e-3), ("bf16", GGML.BF16, 1e-2),
                                                     ("q8_0", GGML.Q8_0, 2e-2)])
def test_reduced_types(untied_checkpoint, tmp_path, dtype, qtype, tolerance, cli):
    result = cli("deploy", untied_checkpoint, "--out", tmp_path / "b", "--format", "gguf", "--dtype", dtype)
    assert result.code == 0, result.err
    reader = gguf.GGUFReader(tmp_path / "b" / "model.gguf")
    file_types = {"fp16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    assert field(reader, "general.file_type") == file_types[dtype]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert all(types[name] == GGML.F32 for name in types if "norm" in name)
    # Rows of 100 are not whole q8_0 blocks of 32: that tensor goes in fp16, as llama.cpp's converter does, and says so.
    fallback = {f"blk.{i}.ffn_down.weight" for i in range(2)} if dtype == "q8_0" else set()
    assert {name for name in types if "norm" not in name and types[name] != qtype} == fallback
    assert all(types[name] == GGML.F16 for name in fallback)
    if fallback:
        assert "ffn_down.weight: rows of 100 are not a multiple of 32; written as fp16" in " ".join(result.err.split())
    loaded = load_checkpoint(untied_checkpoint)
    state = loaded.model.state_dict()
    got = tensors(reader)
    embedding = state["model.embed_tokens.weight"]
    assert (got["token_embd.weight"] - embedding).abs().max() <= tolerance * embedding.abs().max()
    assert not torch.equal(got["token_embd.weight"], embedding)
    tok = Tokenizer.load(loaded.tokenizer_path)
    ids = [tok.bos_id] + tok.encode(TEXTS[0])
    with torch.no_grad():
        expected = loaded.model(torch.tensor([ids]))[0][0].double()
    error = (reference_logits(reader, ids) - expected).abs().max().item()
    assert error < 50 * tolerance * expected.abs().max().item()


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, value) pairs as Ollama's parser reads them: a value in quotes or triple quotes may span
    lines, and nothing inside them is an escape."""
    pattern = re.compile(r'^(?!#)(\w+)[ \t]+(?:(\w+)[ \t]+)?("""(.*?)"""|"(.*?)"|(\S+))[ \t]*$', re.M | re.S)
    found = []
    for match in pattern.finditer(text):
        instruction, parameter = match.group(1).upper(), match.group(2)
        value = next(v for v in match.group(4, 5, 6) if v is not None)
        found.append((f"PARAMETER {parameter}" if instruction == "PARAMETER" else instruction, value))
    return found


def test_modelfile(tiny_checkpoint, tmp_path):
    out = deploy(tiny_checkpoint, tmp_path / "bundle", output_format="gguf", dtype="q8_0")
    commands = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    config = load_checkpoint(tiny_checkpoint).config
    assert commands[0] == ("FROM", "./model.gguf")
    values = dict(commands)
    assert [v for k, v in commands if k == "PARAMETER stop"] == CHAT_STOP == ["\nUser:", "\nSystem:"]
    assert values["PARAMETER num_ctx"] == str(config.model.context_length)
    assert float(values["PARAMETER temperature"]) == config.sample.temperature
    assert int(values["PARAMETER top_k"]) == config.sample.top_k
    assert float(values["PARAMETER top_p"]) == config.sample.top_p
    assert values["PARAMETER repeat_penalty"] == "1" and values["PARAMETER min_p"] == "0"
    template = values["TEMPLATE"]
    # Rendering the Go template by hand for these messages gives the server's prompt.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "developer", "content": "Note"}]
    assert render_go_template(template, messages) == render_chat(messages)
    assert set(re.findall(r'eq \.Role "(\w+)"', template)) == set(CHAT_ROLES) - {"assistant"}


def render_go_template(template: str, messages: list[dict[str, str]]) -> str:
    """The few constructs the Modelfile's template uses: range over .Messages, if/else if/else on eq .Role, .Content."""
    head, body, tail = re.fullmatch(r"(.*?)\{\{ range \.Messages \}\}(.*)\{\{ end \}\}(.*)", template, re.S).groups()
    branches = re.fullmatch(r"(.*)\{\{ else \}\}(.*?)\{\{ end \}\}(.*)", body, re.S)
    conditional, default, after = branches.groups()
    labels = dict(re.findall(r'\{\{ (?:if|else if) eq \.Role "(\w+)" \}\}([^{]*)', conditional))
    return head + "".join(labels.get(m["role"], default) + after.replace("{{ .Content }}", m["content"])
                          for m in messages) + tail


def test_formats_write_their_files(tiny_checkpoint, tmp_path):
    hf = {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"}
    gg = {"model.gguf", "Modelfile"}
    common = {"tokenizer.model", "README.md", BUNDLE_MANIFEST}
    for fmt, files in (("hf", hf), ("gguf", gg), ("all", hf | gg)):
        out = deploy(tiny_checkpoint, tmp_path / fmt, output_format=fmt, dtype="fp16")
        assert {p.name for p in out.iterdir()} == files | common, fmt
        meta = json.loads((out / BUNDLE_MANIFEST).read_text())
        assert meta["formats"] == (["hf", "gguf"] if fmt == "all" else [fmt])
        assert set(meta["files"]) == files | common - {BUNDLE_MANIFEST}
        card = (out / "README.md").read_text()
        assert ("llama-server -m THIS_FOLDER/model.gguf --ctx-size 64" in card) == (fmt != "hf")
        assert (f"ollama create {fmt} -f Modelfile" in card) == (fmt != "hf")
        assert ("AutoModelForCausalLM.from_pretrained" in card) == (fmt != "gguf")
    # The GGUF of `all` is the GGUF of `gguf`.
    assert (tmp_path / "all" / "model.gguf").read_bytes() != b""
    assert gguf.GGUFReader(tmp_path / "all" / "model.gguf").tensors[0].data.tobytes() == \
        gguf.GGUFReader(tmp_path / "gguf" / "model.gguf").tensors[0].data.tobytes()
    with pytest.raises(UsageError, match="holds GGUF weights only"):
        deploy(tmp_path / "gguf", tmp_path / "again")


def test_bad_format_and_dtype_are_exit_2(cli, tiny_checkpoint, tmp_path):
    for args, message in ((["--format", "onnx"], "--format must be one of hf, gguf, all"),
                          (["--dtype", "q8_0"], "--dtype q8_0 is for GGUF only: use --format gguf"),
                          (["--format", "all", "--dtype", "q8_0"], "--dtype q8_0 is for GGUF only"),
                          (["--format", "gguf", "--dtype", "int4"], "--dtype must be one of fp32, fp16, bf16, q8_0")):
        result = cli("deploy", tiny_checkpoint, "--out", tmp_path / "b", *args)
        assert result.code == 2 and message in result.err, (args, result.err)
        assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_a_unigram_tokenizer_is_refused_for_gguf(cli, tiny_data, tmp_path):
    text = "".join(path.read_text(encoding="utf-8") for path in sorted(stdlib_root().glob("*.py"))[:3])
    unigram = train_tokenizer(training_sentences(text[:50_000]), 300, "unigram")
    unigram.save(tmp_path / "unigram.model")
    config = small_config(tiny_data, "data.tokenizer=unigram", "data.vocab_size=300", "model.vocab_size=300")
    run = tmp_path / "run"
    Checkpoint.write(RunDir(run).checkpoint_path(1), Transformer(config.model), config, tmp_path / "unigram.model",
                     info={"step": 1})
    for fmt in ("gguf", "all"):
        result = cli("deploy", run, "--out", tmp_path / "b", "--format", fmt)
        assert result.code == 2 and "Traceback" not in result.err
        assert len(result.err.strip().splitlines()) == 1
        assert "--format gguf needs a bpe tokenizer, and this model's is unigram" in result.err
        assert not (tmp_path / "b").exists()
    assert cli("deploy", run, "--out", tmp_path / "b").code == 0


def test_a_gguf_only_bundle_is_refused_by_hetlm_with_one_line(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "gguf-only"
    assert cli("deploy", tiny_checkpoint, "--out", out, "--format", "gguf").code == 0
    refused = cli("generate", out, "--prompt", "x")
    assert refused.code == 2 and "holds only model.gguf" in refused.err and len(refused.err.strip().splitlines()) == 1

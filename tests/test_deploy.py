"""``hetlm deploy``: the bundle loads in transformers and in hetlm, and both compute the same thing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from hetlm.chat import render_chat
from hetlm.deploy import deploy
from hetlm.errors import UsageError
from hetlm.io import sha256_file
from hetlm.store import BUNDLE_MANIFEST, load_checkpoint, resolve
from hetlm.tokenizer import Tokenizer

TEXTS = [
    "def f(x):\n    return x  # 注释\n",
    "\t\tif y:\n\t\t\tpass\n",
    "   three leading spaces, then  two",
    "日本語のテキストと中文 🎉🙂 mixed with ascii",
    "x",
]


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    return deploy(tiny_checkpoint, tmp_path_factory.mktemp("deploy") / "bundle")


@pytest.fixture(scope="module")
def transformers_offline():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    return transformers


def test_transformers_loads_bundle_and_matches_logits(bundle, tiny_checkpoint, transformers_offline):
    hf = transformers_offline.AutoModelForCausalLM.from_pretrained(str(bundle)).eval()
    ours = load_checkpoint(tiny_checkpoint)
    tokenizer = Tokenizer.load(ours.tokenizer_path)
    assert hf.config.rope_parameters["rope_theta"] == ours.config.model.rope_theta
    assert hf.config.tie_word_embeddings == ours.config.model.tie_embeddings
    context = ours.config.model.context_length
    for text in TEXTS:
        ids = torch.tensor([tokenizer.encode(text)[:context]])
        with torch.no_grad():
            expected = ours.model(ids)[0]
            got = hf(ids).logits
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-4, text
    # A full context's worth of positions exercises RoPE at every position the model knows.
    ids = torch.randint(4, ours.config.model.vocab_size, (2, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ours.model(ids)[0]).abs().max().item() < 1e-4


def test_transformers_tokenizer_matches_hetlm(bundle, transformers_offline):
    auto = transformers_offline.AutoTokenizer.from_pretrained(str(bundle))
    ours = Tokenizer.load(bundle / "tokenizer.model")
    for text in TEXTS:
        ids = ours.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
        assert auto.decode(ids) == text == ours.decode(ids)
        assert auto(text)["input_ids"] == [1] + ids
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id, auto.pad_token_id) == (1, 2, 0, 3)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    rendered = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"
    assert rendered == render_chat(messages) == expected


def test_bundle_files_and_manifest(bundle, tiny_checkpoint):
    meta = json.loads((bundle / BUNDLE_MANIFEST).read_text())
    names = {p.name for p in bundle.iterdir()}
    assert names == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model",
                     "tokenizer_config.json", "special_tokens_map.json", "README.md", BUNDLE_MANIFEST}
    assert set(meta["files"]) == names - {BUNDLE_MANIFEST}
    assert all(sha256_file(bundle / name) == digest for name, digest in meta["files"].items())
    assert meta["kind"] == "bundle" and meta["dtype"] == "fp32"
    assert meta["source"]["checkpoint"] == str(resolve(tiny_checkpoint).resolve())
    with safe_open(str(bundle / "model.safetensors"), "pt") as weights:
        assert weights.metadata()["format"] == "pt"
        assert "lm_head.weight" not in weights.keys()
    config = json.loads((bundle / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    # The card says what the model was trained on, from the data folder's manifest.
    assert meta["data"]["splits"]["train"]["tokens"] > 0
    card = (bundle / "README.md").read_text()
    assert f"{meta['data']['splits']['train']['tokens']:,} tokens" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "hetlm serve" in card
    # No temporary folder is left beside the bundle.
    assert [p.name for p in bundle.parent.iterdir()] == ["bundle"]


def test_hetlm_loads_bundle_in_every_dtype(tiny_checkpoint, tmp_path, transformers_offline):
    source = load_checkpoint(tiny_checkpoint)
    ids = torch.tensor([Tokenizer.load(source.tokenizer_path).encode(TEXTS[0])])
    with torch.no_grad():
        expected = source.model(ids)[0]
    for dtype, tolerance, torch_dtype in [("fp32", 0.0, torch.float32), ("bf16", 0.05, torch.bfloat16),
                                          ("fp16", 0.01, torch.float16)]:
        out = deploy(tiny_checkpoint, tmp_path / dtype, dtype=dtype)
        with safe_open(str(out / "model.safetensors"), "pt") as weights:
            assert weights.get_tensor("model.embed_tokens.weight").dtype == torch_dtype
        loaded = load_checkpoint(out)
        assert loaded.manifest["kind"] == "bundle"
        assert next(loaded.model.parameters()).dtype == torch.float32
        with torch.no_grad():
            got = loaded.model(ids)[0]
        assert (got - expected).abs().max().item() <= tolerance, dtype
    hf = transformers_offline.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert hf.dtype == torch.bfloat16


def test_eval_and_generate_take_a_bundle(cli, tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    text = tmp_path / "sample.py"
    text.write_text("import os\n\n\ndef main():\n    print(os.getcwd())\n" * 4, encoding="utf-8")
    scored = cli("eval", run, "--text", text, "--json")
    assert scored.code == 0, scored.err
    assert (run / "eval.json").is_file()
    bundle = deploy(run, tmp_path / "bundle")
    meta = json.loads((bundle / BUNDLE_MANIFEST).read_text())
    assert meta["eval"]["loss"] == json.loads(scored.out)["loss"]
    assert f"| loss | {meta['eval']['loss']:.4g} |" in (bundle / "README.md").read_text()

    again = cli("eval", bundle, "--text", text, "--json")
    assert again.code == 0, again.err
    assert json.loads(again.out)["loss"] == json.loads(scored.out)["loss"]
    assert not (bundle / "eval.json").exists()
    generated = cli("generate", bundle, "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0")
    assert generated.code == 0, generated.err
    assert generated.out == cli("generate", run, "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0").out

    # A bundle re-deployed in another dtype keeps its metrics and source.
    redeployed = deploy(bundle, tmp_path / "bf16", dtype="bf16")
    meta2 = json.loads((redeployed / BUNDLE_MANIFEST).read_text())
    assert meta2["eval"] == meta["eval"] and meta2["source"] == meta["source"] and meta2["dtype"] == "bf16"


def test_metrics_of_another_checkpoint_are_left_out(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    (run / "eval.json").write_text(json.dumps({"loss": 3.25, "checkpoint": str(tmp_path / "elsewhere")}))
    out = deploy(run, tmp_path / "bundle")
    assert json.loads((out / BUNDLE_MANIFEST).read_text())["eval"] is None
    assert "No `hetlm eval` results" in (out / "README.md").read_text()


def test_corrupt_bundle_is_refused(tiny_checkpoint, tmp_path):
    out = deploy(tiny_checkpoint, tmp_path / "bundle")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="corrupt"):
        load_checkpoint(out)


def test_deploy_cli(cli, tiny_checkpoint, tmp_path):
    result = cli("deploy", tiny_checkpoint, "--out", tmp_path / "b", "--dtype", "fp16")
    assert result.code == 0, result.err
    assert result.out.strip() == str(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "float16"
    # Deploying over an existing bundle replaces it.
    assert cli("deploy", tiny_checkpoint, "--out", tmp_path / "b").code == 0
    assert json.loads((tmp_path / "b" / BUNDLE_MANIFEST).read_text())["dtype"] == "fp32"

    bad = cli("deploy", tiny_checkpoint, "--out", tmp_path / "c", "--dtype", "int8")
    assert bad.code == 2 and "--dtype must be one of" in bad.err and "Traceback" not in bad.err
    missing = cli("deploy", tmp_path / "nothing", "--out", tmp_path / "c")
    assert missing.code == 2 and "does not exist" in missing.err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    taken = cli("deploy", tiny_checkpoint, "--out", tmp_path / "taken")
    assert taken.code == 2 and "refusing to replace" in taken.err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "c").exists()

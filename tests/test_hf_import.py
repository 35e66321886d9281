"""Importing a Hugging Face LlamaForCausalLM folder built with real transformers and a real SentencePiece model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from hetlm.build import open_init
from hetlm.errors import UsageError
from hetlm.hf_import import read_hf_llama
from hetlm.tokenizer import train_tokenizer
from tests.test_finetune import new_text, one_line_error
from tests.test_train import write_config

transformers = pytest.importorskip("transformers")


def hf_folder(root, tie: bool = False):
    """A tiny random LlamaForCausalLM saved by transformers, with a SentencePiece tokenizer trained here."""
    text = new_text(root / "hf-text", documents=10)
    tokenizer = train_tokenizer([p.read_text() for p in sorted(text.iterdir())], 300)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6,
                                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = root / ("hf-tied" if tie else "hf")
    model.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.model")
    return folder, model


@pytest.mark.parametrize("tie", [False, True])
def test_an_imported_llama_gives_transformers_logits(tmp_path, tie):
    folder, reference = hf_folder(tmp_path, tie)
    source = open_init(folder)
    assert source.model_config.tie_embeddings is tie and source.model_config.kv_heads == 2
    assert source.model_config.rope_theta == 500.0 and source.lineage["format"] == "hf"
    ids = torch.randint(0, source.model_config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        logits, _ = source.model.eval()(ids)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def edited(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"attention_bias": True}, "no biases"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     "RoPE scaling is 'linear'"),
    ({"architectures": ["MistralForCausalLM"]}, "LlamaForCausalLM only"),
    ({"hidden_act": "gelu"}, "SwiGLU"),
    ({"tie_word_embeddings": True}, "lm_head.weight differs"),
    ({"vocab_size": 320}, "vocab_size is 320"),
])
def test_what_hetlm_cannot_represent_is_refused(tmp_path, changes, fragment):
    folder, _ = hf_folder(tmp_path)
    edited(folder, **changes)
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
        read_hf_llama(folder)


def test_fine_tune_an_imported_llama(cli, tmp_path):
    folder, _ = hf_folder(tmp_path)
    data = tmp_path / "data"
    result = cli("preprocess", new_text(tmp_path / "more"), "--out", data, "--tokenizer-from", folder)
    assert result.code == 0, result.err
    config = write_config(tmp_path, data, model={"n_layers": 2, "d_model": 32, "n_heads": 4, "context_length": 32},
                          train={"max_steps": 4, "checkpoint_every": 4, "eval_every": 4})
    run = tmp_path / "run"
    trained = cli("train", "--init", folder, "--config", config, "--out", run)
    assert trained.code == 0, trained.err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # The folder's shape, and the run's own (shorter) context.
    assert saved["model"]["n_kv_heads"] == 2 and saved["model"]["d_ff"] == 64 and saved["model"]["context_length"] == 32
    assert saved["model"]["tie_embeddings"] is False
    manifest = json.loads((run / "checkpoints" / "step-000004" / "manifest.json").read_text())
    assert manifest["init"]["format"] == "hf" and len(manifest["init"]["weights_sha256"]) == 64
    edited(folder, mlp_bias=True)
    one_line_error(cli("train", "--init", folder, "--config", config, "--out", tmp_path / "other"), 2, "no biases")

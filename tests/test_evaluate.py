import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetlm.errors import UsageError
from hetlm.evaluate import count_bytes, evaluate, text_tokens, token_byte_lengths, windows
from hetlm.store import open_split, read_data_manifest

TEXT = "def naïve(x):\n    return '中文字符' + \"😀🎉\"  # ✓\n" * 20


def reference_nll(model, tokens, stride):
    """NLL of every target, one plain forward per window, the first window to reach a target scoring it."""
    ctx = model.config.context_length
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    nll = {}
    start = 0
    while len(nll) < len(tokens) - 1:
        window = tokens[start : start + ctx + 1]
        with torch.no_grad():
            logits, _ = model(window[None, :-1])
        losses = F.cross_entropy(logits[0].double(), window[1:], reduction="none")
        for offset, loss in enumerate(losses.tolist()):
            nll.setdefault(start + offset + 1, loss)
        start += stride
    assert sorted(nll) == list(range(1, len(tokens)))
    return sum(nll.values())


@pytest.mark.parametrize(("n", "ctx", "stride"), [(2, 4, 4), (10, 4, 4), (11, 4, 4), (100, 16, 5), (17, 16, 1), (5, 64, 64)])
def test_windows_score_every_target_once(n, ctx, stride):
    scored = []
    for start, end, first in windows(n, ctx, stride):
        assert 0 < end - start <= ctx and 0 <= first < end - start
        scored += range(start + first + 1, end + 1)
    assert scored == list(range(1, n))


@pytest.mark.parametrize("stride", [0, 24])
def test_metrics_match_an_independent_computation(loaded, tokenizer, tiny_data, stride):
    tokens = open_split(tiny_data, "val")[:1500]
    result = evaluate(loaded.model, tokenizer, tokens, source="val", inputs=[], checkpoint="", stride=stride, batch_size=5)
    expected = reference_nll(loaded.model, tokens, stride or loaded.model.config.context_length)
    assert result.tokens == len(tokens) - 1
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.loss == pytest.approx(expected / result.tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
    text_bytes = len(tokenizer.decode(tokens[1:].tolist()).encode("utf-8"))
    assert result.bytes == text_bytes
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / text_bytes, rel=1e-5)


def test_byte_counts_are_exact(tokenizer, tiny_data):
    lengths = token_byte_lengths(tokenizer)
    ids = tokenizer.encode(TEXT)
    assert count_bytes(np.asarray(ids), lengths) == len(TEXT.encode("utf-8"))
    assert lengths[tokenizer.bos_id] == lengths[tokenizer.eos_id] == 0
    # The whole split: what preprocessing counted from the raw documents.
    val = open_split(tiny_data, "val")
    assert count_bytes(val, lengths, chunk=1000) == read_data_manifest(tiny_data)["splits"]["val"]["bytes"]


def test_max_tokens_scores_that_many(loaded, tokenizer, tiny_data):
    result = evaluate(loaded.model, tokenizer, open_split(tiny_data, "val"), source="val", inputs=[], checkpoint="",
                      max_tokens=300)
    assert result.tokens == 300


def test_text_files(loaded, tokenizer, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT, encoding="utf-8")
    b.write_text("print('hi')\n", encoding="utf-8")
    tokens, size, chars = text_tokens(tokenizer, [a, b])
    assert tokens.tolist() == [1, *tokenizer.encode(TEXT), 2, 1, *tokenizer.encode("print('hi')\n"), 2]
    result = evaluate(loaded.model, tokenizer, tokens, source="text", inputs=[], checkpoint="", chars=chars)
    assert result.bytes == size == len(TEXT.encode("utf-8")) + 12
    assert result.chars == len(TEXT) + 12
    assert result.bits_per_char == pytest.approx(result.nll / math.log(2) / result.chars)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UsageError, match="empty"):
        text_tokens(tokenizer, [a, empty])


def test_cli_eval_json_table_and_saved_result(cli, tiny_checkpoint, tiny_data):
    first = cli("eval", tiny_checkpoint, "--json", "--max-tokens", "500", "-s", "device.threads=1")
    assert first.code == 0, first.err
    record = json.loads(first.out)
    assert record["tokens"] == 500 and record["source"] == "val" and record["inputs"] == [str(tiny_data)]
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    assert json.loads((tiny_checkpoint / "eval.json").read_text()) == record
    again = cli("evaluate", tiny_checkpoint, "--json", "--max-tokens", "500", "-s", "device.threads=1")
    assert again.code == 0
    assert {k: v for k, v in json.loads(again.out).items() if "second" not in k} == \
        {k: v for k, v in record.items() if "second" not in k}
    checkpoint = tiny_checkpoint / "checkpoints" / "step-000060"
    table = cli("eval", checkpoint, "--max-tokens", "200", "--stride", "32", "-s", "device.threads=1")
    assert table.code == 0, table.err
    assert "bits per byte" in table.out and "perplexity" in table.out


def test_cli_eval_text(cli, tiny_checkpoint, tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(TEXT, encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("x = 1\n", encoding="utf-8")
    both = cli("eval", tiny_checkpoint, "--text", a, b, "--json", "-s", "device.threads=1")
    assert both.code == 0, both.err
    record = json.loads(both.out)
    assert record["source"] == "text" and record["bytes"] == len(TEXT.encode()) + 6 and record["chars"] == len(TEXT) + 6
    repeated = cli("eval", tiny_checkpoint, "--text", a, "--text", b, "--json", "-s", "device.threads=1")
    assert json.loads(repeated.out)["nll"] == record["nll"]


def test_cli_eval_bad_input(cli, tiny_checkpoint, tiny_data, tmp_path):
    from hetlm.config import load_config
    from hetlm.preprocess import preprocess

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b"):
        (corpus / f"{name}.py").write_text("".join(f"value_{name}{i} = compute({i * 7}, '{i ** 2}')\n" for i in range(400)))
    other = preprocess(load_config(overrides=["data.vocab_size=300", "data.val_fraction=0.5"]), [str(corpus)],
                       tmp_path / "other", workers=1).out
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    not_a_run = tmp_path / "nothing"
    not_a_run.mkdir()
    cases = [
        (not_a_run,), (tmp_path / "missing",),
        (tiny_checkpoint, "--data", other),
        (tiny_checkpoint, "--text", empty), (tiny_checkpoint, "--text", latin1), (tiny_checkpoint, "--text", tmp_path / "no.txt"),
        (tiny_checkpoint, "--text", empty, "--data", tiny_data),
        (tiny_checkpoint, "--split", "test"), (tiny_checkpoint, "--stride", "65"), (tiny_checkpoint, "--max-tokens", "-1"),
        (tiny_checkpoint, "--set", "model.n_layers=3"), (tiny_checkpoint, "stray.txt"), (tiny_checkpoint, "--data", tmp_path),
    ]
    for args in cases:
        result = cli("eval", *args)
        assert result.code == 2, (args, result.err)
        assert "error" in result.err and "Traceback" not in result.err
        assert len(result.err.strip().splitlines()) <= 2, result.err  # one line (plus usage for option errors)
    assert "another tokenizer" in cli("eval", tiny_checkpoint, "--data", other).err

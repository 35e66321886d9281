"""Small fixes around the pipeline's edges, one test each."""

from __future__ import annotations

import dataclasses
import gzip
import json

from hetlm.config import load_config
from hetlm.model import parameter_counts


def test_plan_takes_the_vocabulary_of_the_data_folder_and_says_when_there_is_none(cli, tiny_data, tmp_path):
    result = cli("plan", "--set", f"data.dir={tiny_data}", "--json")
    assert result.code == 0, result.err
    model = dataclasses.replace(load_config().model, vocab_size=512)
    assert json.loads(result.out)["memory"][0]["weights"] == 4 * parameter_counts(model)["total"]
    assert "note:" not in result.err
    missing = cli("plan", "--set", f"data.dir={tmp_path / 'nope'}", "--json")
    assert missing.code == 0 and "is not there" in missing.err and "vocabulary of 4096" in missing.err
    model = dataclasses.replace(model, vocab_size=4096)
    assert json.loads(missing.out)["memory"][0]["weights"] == 4 * parameter_counts(model)["total"]


def test_json_lines_named_json_are_records_and_bad_records_have_line_numbers(cli, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = [json.dumps({"text": f"record {i}: " + "lorem ipsum dolor sit amet " * 20}) for i in range(30)]
    (corpus / "records.json").write_text("\n".join(records[:10]) + "\n")
    (corpus / "more.jsonl").write_text("\n".join(records[10:20] + ["{not json", '{"title": "no text"}'] + records[20:]) + "\n")
    # A pretty-printed JSON document stays one text document.
    (corpus / "config.json").write_text(json.dumps({"text": "one document", "n": 1}, indent=2))
    out = tmp_path / "data"
    result = cli("preprocess", corpus, "--out", out, "--vocab-size", "300", "--val-fraction", "0.2")
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 31
    more = str(corpus / "more.jsonl")
    # Compared without whitespace: the console wraps long paths.
    err = "".join(result.err.split())
    assert f"{more}:11(notJSON)" in err and f"{more}:12(withouta'text'string)" in err
    assert {"path": more, "line": 12, "reason": "JSONL record without a 'text' string"} in manifest["skipped_files"]


def test_eval_scores_gzipped_text_like_the_plain_file(cli, tiny_checkpoint, tmp_path):
    text = "def main():\n    return sorted(range(10), key=lambda x: -x)\n" * 20
    plain, packed = tmp_path / "a.py", tmp_path / "a.py.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    scores = []
    for file in (plain, packed):
        result = cli("eval", tiny_checkpoint, "--text", file, "--json")
        assert result.code == 0, result.err
        scores.append(json.loads(result.out))
    assert scores[0]["bits_per_byte"] == scores[1]["bits_per_byte"] and scores[1]["bytes"] == len(text)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    result = cli("eval", tiny_checkpoint, "--text", tmp_path / "bad.gz")
    assert result.code == 2 and "not a readable gzip file" in result.err


def test_eval_of_a_data_folder_says_it_is_one(cli, tiny_data):
    result = cli("eval", tiny_data)
    assert result.code == 2 and "Traceback" not in result.err
    assert "is a data folder, not a model" in result.err and "corrupt" not in result.err


def test_a_small_validation_split_is_warned_about(cli, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.txt").write_text("alpha beta gamma delta\n" * 200)
    result = cli("preprocess", corpus, "--out", tmp_path / "data", "--vocab-size", "300")
    assert result.code == 0, result.err
    assert "validation split is small (1 document(s)" in " ".join(result.err.split())
    big = tmp_path / "big"
    big.mkdir()
    for i in range(200):
        (big / f"{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor sit amet consectetur " * 30)
    result = cli("preprocess", big, "--out", tmp_path / "big-data", "--vocab-size", "300", "--val-fraction", "0.1")
    assert result.code == 0, result.err
    assert "validation split is small" not in " ".join(result.err.split())


def test_include_and_exclude_globs_choose_the_files(cli, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "docs").mkdir(parents=True)
    (corpus / "tests").mkdir()
    for i in range(12):
        (corpus / "docs" / f"{i}.md").write_text(f"# note {i}\n" + "words about rivers and stones " * 40)
        (corpus / "docs" / f"{i}.log").write_text("DEBUG noise\n" * 50)
    (corpus / "tests" / "skip.md").write_text("should not be read " * 40)
    out = tmp_path / "data"
    result = cli("preprocess", corpus, "--out", out, "--vocab-size", "300", "--include", "*.md", "--exclude", "*/tests/*")
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(s["path"] for s in manifest["sources"]) == sorted(str(corpus / "docs" / f"{i}.md") for i in range(12))
    assert manifest["skipped"] == {"left out by --include/--exclude": 13}
    none = cli("preprocess", corpus, "--out", tmp_path / "none", "--include", "*.rst")
    assert none.code == 2 and "no input files found (25 left out by --include/--exclude)" in none.err
    assert not (tmp_path / "none").exists()

"""``hetlm preprocess`` on real files in temporary folders, with real SentencePiece."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

import hetlm.preprocess as pp
from hetlm.config import load_config
from hetlm.errors import UsageError
from hetlm.preprocess import (
    corpus_name,
    discover,
    dtype_for,
    preprocess,
    stdlib_root,
    tail_split,
)
from hetlm.reporting import Reporter
from hetlm.store import open_split, read_data_manifest
from hetlm.tokenizer import Tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def return class import self value index while for in if else").split()


def make_doc(rng: random.Random, lines: int = 30) -> str:
    out = []
    for _ in range(lines):
        indent = " " * (4 * rng.randrange(3)) + ("\t" if rng.random() < 0.1 else "")
        out.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 12))))
    return "\n".join(out) + ("\n" if rng.random() < 0.7 else "")


def make_docs(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"document {i}: héllo 世界 🙂\n" + make_doc(rng) for i in range(count)]


def write_files(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


def config(*overrides: str):
    return load_config(overrides=["data.vocab_size=400", "data.val_fraction=0.1", *overrides])


def documents_of(out: Path, split: str) -> list[str]:
    """Decode a split back into its documents, checking every one is framed as <s> ... </s>."""
    tokens = open_split(out, split)
    tokenizer = Tokenizer.load(out / "tokenizer.model")
    starts = np.flatnonzero(tokens == tokenizer.bos_id)
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    assert len(starts) == len(ends) and starts[0] == 0 and ends[-1] == len(tokens) - 1
    assert np.all(starts[1:] == ends[:-1] + 1)
    return [tokenizer.decode(tokens[s + 1:e]) for s, e in zip(starts, ends, strict=True)]


def test_outputs_are_lossless_disjoint_and_described(tmp_path):
    docs = make_docs(40)
    corpus = write_files(tmp_path / "corpus", docs)
    result = preprocess(config(), [str(corpus)], tmp_path / "out", workers=1)
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json", "tokenizer.model", "train.bin", "val.bin"]

    train, val = documents_of(out, "train"), documents_of(out, "val")
    assert sorted(train + val) == sorted(docs)
    assert val and not set(train) & set(val)

    manifest = read_data_manifest(out)
    assert manifest["format_version"] == 1 and manifest["dtype"] == "uint16"
    assert manifest["split"]["method"] == "hash"
    assert manifest["splits"]["val"]["documents"] == len(val)
    assert manifest["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in train)
    assert manifest["splits"]["train"]["tokens"] == len(open_split(out, "train"))
    tok = manifest["tokenizer"]
    assert tok["type"] == "bpe" and tok["vocab_size"] == 400 and tok["byte_fallback"] is True
    assert tok["sha256"] == Tokenizer.load(out / "tokenizer.model").sha256
    assert len(manifest["sources"]) == 40 and all(len(s["sha256"]) == 64 for s in manifest["sources"])
    assert set(manifest["timings"]) >= {"read_s", "tokenizer_s", "encode_s", "total_s"}
    assert load_config(out / "config.yaml").data.dir == str(out)


def test_split_is_by_content_not_order(tmp_path):
    docs = make_docs(60, seed=1)
    a = write_files(tmp_path / "a", docs)
    b = tmp_path / "b"
    b.mkdir()
    for i, doc in enumerate(reversed(docs)):
        (b / f"other-name-{i}.md").write_text(doc, encoding="utf-8")
    first = preprocess(config(), [str(a)], tmp_path / "out-a", workers=1).out
    second = preprocess(config(), [str(b)], tmp_path / "out-b", workers=1).out
    assert sorted(documents_of(first, "val")) == sorted(documents_of(second, "val"))
    other_seed = preprocess(config("data.seed=7"), [str(a)], tmp_path / "out-seed", workers=1).out
    assert sorted(documents_of(other_seed, "val")) != sorted(documents_of(first, "val"))


def test_same_inputs_give_byte_identical_outputs_with_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "CHUNK_CHARS", 2000)  # many small worker tasks
    corpus = write_files(tmp_path / "corpus", make_docs(50, seed=2))
    one = preprocess(config(), [str(corpus)], tmp_path / "one", workers=1).out
    two = preprocess(config(), [str(corpus)], tmp_path / "two", workers=2, parallel_min_bytes=0).out
    assert json.loads((two / "manifest.json").read_text())["workers"] == 2
    for name in ("tokenizer.model", "train.bin", "val.bin"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_few_documents_split_by_their_tail(tmp_path):
    text = "".join(make_docs(20, seed=3))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    out = preprocess(config(), [str(tmp_path / "book.txt")], tmp_path / "out", workers=1).out
    manifest = read_data_manifest(out)
    assert manifest["split"]["method"] == "tail"
    (head,), (tail,) = documents_of(out, "train"), documents_of(out, "val")
    assert head + tail == text
    assert 0.05 < len(tail) / len(text) < 0.15
    assert tail_split("abc\ndef\nghi\n", 0.5) == ("abc\ndef\n", "ghi\n")
    assert tail_split("x" * 100, 0.1) == ("x" * 90, "x" * 10)


def test_a_document_longer_than_a_segment_is_encoded_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "SEGMENT_CHARS", 500)
    docs = make_docs(12, seed=4)
    corpus = write_files(tmp_path / "corpus", docs)
    out = preprocess(config("data.val_fraction=0.2"), [str(corpus)], tmp_path / "out", workers=2,
                     parallel_min_bytes=0).out
    assert sorted(documents_of(out, "train") + documents_of(out, "val")) == sorted(docs)


def test_skips_binary_empty_non_utf8_and_counts_each_real_file_once(tmp_path):
    corpus = write_files(tmp_path / "corpus", make_docs(30, seed=5))
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (corpus / "link.txt").symlink_to(corpus / "doc000.txt")
    os.link(corpus / "doc002.txt", corpus / "hardlink.txt")
    (corpus / "loop").symlink_to(corpus)
    (corpus / "broken.txt").symlink_to(tmp_path / "nowhere")
    (corpus / ".hidden.txt").write_text("hidden files are not read")
    result = preprocess(config(), [str(corpus), str(corpus / "doc001.txt")], tmp_path / "out", workers=1)
    manifest = result.manifest
    assert manifest["skipped"] == {"binary": 1, "empty": 1, "not UTF-8": 1, "duplicate": 3, "broken symlink": 1}
    assert len(manifest["sources"]) == 30
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 30
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped_files"]}
    assert reasons["image.png"] == "binary" and reasons["latin1.txt"] == "not UTF-8"


def test_jsonl_and_gzip_inputs(tmp_path):
    docs = make_docs(40, seed=6)
    folder = tmp_path / "in"
    folder.mkdir()
    records = [json.dumps({"body": d, "id": i}) for i, d in enumerate(docs[:20])]
    records += ["not json {", json.dumps({"other": "x"}), json.dumps({"body": ""}), json.dumps(["a", "list"]), ""]
    (folder / "part1.jsonl").write_text("\ufeff" + "\n".join(records) + "\n", encoding="utf-8")
    with gzip.open(folder / "part2.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"body": d}) + "\n" for d in docs[20:30])
    for i, doc in enumerate(docs[30:]):
        (folder / f"plain{i}.txt.gz").write_bytes(gzip.compress(doc.encode("utf-8")))
    (folder / "broken.gz").write_bytes(b"\x1f\x8b\x08\x00 definitely not deflate")

    result = preprocess(config("data.text_field=body"), [str(folder)], tmp_path / "out", workers=1)
    out = result.out
    assert sorted(documents_of(out, "train") + documents_of(out, "val")) == sorted(docs)
    skipped = result.manifest["skipped"]
    assert skipped["JSONL record not JSON"] == 1
    assert skipped["JSONL record without a 'body' string"] == 2
    assert skipped["JSONL record with empty text"] == 1
    assert skipped["bad gzip"] == 1


def test_rerun_does_nothing_and_force_redoes(tmp_path, cli):
    corpus = write_files(tmp_path / "corpus", make_docs(30, seed=7))
    out = tmp_path / "out"
    args = ("preprocess", corpus, "--out", out, "--vocab-size", "400", "--val-fraction", "0.1", "--workers", "1")
    first = cli(*args)
    assert first.code == 0, first.err
    assert first.out.strip() == str(out)
    assert "documents" in first.err and "bytes/token" in first.err
    stamp = (out / "train.bin").stat().st_mtime_ns
    model = (out / "tokenizer.model").read_bytes()

    again = cli(*args)
    assert again.code == 0 and "up to date" in again.err
    assert (out / "train.bin").stat().st_mtime_ns == stamp

    forced = cli(*args, "--force")
    assert forced.code == 0 and "up to date" not in forced.err
    assert (out / "train.bin").stat().st_mtime_ns != stamp
    assert (out / "tokenizer.model").read_bytes() == model

    changed = cli(*args[:-4], "--val-fraction", "0.2", "--workers", "1")
    assert changed.code == 0 and "rebuilding" in changed.err
    assert read_data_manifest(out)["split"]["val_fraction"] == 0.2


def chinese_docs(chars: int, documents: int = 40, seed: int = 0) -> list[str]:
    """Text in 5,000 CJK characters with Zipf-like frequencies, in "words" of one to three characters."""
    rng = random.Random(seed)
    alphabet = [chr(0x4E00 + i) for i in rng.sample(range(20_000), 5000)]
    char_weights = list(itertools.accumulate(1 / (r + 1) ** 0.9 for r in range(len(alphabet))))
    words = ["".join(rng.choices(alphabet, cum_weights=char_weights, k=rng.choice((1, 2, 2, 3)))) for _ in range(20_000)]
    word_weights = list(itertools.accumulate(1 / (r + 1) for r in range(len(words))))
    return ["".join(w + (rng.choice("，。\n") if rng.random() < 0.08 else "")
                    for w in rng.choices(words, cum_weights=word_weights, k=chars // documents // 2))
            for _ in range(documents)]


def test_a_chinese_corpus_takes_any_vocabulary_size(tmp_path, cli):
    docs = chinese_docs(340_000)
    corpus = write_files(tmp_path / "corpus", docs)
    assert 900_000 < sum(len(d.encode()) for d in docs) < 1_200_000
    distinct = len(set("".join(docs)))
    assert distinct > 3000
    shares = {}
    for size in (1000, 2000):
        out = tmp_path / f"out-{size}"
        result = cli("preprocess", corpus, "--out", out, "--vocab-size", str(size), "--val-fraction", "0.1", "-j", "1")
        assert result.code == 0, result.err
        assert sorted(documents_of(out, "train") + documents_of(out, "val")) == sorted(docs)
        chars = read_data_manifest(out)["tokenizer"]["characters"]
        assert chars["distinct"] <= distinct and chars["own_pieces"] == (size - 260) * 3 // 4
        assert chars["own_pieces"] + chars["byte_fallback"] == chars["distinct"]
        shares[size] = chars["byte_fallback_share"]
        summary = " ".join(result.err.split())
        assert f"{chars['own_pieces']:,} of {chars['distinct']:,} have their own pieces" in summary
        assert f"{chars['byte_fallback']:,} fall back to bytes ({shares[size]:.2%}" in summary
    # More pieces for characters at the larger size: fewer of the corpus's characters fall back.
    assert 0 < shares[2000] < shares[1000] < 0.5


def test_cli_takes_config_and_set(tmp_path, cli):
    corpus = write_files(tmp_path / "corpus", make_docs(30, seed=8))
    config_file = tmp_path / "small.yaml"
    config_file.write_text("data:\n  vocab_size: 380\n  val_fraction: 0.2\n")
    result = cli("preprocess", corpus, "--config", config_file, "--set", "data.tokenizer=unigram", "--set",
                 f"data.dir={tmp_path / 'by-config'}", "--vocab-size", "360", "-j", "1")
    assert result.code == 0, result.err
    manifest = read_data_manifest(tmp_path / "by-config")
    assert manifest["tokenizer"]["type"] == "unigram" and manifest["tokenizer"]["vocab_size"] == 360
    assert manifest["split"]["val_fraction"] == 0.2


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = write_files(tmp_path / "good", make_docs(30, seed=9))
    binary = tmp_path / "binary"
    binary.mkdir()
    for i in range(3):
        (binary / f"blob{i}.bin").write_bytes(os.urandom(64) + b"\x00")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_bytes(b"")
    (tmp_path / "afile").write_text("x")
    return {
        "missing": ([str(tmp_path / "nope.txt")], "input not found"),
        "glob": ([str(tmp_path / "*.nothing")], "no files match"),
        "binary": ([str(binary)], "no usable text in the input (3 binary)"),
        "empty": ([str(empty)], "no usable text in the input (1 empty)"),
        "no files": ([str(tmp_path / "emptydir")], "no input files found"),
        "vocab": ([str(good), "--vocab-size", "60000", "--val-fraction", "0.1"], "--vocab-size 60000 is too large for this corpus"),
        "val zero": ([str(good), "--val-fraction", "0"], "val_fraction must be between 0 and 1"),
        "val one": ([str(good), "--val-fraction", "1.5"], "val_fraction must be between 0 and 1"),
        "out file": ([str(good), "--out", str(tmp_path / "afile")], "output path is a file"),
        "out under file": ([str(good), "--out", str(tmp_path / "afile" / "sub")], "is a file"),
        "tokenizer": ([str(good), "--tokenizer", "wordpiece"], "data.tokenizer must be 'bpe' or 'unigram'"),
    }


@pytest.mark.parametrize("case", ["missing", "glob", "binary", "empty", "no files", "vocab", "val zero", "val one",
                                  "out file", "out under file", "tokenizer"])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, cli, monkeypatch, case):
    (tmp_path / "emptydir").mkdir()
    args, message = _bad_inputs(tmp_path)[case]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    if "--out" not in args:
        args += ["--out", str(tmp_path / "data" / "out")]
    result = cli("preprocess", *args)
    assert result.code == 2
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_unwritable_output_folder(tmp_path, cli):
    corpus = write_files(tmp_path / "corpus", make_docs(30))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = cli("preprocess", corpus, "--out", locked / "data")
    finally:
        locked.chmod(0o700)
    assert result.code == 2 and "cannot write to" in result.err
    assert not (locked / "data").exists()


class _InterruptAt(Reporter):
    def __init__(self, task: str) -> None:
        self.task = task

    def advance(self, task: str, amount: float = 1.0) -> None:
        if task == self.task:
            raise KeyboardInterrupt


@pytest.mark.parametrize("task", ["read", "tokenizer", "encode"])
def test_interrupt_leaves_no_manifest_and_no_partial_output(tmp_path, task):
    corpus = write_files(tmp_path / "corpus", make_docs(30, seed=10))
    out = tmp_path / "data" / "out"
    with pytest.raises(KeyboardInterrupt):
        preprocess(config(), [str(corpus)], out, workers=1, reporter=_InterruptAt(task))
    assert not (tmp_path / "data").exists()
    # A folder that exists already is kept, but holds no manifest and no temporary files.
    out.mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        preprocess(config(), [str(corpus)], out, workers=2, parallel_min_bytes=0, reporter=_InterruptAt(task))
    assert list(out.iterdir()) == []
    assert preprocess(config(), [str(corpus)], out, workers=1).up_to_date is False


def test_output_folder_inside_the_input_folder_is_not_read(tmp_path, monkeypatch):
    write_files(tmp_path, make_docs(30, seed=11))
    monkeypatch.chdir(tmp_path)
    first = preprocess(config(), ["."], workers=1)
    assert first.out == Path("data") / tmp_path.name
    again = preprocess(config(), ["."], workers=1, force=True)
    assert again.manifest["skipped"] == {} and len(again.manifest["sources"]) == 30


def test_globs_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_files(tmp_path / "src" / "pkg", make_docs(3))
    (tmp_path / "src" / "top.md").write_text("# top\n")
    found = discover(["src/**/*.txt"]).sources
    assert [p.path.name for p in found] == ["doc000.txt", "doc001.txt", "doc002.txt"]
    everything = discover(["src/**", "src"])
    assert len(everything.sources) == 4 and not everything.skipped
    assert corpus_name(["src/**/*.txt"]) == "src"
    assert corpus_name(["books.jsonl.gz"]) == "books"
    assert corpus_name(["notes/"]) == "notes"
    assert corpus_name(["*.txt"]) == tmp_path.name
    assert corpus_name([]) == "python-stdlib"


def test_builtin_corpus_is_the_stdlib_without_tests():
    sources = discover([]).sources
    root = stdlib_root()
    paths = [s.path.relative_to(root) for s in sources]
    assert Path("os.py") in paths and Path("json/__init__.py") in paths
    assert all(p.suffix in (".py", ".rst", ".txt") for p in paths)
    excluded = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not any(excluded & set(p.parts) for p in paths)
    assert 5_000_000 < sum(s.size for s in sources) < 100_000_000


def test_reading_a_data_folder(tmp_path, tiny_data):
    with pytest.raises(UsageError, match="data folder .* not found"):
        read_data_manifest(tmp_path / "missing")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(UsageError, match="has no manifest.json"):
        read_data_manifest(tmp_path / "unfinished")
    manifest = read_data_manifest(tiny_data)
    assert manifest["tokenizer"]["vocab_size"] == 512
    val = open_split(tiny_data, "val")
    assert val.dtype == np.uint16 and len(val) == manifest["splits"]["val"]["tokens"] > 1000
    assert int(val[0]) == 1 and int(val[-1]) == 2
    with pytest.raises(UsageError, match="unknown split"):
        open_split(tiny_data, "test")
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, a folder nobody can write to")
def test_output_folder_that_cannot_be_written(tmp_path, cli):
    corpus = write_files(tmp_path / "corpus", make_docs(30))
    result = cli("preprocess", corpus, "--out", "/proc/hetlm-test/data")
    assert result.code == 2 and "cannot write to /proc" in result.err

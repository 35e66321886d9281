"""The lossless SentencePiece tokenizer: real training, real round trips."""

from __future__ import annotations

import itertools
import random

import pytest

from hetlm.errors import UsageError
from hetlm.preprocess import stdlib_root
from hetlm.tokenizer import MIN_VOCAB_SIZE, Tokenizer, encode_batch, train_tokenizer, training_sentences

ADVERSARIAL = [
    "def f(x):\n    if x:\n        return 1\n\treturn 2\n",
    "    leading spaces",
    "trailing spaces   \n   \n",
    "a  b   c    d\t\te\t \tf",
    "\n\n\n\nempty lines\n\n",
    "windows\r\nline\r\nends\r\n",
    "中文文本，日本語のテキスト，한국어 텍스트",
    "emoji 😀🎉👩‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽",
    "combining é vs é, ligature ﬁ, fullwidth Ａ, NBSP\u00a0here, zero-width\u200bjoiner",
    "unseen: ᚠᛇᚻ ⠁⠃⠉ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd \ue000",
    "control <s> </s> <pad> <unk> literal pieces",
    "▁ U+2581, the character SentencePiece uses for spaces: ▁▁ x▁y ▁",
    "nul\x00and\x07bell\x1b[0m",
    " ",
    "",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    files = sorted(stdlib_root().glob("*.py"))[:12]
    return "".join(path.read_text(encoding="utf-8") for path in files)


@pytest.fixture(scope="module")
def tokenizer(corpus) -> Tokenizer:
    return train_tokenizer(training_sentences(corpus), 400)


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_round_trip_is_lossless(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_id not in ids


def test_unseen_characters_fall_back_to_bytes(tokenizer):
    ids = tokenizer.encode("ᚠ")
    assert [tokenizer.id_to_piece(i) for i in ids] == ["<0xE1>", "<0x9A>", "<0xA0>"]


def test_a_single_10mb_line_round_trips(tokenizer, corpus):
    line = corpus.replace("\n", " ")
    text = (line * (10_000_000 // len(line) + 1))[:10_000_000] + "末尾🙂"
    assert "\n" not in text
    ids = tokenizer.encode(text)
    assert len(ids) < 0.8 * len(text)
    assert tokenizer.decode(ids) == text


def test_specials_and_ids(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tokenizer.vocab_size == 400
    ids = tokenizer.encode("hello world")
    assert ids and ids[0] != tokenizer.bos_id and ids[-1] != tokenizer.eos_id
    # Special-token text in the input is plain text, never a control id.
    assert not {1, 2, 3} & set(tokenizer.encode("<s>x</s><pad>"))
    assert encode_batch(tokenizer.processor, ["a b", "c"], num_threads=2) == [tokenizer.encode("a b"), tokenizer.encode("c")]


def test_training_is_byte_identical(corpus, tokenizer):
    again = train_tokenizer(training_sentences(corpus), 400)
    assert again.model_proto == tokenizer.model_proto
    assert again.sha256 == tokenizer.sha256
    other = train_tokenizer(training_sentences(corpus), 420)
    assert other.sha256 != tokenizer.sha256


def test_save_and_load(tmp_path, tokenizer):
    path = tmp_path / "tokenizer.model"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == tokenizer.sha256 and loaded.path == path
    assert loaded.encode("def main():\n\tpass") == tokenizer.encode("def main():\n\tpass")


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(UsageError, match="not a SentencePiece model"):
        Tokenizer.load(bad)


def test_vocabulary_too_large_for_the_text():
    with pytest.raises(UsageError, match=r"--vocab-size 5000 is too large for this corpus \(it supports at most \d+\)"):
        train_tokenizer(["just a few words of text\n"] * 3, 5000)


def test_unigram_is_lossless_too(corpus):
    tok = train_tokenizer(training_sentences(corpus[:60_000]), 400, "unigram")
    for text in ADVERSARIAL:
        assert tok.decode(tok.encode(text)) == text


def test_training_sentences_keep_every_character():
    text = "line one\nline two\n" + "x" * 50_000 + "\nend"
    sentences = list(training_sentences(text, max_bytes=4096))
    assert "".join(sentences) == text
    assert all(len(s.encode()) <= 4096 for s in sentences)
    assert sentences[0].endswith("\n")


def test_more_distinct_characters_than_the_vocabulary_holds_fall_back_to_bytes():
    common = "".join(chr(0x4E00 + i) for i in range(100))
    rare = "".join(chr(0x5E00 + i) for i in range(500))
    text = (common + "\n") * 2000 + rare
    tok = train_tokenizer(training_sentences(text), 400)
    assert tok.settings["character_coverage"] < 1.0
    assert tok.decode(tok.encode(rare)) == rare
    assert tok.decode(tok.encode(common)) == common
    # The frequent characters have pieces (and merges). Of the rare ones, which are needed for a coverage of
    # 0.9995, those that fit in 3/4 of the 140 pieces left after bytes and specials have pieces too (the
    # first in code point order, as SentencePiece breaks ties); the rest are bytes.
    assert len(tok.encode(common)) < len(common)
    assert [tok.id_to_piece(i) for i in tok.encode(rare[3])] == [rare[3]]
    assert [tok.id_to_piece(i) for i in tok.encode(rare[4])] == ["<0xE5>", "<0xB8>", "<0x84>"]
    assert tok.settings["characters"] == {"distinct": 601, "own_pieces": 105, "byte_fallback": 496,
                                          "byte_fallback_share": round(496 / len(text), 6)}


def zipf_text(chars: int, distinct: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    alphabet = [chr(0x4E00 + i) for i in range(distinct)]
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(distinct)))
    lines = ("".join(rng.choices(alphabet, cum_weights=weights, k=rng.randint(10, 60))) for _ in itertools.count())
    text = ""
    while len(text) < chars:
        text += next(lines) + "。\n"
    return text


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_any_vocabulary_size_from_the_smallest(model_type):
    text = zipf_text(20_000, 3000)
    assert len(set(text)) > 1000
    for size in (MIN_VOCAB_SIZE, 300, 700):
        tok = train_tokenizer(training_sentences(text), size, model_type)
        assert tok.vocab_size == size and tok.model_type == model_type
        assert tok.decode(tok.encode(text)) == text
        report = tok.settings["characters"]
        # The characters take at most 3/4 of the pieces left after bytes and specials, the most frequent first.
        assert report["own_pieces"] == max(1, (size - MIN_VOCAB_SIZE + 1) * 3 // 4)
        assert report["distinct"] == len(set(text))
        owned = [c for c in set(text) if tok.piece_to_id(c) != tok.unk_id]
        counts = {c: text.count(c) for c in set(text)}
        assert min(counts[c] for c in owned) >= max(counts[c] for c in set(text) - set(owned))
    with pytest.raises(UsageError, match=f"too small: the smallest that works is {MIN_VOCAB_SIZE}"):
        train_tokenizer(training_sentences(text), MIN_VOCAB_SIZE - 1, model_type)


def test_characters_that_fit_all_get_pieces(corpus, tokenizer):
    report = tokenizer.settings["characters"]
    assert report["own_pieces"] == report["distinct"] == len(set(corpus)) and report["byte_fallback"] == 0
    assert tokenizer.settings["character_coverage"] == 1.0


def test_model_type_is_read_from_the_model_file(tokenizer, corpus):
    from sentencepiece import sentencepiece_model_pb2

    unigram = train_tokenizer(training_sentences(corpus[:30_000]), 300, "unigram")
    for tok, expected in ((tokenizer, "bpe"), (unigram, "unigram")):
        loaded = Tokenizer(tok.model_proto)
        proto = sentencepiece_model_pb2.ModelProto.FromString(tok.model_proto)
        assert loaded.model_type == expected
        assert sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower() == expected

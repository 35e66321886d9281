"""A lossless SentencePiece tokenizer: ``decode(encode(text)) == text`` for any UTF-8 text.

SentencePiece's defaults normalise text (NFKC), fold runs of whitespace and map rare characters to
``<unk>``; that loses code indentation and anything unseen in training. The settings in
``LOSSLESS_SETTINGS`` keep every character: identity normalisation, no whitespace folding, no
dummy prefix (also what Hugging Face's LlamaTokenizer needs to give the same ids), and byte
fallback so an unseen character becomes its UTF-8 bytes instead of ``<unk>``.

Byte fallback also makes any vocabulary size work: the vocabulary needs room only for the 256 byte
pieces and the special tokens. When a text has more distinct characters than fit (CJK, say), the most
frequent ones get their own pieces and the rest are spelled in bytes (see ``train_tokenizer``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm

from hetlm.errors import UsageError
from hetlm.io import atomic_write_bytes

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
SPECIAL_IDS = {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID}
MODEL_TYPES = ("bpe", "unigram")
BYTE_PIECES = 256
# The byte pieces, the four special tokens, and one character: SentencePiece trains no model without one.
MIN_VOCAB_SIZE = BYTE_PIECES + len(SPECIAL_PIECES) + 1
# When a text's characters do not all fit in this share of the pieces left after bytes and specials, only
# the most frequent do, so merges keep the rest. On a Chinese corpus at vocabularies 1000-4096, shares
# 0.7-0.8 gave the fewest tokens of 0.25-0.9 (README, bench/bytes_per_token.py).
CHARACTER_SHARE = 0.75
# What SentencePiece's authors recommend for rich character sets (CJK): characters beyond it are so rare
# that merges do more with their pieces.
RICH_COVERAGE = 0.9995

LOSSLESS_SETTINGS: dict[str, Any] = {
    "byte_fallback": True,
    "character_coverage": 1.0,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": False,
}
# Training sentences are cut below this many bytes, so SentencePiece never drops one as too long.
MAX_SENTENCE_BYTES = 1 << 16
_META = "\u2581"
# The thread count is stored inside the model file and changes unigram scores, so it is fixed:
# the same corpus gives a byte-identical model on every machine.
TRAINER_THREADS = 4

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
# ModelProto.trainer_spec (field 2) holds TrainerSpec.model_type (field 3); its enum's names by number.
_PROTO_TRAINER_SPEC, _PROTO_MODEL_TYPE = 2, 3
_PROTO_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


class Tokenizer:
    """A trained SentencePiece model with the ids hetlm relies on: unk 0, bos 1, eos 2, pad 3."""

    def __init__(self, model_proto: bytes, path: Path | None = None, settings: dict[str, Any] | None = None) -> None:
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as exc:
            where = f"{path}: " if path else ""
            raise UsageError(f"{where}not a SentencePiece model ({exc})") from None
        self.path = path
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self.model_proto = model_proto
        # How it was trained, when this process trained it (the manifest keeps them).
        self.settings = settings or {}

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"tokenizer not found: {path} (run `hetlm preprocess` first)")
        return cls(path.read_bytes(), path)

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    @functools.cached_property
    def model_type(self) -> str:
        """The SentencePiece algorithm the model was trained with ("bpe", "unigram"), read from the model file."""
        for field, value in _proto_fields(self.model_proto):
            if field == _PROTO_TRAINER_SPEC:
                for inner, kind in _proto_fields(value):
                    if inner == _PROTO_MODEL_TYPE:
                        return _PROTO_MODEL_TYPES.get(kind, f"type {kind}")
                break
        # TrainerSpec's default, which protobuf leaves out of the file.
        return "unigram"

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS or EOS."""
        return encode_batch(self.processor, [text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.Decode([int(i) for i in ids])

    @functools.cached_property
    def plain_texts(self) -> tuple[str | None, ...]:
        """Per id, the text it adds to any complete text: "" for control pieces (<s>, </s>, <pad> decode
        to nothing), None for byte pieces (they combine into characters) and unknown ones. Lets
        streaming skip a decode per token."""
        p = self.processor
        texts: list[str | None] = []
        for i in range(p.GetPieceSize()):
            text = None
            if p.IsControl(i) and p.Decode([i]) == "":
                text = ""
            elif not (p.IsControl(i) or p.IsUnknown(i) or p.IsByte(i) or p.IsUnused(i)):
                text = p.IdToPiece(i).replace(_META, " ")
                if p.Decode([i]) != text:
                    text = None
            texts.append(text)
        return tuple(texts)

    def id_to_piece(self, token_id: int) -> str:
        return self.processor.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self.processor.PieceToId(piece)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self.model_proto)
        self.path = Path(path)


def _proto_fields(message: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of each field of a serialized protobuf message: ints for varints, bytes otherwise.

    Enough to read the model type without the protobuf package, which sentencepiece's own reader needs.
    """
    position = 0
    while position < len(message):
        key, position = _varint(message, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(message, position)
        elif wire == 2:
            size, position = _varint(message, position)
            value, position = message[position:position + size], position + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, position = message[position:position + width], position + width
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by SentencePiece models")
        yield field, value


def _varint(message: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = message[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def encode_batch(processor: spm.SentencePieceProcessor, texts: list[str], num_threads: int = 1) -> list[list[int]]:
    """Ids for each text, lossless even for U+2581.

    SentencePiece writes spaces as U+2581 ("▁") inside pieces, so a literal U+2581 in the text would
    decode as a space. Such characters are encoded as their three UTF-8 byte pieces instead, which
    decode back to U+2581 (in Hugging Face's LlamaTokenizer too).
    """
    encoded = processor.Encode(texts, add_bos=False, add_eos=False, num_threads=num_threads)
    for index, text in enumerate(texts):
        if _META in text:
            meta = [processor.PieceToId(f"<0x{b:02X}>") for b in _META.encode("utf-8")]
            parts = processor.Encode(text.split(_META), add_bos=False, add_eos=False, num_threads=1)
            ids = parts[0]
            for part in parts[1:]:
                ids += meta
                ids += part
            encoded[index] = ids
    return encoded


def training_sentences(text: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterable[str]:
    """Cut ``text`` into training sentences of whole lines (newlines kept) of at most ``max_bytes``.

    Multi-line sentences let SentencePiece learn pieces such as ``":\\n"``; a line longer than the
    limit is cut inside, at a character boundary.
    """
    limit = max_bytes // 4  # characters: a UTF-8 character takes at most 4 bytes
    start, size = 0, len(text)
    while start < size:
        end = min(start + limit, size)
        if end < size:
            newline = text.rfind("\n", start, end)
            if newline >= start:
                end = newline + 1
        yield text[start:end]
        start = end


def train_tokenizer(sentences: Iterable[str] | Callable[[], Iterable[str]], vocab_size: int,
                    model_type: str = "bpe") -> Tokenizer:
    """Train a lossless tokenizer in memory; the same sentences give a byte-identical model.

    ``sentences`` is a collection, or a function returning a fresh iterator over them (a corpus
    reader then streams into SentencePiece without a copy in Python). Every character of the sample
    gets its own piece when all of them fit in ``CHARACTER_SHARE`` of the pieces left after bytes and
    specials; that takes one pass. Otherwise (CJK, or a tiny vocabulary) the sample is read again and
    only the most frequent characters get pieces: those covering ``RICH_COVERAGE`` of the sample, at
    most that share. The training text is cut at every other character, so no merge spans one; at
    encoding time they fall back to their UTF-8 bytes, which is just as lossless.

    ``settings["characters"]`` counts the sample's distinct characters with and without their own
    pieces; ``settings["character_coverage"]`` is the share of the sample's characters that have one.
    """
    if model_type not in MODEL_TYPES:
        raise UsageError(f"unknown tokenizer type {model_type!r}: use bpe or unigram")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(f"--vocab-size {vocab_size} is too small: the smallest that works is {MIN_VOCAB_SIZE} "
                         f"({BYTE_PIECES} byte pieces, {len(SPECIAL_PIECES)} special tokens and one character)")
    if not callable(sentences):
        sample = list(sentences)
        sentences = lambda: iter(sample)  # noqa: E731
    settings = {"type": model_type, "vocab_size": vocab_size, **LOSSLESS_SETTINGS}
    room = max(1, int((vocab_size - MIN_VOCAB_SIZE + 1) * CHARACTER_SHARE))
    counter = _CharacterCounter(room)
    try:
        proto = _train(counter.count(sentences()), settings)
    except UsageError:
        if not counter.overflowed:
            raise
        proto = _train(_split_at_others(sentences(), counter.most_frequent(room, RICH_COVERAGE)), settings)
    tokenizer = Tokenizer(proto)
    tokenizer.settings = {**settings, **_character_report(tokenizer, counter.counts)}
    return tokenizer


class _CharacterCounter:
    """Counts the characters of the sentences streaming into SentencePiece; when there are more distinct
    ones than ``limit``, ends the stream with an error, so the training stops before it starts."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: Counter[str] = Counter()
        self.overflowed = False

    def count(self, sentences: Iterable[str]) -> Iterator[str]:
        for sentence in sentences:
            self.counts.update(sentence)
            yield sentence
        # SentencePiece skips NUL characters; they can never have a piece.
        self.counts.pop("\x00", None)
        if len(self.counts) > self.limit:
            self.overflowed = True
            raise OverflowError(f"{len(self.counts)} distinct characters, room for {self.limit}")

    def most_frequent(self, limit: int, coverage: float) -> set[str]:
        """The fewest most frequent characters (ties in code point order, as SentencePiece orders them)
        that cover ``coverage`` of the sample, at most ``limit`` of them."""
        target = coverage * sum(self.counts.values())
        kept: set[str] = set()
        covered = 0
        for char, count in sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))[:limit]:
            if covered >= target:
                break
            kept.add(char)
            covered += count
        return kept


def _split_at_others(sentences: Iterable[str], kept: set[str]) -> Iterator[str]:
    """The parts of each sentence between characters outside ``kept``."""
    others = re.compile("[^" + "".join(re.escape(char) for char in sorted(kept)) + "]+")
    for sentence in sentences:
        yield from others.split(sentence)


def _character_report(tokenizer: Tokenizer, counts: Counter[str]) -> dict[str, Any]:
    """How the sample's characters came out: with a piece of their own, or spelled in bytes."""
    spaced = {" ": _META}
    fallback = [char for char in counts if tokenizer.piece_to_id(spaced.get(char, char)) == tokenizer.unk_id]
    total = sum(counts.values())
    fallback_share = sum(counts[char] for char in fallback) / total if total else 0.0
    return {
        "character_coverage": round(1.0 - fallback_share, 6),
        "characters": {"distinct": len(counts), "own_pieces": len(counts) - len(fallback),
                       "byte_fallback": len(fallback), "byte_fallback_share": round(fallback_share, 6)},
    }


def _train(sentences: Iterable[str], settings: dict[str, Any]) -> bytes:
    # The model goes to memory, not to a prefix on disk: a path would be stored inside the file.
    writer = io.BytesIO()
    options = {k: v for k, v in settings.items() if k not in ("type", "vocab_size")}
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=(s for s in sentences if s),
            model_writer=writer,
            model_type=settings["type"],
            vocab_size=settings["vocab_size"],
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_piece=SPECIAL_PIECES["unk"],
            bos_piece=SPECIAL_PIECES["bos"],
            eos_piece=SPECIAL_PIECES["eos"],
            pad_piece=SPECIAL_PIECES["pad"],
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=TRAINER_THREADS,
            minloglevel=2,
            **options,
        )
    except RuntimeError as exc:
        raise _training_error(str(exc), settings["vocab_size"]) from None
    return writer.getvalue()


def _training_error(message: str, vocab_size: int) -> UsageError:
    if match := _TOO_HIGH.search(message):
        fits = int(match.group(2))
        return UsageError(
            f"--vocab-size {vocab_size} is too large for this corpus (it supports at most {fits}): "
            f"use --vocab-size {fits} or less, or add more text"
        )
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return UsageError(f"tokenizer training failed: {first}")


def check_special_ids(tokenizer: Tokenizer, where: str) -> None:
    """UsageError unless ``tokenizer`` has hetlm's special pieces at hetlm's ids (unk 0, bos 1, eos 2, pad 3)."""
    wrong = [f"{SPECIAL_PIECES[name]} is {tokenizer.piece_to_id(SPECIAL_PIECES[name])}, not {i}"
             for name, i in SPECIAL_IDS.items() if tokenizer.piece_to_id(SPECIAL_PIECES[name]) != i
             or tokenizer.id_to_piece(i) != SPECIAL_PIECES[name]] if tokenizer.vocab_size > PAD_ID else ["too few pieces"]
    if wrong:
        raise UsageError(f"{where}: hetlm's data format needs <unk>, <s>, </s> and <pad> at ids 0-3 ({'; '.join(wrong)})")


def tokenizer_settings(tokenizer: Tokenizer) -> dict[str, Any]:
    """What the manifest records about how the tokenizer was trained."""
    return {
        **tokenizer.settings,
        "vocab_size": tokenizer.vocab_size,
        "special_tokens": {SPECIAL_PIECES[name]: i for name, i in SPECIAL_IDS.items()},
        "max_sentence_bytes": MAX_SENTENCE_BYTES,
        "trainer_threads": TRAINER_THREADS,
        "sentencepiece_version": spm.__version__,
    }

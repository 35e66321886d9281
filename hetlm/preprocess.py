"""``hetlm preprocess``: text files in, a lossless tokenizer and token streams out.

The corpus is read three times and never held in memory: a scan counts documents and decides the
train/val split, a second pass draws a bounded sample of the train split for the tokenizer, and a
third encodes every document in worker processes and streams the tokens to disk.

Output folder: ``tokenizer.model``, ``train.bin`` and ``val.bin`` (little-endian uint16 or uint32
token ids; every document is ``<s>`` + ids + ``</s>``), for chat data (``data.chat``: every document a
conversation) ``train.mask.bin`` and ``val.mask.bin`` (a byte per token, 1 for the assistant replies that
training learns), ``config.yaml`` and, written last, ``manifest.json``. A folder without a manifest is
unfinished and is rebuilt by the next run. The files are made in a ``.preprocess-*.tmp`` folder inside it,
under the folder's lock (``.hetlm.lock``), which also lets a run remove what an interrupted one left there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import stat
import struct
import sys
import sysconfig
import tempfile
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from hetlm import __version__
from hetlm.chat import CHAT_ROLES, chat_pieces
from hetlm.config import TOKENIZERS, Config, DataConfig, save_config
from hetlm.errors import HetlmError, UsageError
from hetlm.io import FileLock, atomic_path, clean_up, disk_full_message, fsync_dir, no_space_errno, sha256_file
from hetlm.planner import detect_inventory, make_plan
from hetlm.reporting import NullReporter, Reporter
from hetlm.store import (
    CONFIG,
    DATA_FORMAT_VERSION,
    LOCK,
    MANIFEST,
    SPLITS,
    TOKENIZER,
    finished_data_manifest,
    mask_file_name,
    split_file_name,
)
from hetlm.tokenizer import (
    BOS_ID,
    EOS_ID,
    Tokenizer,
    check_special_ids,
    encode_batch,
    tokenizer_settings,
    train_tokenizer,
    training_sentences,
)

BUILTIN_CORPUS = "python-stdlib"
TRAIN, VAL = 0, 1

JSONL_SUFFIXES = (".jsonl", ".ndjson")
HTML_SUFFIXES = (".html", ".htm")
# Elements whose content a browser does not show as text.
HTML_HIDDEN = frozenset({"head", "script", "style", "template", "noscript"})
# Elements that set their text apart by a blank line, and those that start a new line.
HTML_PARAGRAPHS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "ul", "ol",
                             "dl", "section", "article", "header", "footer", "figure", "hr"})
HTML_BLOCKS = frozenset({"br", "div", "li", "tr", "dt", "dd", "main", "nav", "aside", "form", "caption", "title"})
STDLIB_SUFFIXES = (".py", ".rst", ".txt")
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# A NUL byte in the first block marks a binary file; UTF-8 text practically never holds one.
SNIFF_BYTES = 8192
# A document longer than this (characters) is encoded in pieces cut at line ends, so one huge file
# still spreads over every worker. Each worker task carries about CHUNK_CHARS characters.
SEGMENT_CHARS = 1 << 20
CHUNK_CHARS = 1 << 20
# Below this many bytes, starting worker processes costs more than it saves.
PARALLEL_MIN_BYTES = 4 << 20
# In tail mode the val part starts at a line start if one lies this close after the cut.
TAIL_LINE_SEARCH = 4096
MAX_LISTED_SKIPS = 1000
# Below this many validation tokens (or with one held-out document) the val loss is too noisy to trust.
SMALL_VAL_TOKENS = 1000

# Segment flags: the segment starts a document (<s> before it), ends one (</s> after it), is learned (chat replies).
_BOS, _EOS, _LEARN = 1, 2, 4


def default_preprocess_workers(config: Config) -> int:
    """Worker processes when none are given: the device planner's choice (every usable CPU)."""
    return make_plan(detect_inventory(), config, workload="preprocess").preprocess_workers


# --------------------------------------------------------------------------- inputs


@dataclass
class Source:
    path: Path
    kind: str  # "text" or "jsonl"
    gz: bool
    size: int
    mtime_ns: int


@dataclass
class Inventory:
    sources: list[Source] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_files: list[dict[str, str]] = field(default_factory=list)

    def skip(self, path: Path | str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_files) < MAX_LISTED_SKIPS:
            self.skipped_files.append({"path": str(path), "reason": reason})


def _source_kind(name: str) -> tuple[str, bool]:
    lower = name.lower()
    gz = lower.endswith(".gz")
    if gz:
        lower = lower[:-3]
    return ("jsonl" if lower.endswith(JSONL_SUFFIXES) else "text"), gz


class _Discovery:
    """Collects regular files from paths, folders and globs; each real file once, no link loops."""

    def __init__(self, exclude_dir: Path | None, suffixes: tuple[str, ...] | None = None,
                 excluded_dirs: frozenset[str] = frozenset(), include: Sequence[str] = (),
                 exclude: Sequence[str] = ()) -> None:
        self.inventory = Inventory()
        self.include, self.exclude = tuple(include), tuple(exclude)
        # (device, inode) -> the path it was first read under.
        self.seen_files: dict[tuple[int, int], str] = {}
        self.seen_dirs: set[tuple[int, int]] = set()
        self.suffixes = suffixes
        self.excluded_dirs = excluded_dirs
        if exclude_dir is not None and exclude_dir.is_dir():
            # The output folder may sit inside an input folder; its own files are not input.
            st = exclude_dir.stat()
            self.seen_dirs.add((st.st_dev, st.st_ino))

    def add_input(self, raw: str) -> None:
        if glob.has_magic(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                raise UsageError(f"no files match {raw!r}")
        else:
            if not os.path.exists(raw):
                raise UsageError(f"input not found: {raw}")
            matches = [raw]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                self.walk(path)
            else:
                self.add_file(path)

    def walk(self, root: Path) -> None:
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = folder.stat()
                key = (st.st_dev, st.st_ino)
                if key in self.seen_dirs:
                    if folder.is_symlink():
                        self.inventory.skip(folder, "duplicate")
                    continue
                self.seen_dirs.add(key)
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                self.inventory.skip(folder, "unreadable")
                continue
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = Path(entry.path)
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    if entry.name not in self.excluded_dirs:
                        subfolders.append(path)
                elif self.suffixes is None or entry.name.endswith(self.suffixes):
                    self.add_file(path)
            # Reversed so the stack pops folders in sorted order.
            stack.extend(reversed(subfolders))

    def _filtered_out(self, path: Path) -> bool:
        def matches(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatch(path.name, p) or fnmatch.fnmatch(path.as_posix(), p) for p in patterns)

        return (bool(self.include) and not matches(self.include)) or matches(self.exclude)

    def add_file(self, path: Path) -> None:
        if self._filtered_out(path):
            # Counted, not listed: a filter may leave out most of a tree.
            self.inventory.skipped["left out by --include/--exclude"] += 1
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            self.inventory.skip(path, "broken symlink")
            return
        except OSError:
            self.inventory.skip(path, "unreadable")
            return
        if not stat.S_ISREG(st.st_mode):
            self.inventory.skip(path, "not a regular file")
            return
        key = (st.st_dev, st.st_ino)
        if key in self.seen_files:
            # The same path met twice (a file inside a folder also given, or matched by "**") is no
            # news; another name for the same file (a symlink or hard link) is counted.
            if self.seen_files[key] != os.path.abspath(path):
                self.inventory.skip(path, "duplicate")
            return
        self.seen_files[key] = os.path.abspath(path)
        kind, gz = _source_kind(path.name)
        self.inventory.sources.append(Source(path, kind, gz, st.st_size, st.st_mtime_ns))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def discover(inputs: Sequence[str], exclude_dir: Path | None = None, include: Sequence[str] = (),
             exclude: Sequence[str] = ()) -> Inventory:
    """Every input file, in a stable order; no inputs means the built-in ``python-stdlib`` corpus.

    With ``include`` only files matching one of those globs are taken, and files matching an ``exclude`` glob
    never are; a glob matches a file's name or its whole path (``*`` crosses folders there).
    """
    if not inputs:
        finder = _Discovery(exclude_dir, STDLIB_SUFFIXES, STDLIB_EXCLUDED_DIRS, include, exclude)
        finder.walk(stdlib_root())
        return finder.inventory
    finder = _Discovery(exclude_dir, include=include, exclude=exclude)
    for raw in inputs:
        finder.add_input(str(raw))
    return finder.inventory


def corpus_name(inputs: Sequence[str]) -> str:
    """Folder name under data/: the first input's name without extensions, or ``python-stdlib``."""
    if not inputs:
        return BUILTIN_CORPUS
    parts = []
    for part in Path(str(inputs[0])).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    path = Path(*parts) if parts else Path.cwd()
    name = path.name if path.name not in ("", ".", "..") else path.resolve().name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    if "." in name.lstrip("."):
        name = name[: name.rfind(".")]
    name = re.sub(r"[^\w.-]+", "-", name).strip(".-")
    return name or "corpus"


def resolve_out_dir(data: DataConfig, inputs: Sequence[str], out: str | Path | None = None) -> Path:
    """--out wins; then data.dir when the config changed it; else data/<corpus name>."""
    if out is not None:
        return Path(out)
    if data.dir != DataConfig().dir:
        return Path(data.dir)
    return Path("data") / corpus_name(inputs)


# --------------------------------------------------------------------------- documents


class _SkipFile(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _open(source: Source):
    return gzip.open(source.path, "rb") if source.gz else open(source.path, "rb")


_READ_ERRORS = (OSError, EOFError, zlib.error)


def _read_error_reason(exc: BaseException, source: Source) -> str:
    if isinstance(exc, PermissionError):
        return "unreadable"
    if source.gz and isinstance(exc, (gzip.BadGzipFile, EOFError, zlib.error)):
        return "bad gzip"
    return "unreadable"


def _text_document(source: Source) -> tuple[str, bytes]:
    try:
        with _open(source) as handle:
            data = handle.read()
    except _READ_ERRORS as exc:
        raise _SkipFile(_read_error_reason(exc, source)) from None
    if not data:
        raise _SkipFile("empty")
    if b"\0" in data[:SNIFF_BYTES]:
        raise _SkipFile("binary")
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        raise _SkipFile("not UTF-8") from None


# A document: its text, the text's UTF-8 bytes and, for a chat conversation, its (text, is_reply) pieces.
Document = tuple[str, bytes, list[tuple[str, bool]] | None]
# What a JSONL record becomes: (why it is skipped, None) or (None, its document).
RecordParser = Callable[[Any], tuple[str | None, Document | None]]


def _utf8(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
        return None


def _text_record(text_field: str) -> RecordParser:
    def parse(record: Any) -> tuple[str | None, Document | None]:
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            return f"JSONL record without a {text_field!r} string", None
        if not text:
            return "JSONL record with empty text", None
        raw = _utf8(text)
        return ("JSONL record not UTF-8", None) if raw is None else (None, (text, raw, None))

    return parse


def _chat_record(record: Any) -> tuple[str | None, Document | None]:
    """A {"messages": [{"role", "content"}, ...]} record as its rendered conversation."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        return "JSONL record without messages", None
    for message in messages:
        if not isinstance(message, dict):
            return "JSONL record with a message that is not an object", None
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            shown = role[:40] if isinstance(role, str) else role
            return f"JSONL record with unknown role {shown!r}", None
        if not isinstance(message.get("content"), str):
            return "JSONL record with a content that is not a string", None
    pieces = chat_pieces(messages, add_generation_prompt=False)
    if not any(reply for _, reply in pieces):
        # Nothing in it would be learned: it would cost tokens and teach nothing.
        return "JSONL record without an assistant message", None
    text = "".join(piece for piece, _ in pieces)
    raw = _utf8(text)
    return ("JSONL record not UTF-8", None) if raw is None else (None, (text, raw, pieces))


def _jsonl_records(lines: Iterable[bytes], parse: RecordParser, skipped: Counter,
                   bad: list[tuple[int, str]] | None) -> Iterator[Document]:
    """The documents of JSON Lines records; a skipped record is counted in ``skipped`` and, with ``bad``, listed by line."""
    for number, line in enumerate(lines, 1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # json.loads rejects a UTF-8 byte order mark
        if not line.strip():
            continue
        reason = None
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            reason = "JSONL record not UTF-8"
        except ValueError:
            reason = "JSONL record not JSON"
        else:
            reason, document = parse(record)
        if reason is not None:
            skipped[reason] += 1
            if bad is not None:
                bad.append((number, reason))
            continue
        assert document is not None
        yield document


def _jsonl_documents(source: Source, parse: RecordParser, skipped: Counter,
                     bad: list[tuple[int, str]] | None) -> Iterator[Document]:
    try:
        with _open(source) as handle:
            lines = iter(handle)
            head = next(lines, None)
            if head is None:
                raise _SkipFile("empty")
            if b"\0" in head[:SNIFF_BYTES]:
                raise _SkipFile("binary")
            yield from _jsonl_records(itertools.chain([head], lines), parse, skipped, bad)
    except _READ_ERRORS as exc:
        raise _SkipFile(_read_error_reason(exc, source)) from None


def _is_json_lines(data: bytes) -> bool:
    """Whether every non-blank line of ``data`` (two at least) is a JSON object: JSON Lines under a .json name."""
    lines = [line for line in data.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    for line in lines:
        if not line.lstrip().startswith(b"{"):
            return False
        try:
            if not isinstance(json.loads(line), dict):
                return False
        except ValueError:
            return False
    return True


def iter_documents(source: Source, text_field: str, skipped: Counter,
                   bad: list[tuple[int, str]] | None = None, html: str = "text") -> Iterator[tuple[str, bytes]]:
    """(text, its UTF-8 bytes) for each document of ``source``: the whole file, or each JSONL record.

    A ``.json`` file whose every line is a JSON object is read as JSON Lines; with ``html`` "text" an HTML file
    is read as the text it shows (``html_text``). Raises _SkipFile when the file as a whole is unusable; skipped
    JSONL records are counted in ``skipped`` and, with ``bad``, listed there as (line number, reason).
    """
    for text, raw, _ in _plain_documents(source, text_field, skipped, bad, html):
        yield text, raw


def _plain_documents(source: Source, text_field: str, skipped: Counter, bad: list[tuple[int, str]] | None,
                     html: str) -> Iterator[Document]:
    if source.kind == "jsonl":
        yield from _jsonl_documents(source, _text_record(text_field), skipped, bad)
        return
    text, data = _text_document(source)
    if _is_json_name(source.path.name) and _is_json_lines(data):
        yield from _jsonl_records(data.splitlines(keepends=True), _text_record(text_field), skipped, bad)
    elif html == "text" and _is_html_name(source.path.name):
        text = html_text(text)
        if not text:
            raise _SkipFile("HTML without text")
        yield text, text.encode("utf-8"), None
    else:
        yield text, data, None


def read_documents(source: Source, data: DataConfig, skipped: Counter,
                   bad: list[tuple[int, str]] | None = None) -> Iterator[Document]:
    """The documents of ``source`` as ``data`` says to read them: with ``data.chat`` every file is JSON Lines of
    conversations, each document one rendered conversation with its pieces; otherwise as ``iter_documents``."""
    if data.chat:
        yield from _jsonl_documents(source, _chat_record, skipped, bad)
    else:
        yield from _plain_documents(source, data.text_field, skipped, bad, data.html)


def _is_html_name(name: str) -> bool:
    return name.lower().removesuffix(".gz").endswith(HTML_SUFFIXES)


class _HtmlText(HTMLParser):
    """Collects the text a browser would show: no head, scripts or styles; block elements start new lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive unescaped in handle_data
        self.parts: list[str] = []
        self.hidden: list[str] = []  # open elements whose content is not shown
        self.pre = 0

    def _break(self, tag: str) -> None:
        need = "\n\n" if tag in HTML_PARAGRAPHS else "\n"
        if self.parts and not self.parts[-1].strip("\n"):
            # Breaks in a row (</li><li>, </p><p>) make one, the widest of them.
            self.parts[-1] = max(self.parts[-1], need, key=len)
            return
        if self.parts:
            self.parts[-1] = self.parts[-1].rstrip(" ")
        self.parts.append(need)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            # Many pages never close their head; the body starts what is shown.
            self.hidden = [t for t in self.hidden if t != "head"]
        if tag in HTML_HIDDEN:
            self.hidden.append(tag)
        elif not self.hidden and (tag in HTML_BLOCKS or tag in HTML_PARAGRAPHS):
            self._break(tag)
        if tag == "pre":
            self.pre += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self.hidden and (tag in HTML_BLOCKS or tag in HTML_PARAGRAPHS):
            self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.hidden:
            while self.hidden.pop() != tag:
                pass
        elif not self.hidden and (tag in HTML_BLOCKS or tag in HTML_PARAGRAPHS):
            self._break(tag)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data: str) -> None:
        if self.hidden:
            return
        if not self.pre:
            # As in a browser, a run of whitespace (line breaks too) shows as one space, and none starts a line.
            words = data.split()
            data = (" " if data[:1].isspace() else "") + " ".join(words) + (" " if words and data[-1].isspace() else "")
            if not self.parts or self.parts[-1].endswith(("\n", " ")):
                data = data.lstrip(" ")
        if data:
            self.parts.append(data)

    def text(self) -> str:
        text = "".join(self.parts).strip()
        while "\n\n\n" in text:
            text = text.replace("\n\n\n", "\n\n")
        return text + "\n" if text else ""


def html_text(markup: str) -> str:
    """The text of an HTML document, for training on what a page says rather than on its markup."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    return parser.text()


def _is_json_name(name: str) -> bool:
    return name.lower().removesuffix(".gz").endswith(".json")


def _unit_interval(data: bytes, key: bytes) -> float:
    digest = hashlib.blake2b(data, digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass
class Split:
    """How documents are divided: by a hash of their text, or (few documents) by each one's tail."""

    method: str  # "hash" or "tail"
    val_fraction: float
    seed: int
    # In hash mode with no document under val_fraction, the one with the smallest hash goes to val.
    forced_val: float | None = None

    @property
    def key(self) -> bytes:
        return struct.pack("<q", self.seed)

    def parts(self, text: str, raw: bytes) -> list[tuple[int, str]]:
        if self.method == "hash":
            u = _unit_interval(raw, self.key)
            return [(VAL if u < self.val_fraction or u == self.forced_val else TRAIN, text)]
        return [(split, part) for split, part in zip((TRAIN, VAL), tail_split(text, self.val_fraction), strict=True) if part]

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "val_fraction": self.val_fraction, "seed": self.seed}


def tail_split(text: str, val_fraction: float) -> tuple[str, str]:
    """Head and tail of ``text``, the tail about ``val_fraction`` of its characters, from a line start if near."""
    size = len(text)
    if size < 2:
        return text, ""
    cut = min(max(int(size * (1.0 - val_fraction)), 1), size - 1)
    newline = text.find("\n", cut - 1, min(cut + TAIL_LINE_SEARCH, size - 1))
    if newline >= 0:
        cut = newline + 1
    return text[:cut], text[cut:]


# --------------------------------------------------------------------------- pass 1: scan


@dataclass
class Scan:
    sources: list[Source]
    source_info: list[dict[str, Any]]
    documents: int
    bytes: int
    split: Split
    train_bytes: int


def _scan(inventory: Inventory, data: DataConfig, reporter: Reporter) -> Scan:
    """Read everything once: skip what is not text, hash sources, count documents, choose the split."""
    key = struct.pack("<q", data.seed)
    accepted: list[Source] = []
    info: list[dict[str, Any]] = []
    documents = total = val_docs = val_bytes = 0
    min_u, min_count, min_bytes = 2.0, 0, 0
    reporter.start("read", total=sum(s.size for s in inventory.sources), unit="B")
    bad_records: list[str] = []
    for source in inventory.sources:
        docs = doc_bytes = 0
        bad: list[tuple[int, str]] = []
        try:
            for _, raw, _ in read_documents(source, data, inventory.skipped, bad):
                docs += 1
                doc_bytes += len(raw)
                u = _unit_interval(raw, key)
                if u < data.val_fraction:
                    val_docs += 1
                    val_bytes += len(raw)
                if u < min_u:
                    min_u, min_count, min_bytes = u, 1, len(raw)
                elif u == min_u:
                    min_count += 1
        except _SkipFile as skip:
            if docs == 0:
                inventory.skip(source.path, skip.reason)
            else:
                # A stream broken part-way: what was read before the break is kept, in every pass.
                inventory.skipped[skip.reason] += 1
        for line, reason in bad:
            bad_records.append(f"{source.path}:{line} ({reason.removeprefix('JSONL record ')})")
            if len(inventory.skipped_files) < MAX_LISTED_SKIPS:
                inventory.skipped_files.append({"path": str(source.path), "line": line, "reason": reason})
        if docs:
            accepted.append(source)
            info.append({"path": str(source.path), "bytes": source.size, "sha256": sha256_file(source.path),
                         "documents": docs})
            documents += docs
            total += doc_bytes
        reporter.advance("read", source.size)
    reporter.finish("read")
    if bad_records:
        more = f" and {len(bad_records) - 3} more" if len(bad_records) > 3 else ""
        reporter.warning(f"skipped {len(bad_records)} JSONL record(s): {', '.join(bad_records[:3])}{more} "
                         "(all in manifest.json's skipped_files)")

    if documents == 0:
        counts = ", ".join(f"{n} {reason}" for reason, n in inventory.skipped.most_common()) or "no files"
        raise UsageError(f"no usable {'conversation' if data.chat else 'text'} in the input ({counts})")

    split = Split("hash", data.val_fraction, data.seed)
    train_bytes = total - val_bytes
    if val_docs == 0:
        split.forced_val = min_u
        val_docs, train_bytes = min_count, total - min_bytes * min_count
    # A conversation is never cut in two: its tail alone would start in the middle of a turn.
    if not data.chat and (documents < math.ceil(1.0 / data.val_fraction) or val_docs >= documents):
        split = Split("tail", data.val_fraction, data.seed)
        train_bytes = int(total * (1.0 - data.val_fraction))
    return Scan(accepted, info, documents, total, split, train_bytes)


# --------------------------------------------------------------------------- pass 2: tokenizer


def _train_documents(scan: Scan, data: DataConfig) -> Iterator[tuple[int, int, str]]:
    """(source number, document number, train text) for each document's train part."""
    ignored: Counter = Counter()
    for number, source in enumerate(scan.sources):
        try:
            for doc, (text, raw, _) in enumerate(read_documents(source, data, ignored)):
                for split, part in scan.split.parts(text, raw):
                    if split == TRAIN:
                        yield number, doc, part
        except _SkipFile:
            pass


def _tokenizer_sample(scan: Scan, data: DataConfig, reporter: Reporter) -> Iterator[str]:
    """Training sentences drawn from the train split, about ``tokenizer_sample_bytes`` of them.

    Each sentence is kept with a probability set by a hash of its position, so the sample is spread
    over the whole corpus, is the same on every run, and stops at the byte budget.
    """
    rate = data.tokenizer_sample_bytes / max(scan.train_bytes, 1)
    key = struct.pack("<q", data.seed)
    taken = 0
    for number, doc, text in _train_documents(scan, data):
        for index, sentence in enumerate(training_sentences(text)):
            if rate < 1.0 and _unit_interval(struct.pack("<QQQ", number, doc, index), key) >= rate:
                continue
            size = len(sentence.encode("utf-8"))
            if taken + size > data.tokenizer_sample_bytes:
                return
            taken += size
            reporter.advance("tokenizer", size)
            yield sentence


# --------------------------------------------------------------------------- pass 3: encode

_worker: tuple[spm.SentencePieceProcessor, np.dtype] | None = None


def _init_worker(model_proto: bytes, dtype: str) -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(model_proto)
    _worker = (processor, np.dtype(dtype))


def _encode_in_worker(segments: list[tuple[int, str, int]], masks: bool) -> tuple[np.ndarray, ...]:
    assert _worker is not None
    return encode_segments(_worker[0], _worker[1], segments, masks)


def encode_segments(processor: spm.SentencePieceProcessor, dtype: np.dtype,
                    segments: list[tuple[int, str, int]], masks: bool = False) -> tuple[np.ndarray, ...]:
    """Token arrays (train, val) for (split, text, flags) segments; flags add <s> and </s>.

    With ``masks`` also (train mask, val mask), a uint8 per token: 1 for the tokens of a segment flagged
    _LEARN. Each segment is encoded on its own, so its tokens are exactly its text's and the mask's edges fall
    on token boundaries. The </s> after a learned segment (a conversation's closing reply) is learned too: it
    is how the model learns to end its reply, which ends the server's generation.
    """
    encoded = encode_batch(processor, [text for _, text, _ in segments])
    pieces: tuple[list[list[int]], list[list[int]]] = ([], [])
    learned: tuple[list[bytes], list[bytes]] = ([], [])
    for (split, _, flags), ids in zip(segments, encoded, strict=True):
        if flags & _BOS:
            pieces[split].append([BOS_ID])
        pieces[split].append(ids)
        if flags & _EOS:
            pieces[split].append([EOS_ID])
        if masks:
            value = b"\1" if flags & _LEARN else b"\0"
            learned[split].append(b"\0" * bool(flags & _BOS) + value * (len(ids) + bool(flags & _EOS)))
    arrays = tuple(np.fromiter(itertools.chain.from_iterable(p), dtype=dtype, count=sum(map(len, p))) for p in pieces)
    if not masks:
        return arrays
    return (*arrays, *(np.frombuffer(b"".join(m), dtype=np.uint8) for m in learned))


def _segments(text: str) -> Iterator[tuple[str, int]]:
    """A document as pieces of about SEGMENT_CHARS, cut after a newline where there is one."""
    size = len(text)
    if size <= SEGMENT_CHARS:
        yield text, _BOS | _EOS
        return
    start = 0
    while start < size:
        end = start + SEGMENT_CHARS
        if end >= size:
            end = size
        else:
            newline = text.find("\n", end, end + SEGMENT_CHARS // 4)
            if newline >= 0:
                end = newline + 1
        yield text[start:end], (_BOS if start == 0 else 0) | (_EOS if end == size else 0)
        start = end


@dataclass
class _Totals:
    documents: list[int] = field(default_factory=lambda: [0, 0])
    bytes: list[int] = field(default_factory=lambda: [0, 0])
    tokens: list[int] = field(default_factory=lambda: [0, 0])
    # Chat data: the tokens the mask lets training learn.
    learned: list[int] = field(default_factory=lambda: [0, 0])


def _document_segments(part: str, pieces: list[tuple[str, bool]] | None) -> Iterator[tuple[str, int]]:
    """(text, flags) segments of a document's part: cut by ``_segments``, and for a conversation by its pieces."""
    if pieces is None:
        yield from _segments(part)
        return
    last = len(pieces) - 1
    for index, (piece, reply) in enumerate(pieces):
        ends = (_BOS if index == 0 else 0) | (_EOS if index == last else 0)
        for segment, flags in _segments(piece):
            yield segment, (flags & ends) | (_LEARN if reply else 0)


def _chunks(scan: Scan, data: DataConfig, totals: _Totals) -> Iterator[tuple[list[tuple[int, str, int]], int]]:
    """Worker tasks of about CHUNK_CHARS characters, with the corpus bytes each one covers."""
    ignored: Counter = Counter()
    chunk: list[tuple[int, str, int]] = []
    chars = nbytes = 0
    for source in scan.sources:
        try:
            for text, raw, pieces in read_documents(source, data, ignored):
                for split, part in scan.split.parts(text, raw):
                    part_bytes = len(raw) if part is text else len(part.encode("utf-8"))
                    totals.documents[split] += 1
                    totals.bytes[split] += part_bytes
                    nbytes += part_bytes
                    for segment, flags in _document_segments(part, pieces):
                        chunk.append((split, segment, flags))
                        chars += len(segment)
                        if chars >= CHUNK_CHARS:
                            yield chunk, nbytes
                            chunk, chars, nbytes = [], 0, 0
        except _SkipFile:
            pass
    if chunk:
        yield chunk, nbytes


def _encode(scan: Scan, data: DataConfig, tokenizer: Tokenizer, dtype: np.dtype, paths: Sequence[Path],
            workers: int, parallel_min_bytes: int, reporter: Reporter, totals: _Totals) -> None:
    """Encode the corpus into the token files ``paths`` (train, val, and for chat data their masks), counting into
    ``totals`` as it goes."""
    reporter.start("encode", total=scan.bytes, unit="B")
    masks = data.chat
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(path, "wb")) for path in paths]

        def write(arrays: tuple[np.ndarray, ...], nbytes: int) -> None:
            for index, array in enumerate(arrays):
                if array.size:
                    # Not tofile: its short write on a full disk is an OSError without the errno.
                    files[index].write(array.data)
            for split in (TRAIN, VAL):
                totals.tokens[split] += int(arrays[split].size)
                if masks:
                    totals.learned[split] += int(np.count_nonzero(arrays[2 + split]))
            reporter.advance("encode", nbytes)

        tasks = _chunks(scan, data, totals)
        if workers <= 1 or scan.bytes < parallel_min_bytes:
            for segments, nbytes in tasks:
                write(encode_segments(tokenizer.processor, dtype, segments, masks), nbytes)
        else:
            _encode_parallel(tasks, tokenizer, dtype, workers, write, masks)
        for handle in files:
            handle.flush()
            os.fsync(handle.fileno())
    reporter.finish("encode")


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers without re-importing anything; the workers only run SentencePiece and
    # numpy, so the parent's threads (progress display) do not matter. Elsewhere, spawn.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if sys.platform == "linux" and "fork" in methods else "spawn")


def _encode_parallel(tasks: Iterator, tokenizer: Tokenizer, dtype: np.dtype, workers: int, write, masks: bool) -> None:
    """Encode tasks in worker processes, writing results in order, with a bounded number in flight.

    Pool.imap would read the whole corpus ahead into its queue; submitting a few tasks per worker
    at a time keeps memory flat whatever the corpus size.
    """
    in_flight = 2 * workers
    with _pool_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer.model_proto, dtype.str)) as pool:
        pending: deque = deque()
        for segments, nbytes in tasks:
            pending.append((pool.apply_async(_encode_in_worker, (segments, masks)), nbytes))
            if len(pending) >= in_flight:
                result, done = pending.popleft()
                write(result.get(), done)
        while pending:
            result, done = pending.popleft()
            write(result.get(), done)


# --------------------------------------------------------------------------- output folder


def _check_writable(out: Path) -> None:
    """Fail before any work if ``out`` cannot become a folder we can write to."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path is a file: {out}")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create output folder {out}: {probe} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {probe}: {exc.strerror or exc}") from None


def _make_dirs(out: Path) -> list[Path]:
    """Create ``out`` and missing parents; return those created, deepest first, for cleanup."""
    created = []
    probe = out
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    out.mkdir(parents=True, exist_ok=True)
    return created


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _fingerprint(inventory: Inventory, data: DataConfig, inputs: Sequence[str], tokenizer_sha256: str | None = None) -> str:
    """What decides the output: the input files (path, size, mtime), the settings and a given tokenizer."""
    settings = {
        "format_version": DATA_FORMAT_VERSION,
        "inputs": list(inputs) or [BUILTIN_CORPUS],
        "files": [[str(s.path), s.size, s.mtime_ns] for s in inventory.sources],
        "vocab_size": data.vocab_size,
        "tokenizer": data.tokenizer,
        "val_fraction": data.val_fraction,
        "text_field": data.text_field,
        "tokenizer_sample_bytes": data.tokenizer_sample_bytes,
        "seed": data.seed,
    }
    if tokenizer_sha256 is not None:
        # Only then: folders made before --tokenizer-from existed stay up to date.
        settings["given_tokenizer"] = tokenizer_sha256
    # Likewise for folders made before these settings, which then had neither chat nor HTML files.
    if data.chat:
        settings["chat"] = True
    if not data.chat and any(_is_html_name(s.path.name) for s in inventory.sources):
        settings["html"] = data.html
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> dict[str, Any] | None:
    manifest = finished_data_manifest(out)
    return manifest if manifest is not None and manifest.get("fingerprint") == fingerprint else None


# --------------------------------------------------------------------------- the stage


@dataclass
class PreprocessResult:
    out: Path
    manifest: dict[str, Any]
    # True when the folder already held the same work and nothing was redone.
    up_to_date: bool = False


def preprocess(
    config: Config,
    inputs: Sequence[str] = (),
    out: str | Path | None = None,
    *,
    workers: int = 0,
    force: bool = False,
    reporter: Reporter | None = None,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
    tokenizer: Tokenizer | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> PreprocessResult:
    """Tokenize ``inputs`` (files, folders, globs; none = python-stdlib) into a data folder.

    With ``tokenizer`` (``--tokenizer-from``) the text is encoded with it and no tokenizer is trained, so the
    folder can feed a run started from a model that uses it. ``include``/``exclude`` filter the files found
    (see ``discover``).

    Refused while another process writes the same folder; what an interrupted run left there is removed.
    """
    reporter = reporter or NullReporter()
    if tokenizer is not None:
        check_special_ids(tokenizer, str(tokenizer.path or "the tokenizer"))
        # The folder's config describes the tokenizer it holds, not the one it would have trained.
        kind = tokenizer.model_type if tokenizer.model_type in TOKENIZERS else config.data.tokenizer
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, vocab_size=tokenizer.vocab_size,
                                                                      tokenizer=kind))
    data = config.data
    data.validate()
    inputs = [str(i) for i in inputs]
    workers = workers or default_preprocess_workers(config)
    out_dir = resolve_out_dir(data, inputs, out)
    _check_writable(out_dir)
    created = _make_dirs(out_dir)
    finished = False
    try:
        with FileLock(out_dir / LOCK, f"data folder {out_dir}"):
            if done := clean_up(out_dir, "preprocess|" + re.escape(MANIFEST)):
                reporter.info(f"cleaned up after an interrupted preprocess: {'; '.join(done)}")
            result = _preprocess(config, inputs, out_dir, workers, force, reporter, parallel_min_bytes, tokenizer,
                                 include, exclude)
        finished = True
        return result
    finally:
        if not finished:
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break


def _preprocess(config: Config, inputs: list[str], out_dir: Path, workers: int, force: bool, reporter: Reporter,
                parallel_min_bytes: int, given: Tokenizer | None, include: Sequence[str],
                exclude: Sequence[str]) -> PreprocessResult:
    data = config.data
    started = time.perf_counter()

    inventory = discover(inputs, exclude_dir=out_dir, include=include, exclude=exclude)
    fingerprint = _fingerprint(inventory, data, inputs, given.sha256 if given is not None else None)
    if not force and (manifest := _up_to_date(out_dir, fingerprint)) is not None:
        reporter.info(f"{out_dir} is up to date (same inputs and settings); --force redoes it")
        return PreprocessResult(out_dir, manifest, up_to_date=True)
    if not force and (out_dir / MANIFEST).is_file():
        reporter.info(f"{out_dir} was made from other inputs or settings: rebuilding it")
    if not inventory.sources:
        counts = ", ".join(f"{n} {reason}" for reason, n in inventory.skipped.most_common())
        raise UsageError(f"no input files found{f' ({counts})' if counts else ''}")

    scan = _scan(inventory, data, reporter)
    read_s = time.perf_counter() - started
    if inventory.skipped:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(inventory.skipped.items()))
        reporter.warning(f"skipped {counts}")
    if scan.split.method == "tail":
        reporter.info(f"only {scan.documents} document(s): the last {data.val_fraction:g} of each goes to val")

    tokenizer_started = time.perf_counter()
    sample_bytes = _SampleCounter()
    if given is None:
        reporter.start("tokenizer", total=min(data.tokenizer_sample_bytes, scan.train_bytes), unit="B")
        tokenizer = train_tokenizer(lambda: sample_bytes.count(_tokenizer_sample(scan, data, reporter)),
                                    data.vocab_size, data.tokenizer)
        reporter.finish("tokenizer")
        origin = {"sample_bytes": sample_bytes.total, "sample_of": "train"}
    else:
        tokenizer = given
        origin = {"type": tokenizer.model_type, "from": str(tokenizer.path)}
    tokenizer_s = time.perf_counter() - tokenizer_started

    dtype = dtype_for(tokenizer.vocab_size)
    work = Path(tempfile.mkdtemp(prefix=".preprocess-", suffix=".tmp", dir=out_dir))
    totals = _Totals()
    try:
        encode_started, encode_cpu = time.perf_counter(), _cpu_seconds()
        outputs = [*map(split_file_name, SPLITS), *(map(mask_file_name, SPLITS) if data.chat else ())]
        bins = [work / name for name in outputs]
        _encode(scan, data, tokenizer, dtype, bins, workers, parallel_min_bytes, reporter, totals)
        encode_s, encode_cpu_s = time.perf_counter() - encode_started, _cpu_seconds() - encode_cpu
        if totals.documents[VAL] == 0 or totals.tokens[TRAIN] == 0:
            raise UsageError("the corpus is too small to give both a train and a val split; add more text")
        if totals.tokens[VAL] < SMALL_VAL_TOKENS or (scan.split.method == "hash" and totals.documents[VAL] == 1):
            reporter.warning(
                f"the validation split is small ({totals.documents[VAL]} document(s), {totals.tokens[VAL]} tokens): "
                "its loss will be noisy and may not reflect the corpus; raise --val-fraction or add text")

        (work / TOKENIZER).write_bytes(tokenizer.model_proto)
        saved = dataclasses.replace(config, data=dataclasses.replace(data, dir=str(out_dir)))
        save_config(saved, work / CONFIG)
        manifest = {
            "format_version": DATA_FORMAT_VERSION,
            "hetlm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "corpus": corpus_name(inputs),
            "inputs": inputs or [BUILTIN_CORPUS],
            "fingerprint": fingerprint,
            "dtype": dtype.name,
            "tokenizer": {"file": TOKENIZER, "sha256": tokenizer.sha256,
                          **tokenizer_settings(tokenizer), **origin},
            "split": scan.split.describe(),
            "chat": data.chat,
            "splits": {
                name: {"file": split_file_name(name), "documents": totals.documents[i], "bytes": totals.bytes[i],
                       "tokens": totals.tokens[i],
                       **({"mask_file": mask_file_name(name), "learned_tokens": totals.learned[i]} if data.chat else {})}
                for i, name in enumerate(SPLITS)
            },
            "sources": scan.source_info,
            "skipped": dict(sorted(inventory.skipped.items())),
            "skipped_files": inventory.skipped_files,
            "workers": workers,
            "timings": {"read_s": round(read_s, 3), "tokenizer_s": round(tokenizer_s, 3),
                        "encode_s": round(encode_s, 3), "encode_cpu_s": round(encode_cpu_s, 3),
                        "total_s": round(time.perf_counter() - started, 3)},
        }
        with atomic_path(out_dir / MANIFEST) as new_manifest:
            # Written before the old manifest goes, so that a full disk cannot leave the folder without one.
            new_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            # From here until the new manifest takes its name the folder is unfinished.
            (out_dir / MANIFEST).unlink(missing_ok=True)
            for name in (TOKENIZER, *outputs, CONFIG):
                os.replace(work / name, out_dir / name)
            fsync_dir(out_dir)
    except OSError as exc:
        if (code := no_space_errno(exc)) is not None:
            needs = _output_bytes(scan, totals, dtype, data.chat) + len(tokenizer.model_proto)
            raise HetlmError(disk_full_message(out_dir, code, needs)) from exc
        raise HetlmError(f"writing {out_dir} failed: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PreprocessResult(out_dir, manifest)


def _output_bytes(scan: Scan, totals: _Totals, dtype: np.dtype, masks: bool) -> int:
    """The token (and mask) files' size: what was written, scaled to the whole corpus (at most a token per byte
    before any)."""
    per_token = dtype.itemsize + (1 if masks else 0)
    encoded = sum(totals.bytes)
    if not encoded:
        return (scan.bytes + 2 * scan.documents) * per_token
    return sum(totals.tokens) * per_token * scan.bytes // encoded


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the encode workers, once the pool is closed)."""
    try:
        import resource
    except ImportError:  # Windows
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _SampleCounter:
    def __init__(self) -> None:
        self.total = 0

    def count(self, sentences: Iterator[str]) -> Iterator[str]:
        self.total = 0
        for sentence in sentences:
            self.total += len(sentence.encode("utf-8"))
            yield sentence


# --------------------------------------------------------------------------- reading a data folder

"""Bytes per token of ``hetlm preprocess`` at several vocabulary sizes, on the stdlib and on a Chinese corpus.

The Chinese corpus is generated (no download): "words" of one to four CJK characters drawn from 6,000
with Zipf-like frequencies, in sentences ending in Chinese punctuation, cut into 100 documents. Its
character statistics are near a real Chinese text's (the most frequent thousand characters cover about
90% of it; 5,300 distinct in 1 MB). Each size is one ``preprocess`` run; a size the tokenizer refuses
is reported with its error. Prints one JSON object.

    .venv/bin/python bench/bytes_per_token.py                          # both corpora, 3-4 minutes on 2 cores
    .venv/bin/python bench/bytes_per_token.py --corpus chinese --sizes 1000 2000
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import tempfile
from pathlib import Path

from hetlm.config import load_config
from hetlm.errors import UsageError
from hetlm.preprocess import preprocess

STDLIB_SIZES = (320, 512, 1024, 4096, 8192)
CHINESE_SIZES = (600, 1000, 2000, 4096, 8192)


def chinese_corpus(folder: Path, chars: int, seed: int = 0, documents: int = 100) -> int:
    """Write about ``chars`` characters of generated Chinese text as ``documents`` files; returns the bytes written."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in rng.sample(range(0x4E00, 0x9FA6), 6000)]
    char_weights = list(itertools.accumulate(1 / (rank + 1) ** 0.9 for rank in range(len(alphabet))))
    words = ["".join(rng.choices(alphabet, cum_weights=char_weights, k=n))
             for n in rng.choices([1, 2, 3, 4], [30, 55, 10, 5], k=40_000)]
    word_weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))
    written = 0
    for doc in range(documents):
        parts, size = [], 0
        while size < chars // documents:
            sentence = "".join(rng.choices(words, cum_weights=word_weights, k=rng.randint(6, 24)))
            parts.append(sentence + rng.choice("，。，。！？；") + ("\n" if rng.random() < 0.2 else ""))
            size += len(parts[-1])
        data = "".join(parts).encode("utf-8")
        (folder / f"doc-{doc:03d}.txt").write_bytes(data)
        written += len(data)
    return written


def measure(inputs: list[str], sizes: list[int], work: Path) -> dict[str, object]:
    results: dict[str, object] = {}
    for size in sizes:
        config = load_config(overrides=[f"data.vocab_size={size}"])
        try:
            manifest = preprocess(config, inputs, work / f"data-{size}", workers=2, force=True).manifest
        except UsageError as exc:
            results[str(size)] = {"error": str(exc)}
            continue
        splits = manifest["splits"]
        total_bytes = sum(s["bytes"] for s in splits.values())
        total_tokens = sum(s["tokens"] for s in splits.values())
        results[str(size)] = {
            "bytes_per_token": round(total_bytes / total_tokens, 3),
            "val_bytes_per_token": round(splits["val"]["bytes"] / splits["val"]["tokens"], 3),
            "characters": manifest["tokenizer"].get("characters"),
            "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=("stdlib", "chinese", "both"), default="both")
    parser.add_argument("--sizes", type=int, nargs="+", help="vocabulary sizes (default: per corpus)")
    parser.add_argument("--chinese-mb", type=float, default=1.0, help="size of the generated Chinese corpus")
    args = parser.parse_args()
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="hetlm-bpt-") as tmp:
        work = Path(tmp)
        if args.corpus in ("chinese", "both"):
            corpus = work / "chinese"
            corpus.mkdir()
            written = chinese_corpus(corpus, int(args.chinese_mb * 1_000_000 / 3))
            report["chinese"] = {"bytes": written,
                                 "sizes": measure([str(corpus)], args.sizes or list(CHINESE_SIZES), work / "zh")}
        if args.corpus in ("stdlib", "both"):
            report["stdlib"] = {"sizes": measure([], args.sizes or list(STDLIB_SIZES), work / "stdlib")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

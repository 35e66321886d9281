"""Quality per minute on tiny Shakespeare, comparable with nanoGPT's character-level runs.

Preprocesses the first 90% of the file (by characters), trains with a preset under a wall-time
limit, then evaluates on exactly the last 10% (nanoGPT's validation split: the last 111,540
characters of the 1,115,394-character file) with ``hetlm eval --text`` and prints JSON with bits
per character, so models with any tokenizer compare with nanoGPT's 2.72 (CPU baby run, ~110 s)
and 2.12 (A100 run) bits per character.

    python bench/shakespeare.py [--data ../shared/data/tinyshakespeare.txt] [--max-time 100s] [--set key=value] [--warm-cache]

The default 100 s budget keeps the whole `hetlm train` command (start-up, final save) within 110 s. torch.compile
gets a fresh cache, so a compiled preset pays its whole compile time; --warm-cache reuses the usual one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def hetlm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hetlm", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--config", default="configs/shakespeare-cpu.yaml")
    parser.add_argument("--max-time", default="100s", help="training budget; start-up and the final save take ~5 s more")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--work", type=Path, default=None, help="keep outputs here instead of a temporary folder")
    parser.add_argument("--warm-cache", action="store_true",
                        help="reuse torch.compile's usual cache (default: a fresh one, so compile time counts in full)")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"no data at {args.data}: pass --data PATH to tinyshakespeare.txt")

    text = args.data.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    train_text, val_text = text[:split], text[split:]
    work = args.work or Path(tempfile.mkdtemp(prefix="hetlm-shakespeare-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.txt").write_text(train_text, encoding="utf-8")
    (work / "val.txt").write_text(val_text, encoding="utf-8")

    sets = [f"--set={s}" for s in args.overrides]
    started = time.perf_counter()
    hetlm("preprocess", str(work / "train.txt"), "--out", str(work / "data"), "--force",
          "--config", args.config, *sets)
    preprocess_s = time.perf_counter() - started

    env = dict(os.environ)
    if not args.warm_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.mkdtemp(prefix="inductor-", dir=work)))
    started = time.perf_counter()
    hetlm("train", "--config", args.config, "--set", f"data.dir={work / 'data'}", *sets,
          "--out", str(work / "run"), "--resume", "never", "--max-time", args.max_time, env=env)
    train_s = time.perf_counter() - started

    result = json.loads(hetlm("eval", str(work / "run"), "--text", str(work / "val.txt"), "--json").stdout)
    val_bytes = len(val_text.encode("utf-8"))
    bits_per_char = result["bits_per_byte"] * val_bytes / len(val_text)
    print(json.dumps({
        "config": args.config,
        "overrides": args.overrides,
        "max_time": args.max_time,
        "threads": os.cpu_count(),
        "val_characters": len(val_text),
        "preprocess_seconds": round(preprocess_s, 1),
        "train_wall_seconds": round(train_s, 1),
        "compile_cache": "warm" if args.warm_cache else "cold",
        "val_loss_per_token": result.get("loss"),
        "bits_per_character": round(bits_per_char, 4),
        "nats_per_character": round(bits_per_char * math.log(2), 4),
        "nanogpt_reference_bits_per_character": {"cpu_baby_110s": 2.72, "a100": 2.12},
        "work": str(work),
    }, indent=2))


if __name__ == "__main__":
    main()

"""Throughput and latency of ``hetlm serve`` under concurrent clients: the batched engine against turn by turn.

For each shape, starts two ``hetlm serve`` subprocesses on free localhost ports: the continuous-batching engine
(``serve.batching=on``, ``serve.max_concurrency=auto``) and the turn-by-turn engine as it was before
(``serve.batching=off`` with the old default of 4 concurrent generations). Then, for 1, 8, 32 and 64 concurrent
clients, streaming and not, each client sends completions of ``--max-tokens`` tokens one after another
(``min(16, max(3, 128 // clients))`` each, so most steps run with every client in the batch), first to the
batched server, then to the turn-by-turn one, so a shared machine's changing load does not favour either. It
prints JSON: requests/s, completion tokens/s, p50/p95 latency and p50/p95 time to first token (the whole
request when not streaming), per engine, and the ratios.

Each server runs one torch thread by default (``--threads``): the event loop needs the other core, and on a
machine whose cores other work keeps busy, two torch threads made every step several times slower (each step
waits for the descheduled thread).

Shapes (random weights, so the figures measure the serving path, not a trained model): ``tiny``, the default
shape (4 layers, d_model 128, context 128) with a 1024-token vocabulary, and ``11m``, nanoGPT's Shakespeare
shape (6 layers, 6 heads, d_model 384; 10.6M non-embedding parameters) at context 256 with a 4096-token
vocabulary. Tokenizers are trained on a slice of the standard library.

    python bench/serve.py [--shapes tiny 11m] [--clients 1 8 32 64] [--max-tokens 64] [--target RUN_OR_BUNDLE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from hetlm.config import load_config
from hetlm.model import Transformer
from hetlm.preprocess import stdlib_root
from hetlm.store import Checkpoint, RunDir
from hetlm.tokenizer import train_tokenizer, training_sentences

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "tiny": {"sets": [], "vocab": 1024},
    "11m": {"sets": ["model.n_layers=6", "model.n_heads=6", "model.d_model=384", "model.context_length=256"], "vocab": 4096},
}
ENGINES = {"batched": ["serve.batching=on", "serve.max_concurrency=auto"],
           "turn_by_turn": ["serve.batching=off", "serve.max_concurrency=4"]}


def random_model(work: Path, shape: str) -> Path:
    """A run folder holding one checkpoint of a randomly initialised model of ``shape``."""
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(stdlib_root().glob("*.py"))[:80])
    vocab = SHAPES[shape]["vocab"]
    tokenizer = train_tokenizer(training_sentences(text), vocab)
    tokenizer.save(work / "tokenizer.model")
    config = load_config(None, [f"model.vocab_size={vocab}", f"data.vocab_size={vocab}", *SHAPES[shape]["sets"]])
    torch.manual_seed(0)
    run = work / "run"
    Checkpoint.write(RunDir(run).checkpoint_path(0), Transformer(config.model), config, work / "tokenizer.model")
    return run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, stream: bool) -> tuple[float, float, int]:
    """(latency, time to first token, completion tokens) of one completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8}
    started = time.perf_counter()
    if not stream:
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        elapsed = time.perf_counter() - started
        return elapsed, elapsed, response.json()["usage"]["completion_tokens"]
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    elapsed = time.perf_counter() - started
    return elapsed, first if first is not None else elapsed, tokens


async def load(url: str, clients: int, requests: int, max_tokens: int, stream: bool) -> dict:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        await one_request(client, "warm up", max_tokens, stream)

        async def client_loop(i: int) -> list[tuple[float, float, int]]:
            return [await one_request(client, f"def f_{i}_{j}(", max_tokens, stream) for j in range(requests)]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client_loop(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - started
    latencies, first = [r[0] for r in results], [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "requests": len(results),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 2),
        "completion_tokens_per_s": round(tokens / wall, 1),
        "mean_completion_tokens": round(tokens / len(results), 1),
        "latency_s": {"p50": round(percentile(latencies, 0.5), 3), "p95": round(percentile(latencies, 0.95), 3),
                      "mean": round(statistics.fmean(latencies), 3)},
        "first_token_s": {"p50": round(percentile(first, 0.5), 3), "p95": round(percentile(first, 0.95), 3)},
    }


@contextlib.contextmanager
def serving(target: Path, sets: list[str], queue: int, threads: int):
    """A ``hetlm serve`` subprocess on a free port; yields (url, its start-up lines, /health)."""
    command = [sys.executable, "-m", "hetlm", "serve", str(target), "--port", "0", "--model-name", "bench",
               "--set", f"serve.max_queue={queue}", *[f"--set={s}" for s in sets]]
    if threads:
        command += ["--set", f"device.threads={threads}"]
    env = {k: v for k, v in os.environ.items() if k != "HETLM_API_KEY"}
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, banner = None, []
        for line in server.stderr:
            banner.append(line.strip())
            if match := re.search(r"(http://127\.0\.0\.1:\d+)/v1", line):
                url = match.group(1)
                break
        if url is None:
            raise SystemExit("hetlm serve did not start:\n" + "\n".join(banner))
        yield url, banner[:-1], httpx.get(url + "/health").json()
    finally:
        server.terminate()
        server.wait(timeout=30)


def bench_shape(target: Path, args: argparse.Namespace) -> dict:
    queue = max(args.clients) + 1
    with (serving(target, ENGINES["batched"], queue, args.threads) as batched,
          serving(target, ENGINES["turn_by_turn"], queue, args.threads) as turns):
        servers = {"batched": batched, "turn_by_turn": turns}
        rows = []
        for clients in args.clients:
            for stream in (False, True):
                requests = min(16, max(3, 128 // clients))
                row = {"clients": clients, "stream": stream}
                for name, (url, _, _) in servers.items():
                    row[name] = asyncio.run(load(url, clients, requests, args.max_tokens, stream))
                ours, theirs = row["batched"], row["turn_by_turn"]
                row["tokens_per_s_ratio"] = round(ours["completion_tokens_per_s"] / theirs["completion_tokens_per_s"], 2)
                row["p95_latency_ratio"] = round(ours["latency_s"]["p95"] / theirs["latency_s"]["p95"], 2)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        engines = {name: {"banner": banner, "slots": health["slots"], "batching": health["batching"],
                          "device": health["device"]} for name, (_, banner, health) in servers.items()}
    return {"engines": engines, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "11m"])
    parser.add_argument("--target", type=Path, help="serve this run, checkpoint or bundle instead of the random shapes")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server; 0 = the planner's choice")
    args = parser.parse_args()

    load_before = os.getloadavg()
    shapes = {}
    with tempfile.TemporaryDirectory(prefix="hetlm-bench-serve-") as tmp:
        for shape in [str(args.target)] if args.target else args.shapes:
            work = Path(tmp) / shape.replace("/", "_")
            work.mkdir()
            shapes[shape] = bench_shape(args.target or random_model(work, shape), args)
    targets = {}
    for shape, needed in (("tiny", 5), ("11m", 3)):
        for row in shapes.get(shape, {}).get("runs", []):
            kind = "streamed" if row["stream"] else "not streamed"
            if row["clients"] == 32:
                targets[f"{shape}, 32 clients, {kind}: >= {needed}x tokens/s"] = row["tokens_per_s_ratio"] >= needed
                targets[f"{shape}, 32 clients, {kind}: lower p95 latency"] = row["p95_latency_ratio"] < 1
            if row["clients"] == 1:
                targets[f"{shape}, 1 client, {kind}: no slower"] = row["tokens_per_s_ratio"] >= 0.95
    print(json.dumps({
        "bench": "serve",
        "max_tokens": args.max_tokens,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": args.threads or "planner",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "shapes": shapes,
        "targets_met": targets,
    }, indent=2))


if __name__ == "__main__":
    main()

"""Throughput and latency of ``hetlm serve`` under concurrent clients.

Starts ``hetlm serve`` in a subprocess on a free localhost port, then has ``--clients`` concurrent
clients each send ``--requests`` completions of ``--max-tokens`` tokens, one after another, and
prints JSON: requests/s, completion tokens/s and latency percentiles (whole request, and time to
the first streamed token with ``--stream``).

Without ``--target`` it serves a randomly initialised model of the default shape (4 layers,
d_model 128, context 128) with a tokenizer trained on a slice of the standard library: the
figures then measure the serving path, not a trained model.

    python bench/serve.py [--target RUN_OR_BUNDLE] [--clients 32] [--max-tokens 64] [--requests 4]
"""

from __future__ import annotations

import argparse
import asyncio
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

ROOT = Path(__file__).resolve().parent.parent


def random_model(work: Path) -> Path:
    """A run folder holding one checkpoint of a randomly initialised default-shape model."""
    import torch

    from hetlm.config import load_config
    from hetlm.model import Transformer
    from hetlm.preprocess import stdlib_root
    from hetlm.store import Checkpoint, RunDir
    from hetlm.tokenizer import train_tokenizer, training_sentences

    text = "".join(p.read_text(encoding="utf-8") for p in sorted(stdlib_root().glob("*.py"))[:40])
    tokenizer = train_tokenizer(training_sentences(text), 1024)
    tokenizer.save(work / "tokenizer.model")
    config = load_config(None, ["model.vocab_size=1024"])
    torch.manual_seed(0)
    run = work / "run"
    Checkpoint.write(RunDir(run).checkpoint_path(0), Transformer(config.model), config, work / "tokenizer.model")
    return run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, args: argparse.Namespace) -> tuple[float, float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.8}
    started = time.perf_counter()
    if not args.stream:
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        elapsed = time.perf_counter() - started
        return elapsed, elapsed, response.json()["usage"]["completion_tokens"]
    first = None
    tokens = 0
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


async def load(url: str, model: str, args: argparse.Namespace) -> tuple[list[tuple[float, float, int]], float]:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, model, "warm up", args)

        async def client_loop(i: int) -> list[tuple[float, float, int]]:
            return [await one_request(client, model, f"def f_{i}_{j}(", args) for j in range(args.requests)]

        started = time.perf_counter()
        results = await asyncio.gather(*(client_loop(i) for i in range(args.clients)))
        wall = time.perf_counter() - started
    return [r for rs in results for r in rs], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, help="run, checkpoint or bundle (default: a random default-shape model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, sent one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=None, help="passed to hetlm serve")
    parser.add_argument("--stream", action="store_true", help="stream, and report time to first token")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="passed to hetlm serve")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hetlm-bench-serve-") as tmp:
        target = args.target or random_model(Path(tmp))
        command = [sys.executable, "-m", "hetlm", "serve", str(target), "--port", "0", "--model-name", "bench",
                   "--set", f"serve.max_queue={args.clients + 1}", *[f"--set={s}" for s in args.overrides]]
        if args.max_concurrency:
            command += ["--max-concurrency", str(args.max_concurrency)]
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
            health = httpx.get(url + "/health").json()
            results, wall = asyncio.run(load(url, "bench", args))
        finally:
            server.terminate()
            server.wait(timeout=30)

    latencies = [r[0] for r in results]
    first = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    report = {
        "clients": args.clients,
        "requests": len(results),
        "max_tokens": args.max_tokens,
        "stream": args.stream,
        "target": str(args.target) if args.target else "random default-shape model (4x128, context 128, vocab 1024)",
        "server": {"device": health["device"], "capacity": health["capacity"], "banner": banner[:-1]},
        "cpus": os.cpu_count(),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3),
        "completion_tokens_per_s": round(tokens / wall, 1),
        "mean_completion_tokens": round(tokens / len(results), 1),
        "latency_s": {"p50": round(percentile(latencies, 0.5), 3), "p95": round(percentile(latencies, 0.95), 3),
                      "max": round(max(latencies), 3), "mean": round(statistics.fmean(latencies), 3)},
    }
    if args.stream:
        report["first_token_s"] = {"p50": round(percentile(first, 0.5), 3), "p95": round(percentile(first, 0.95), 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

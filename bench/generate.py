"""Sampling speed at batch 1: hetlm's KV-cache decoder against recomputing every step and against Hugging Face.

For each shape, a randomly initialised model generates ``--new-tokens`` tokens greedily from ``<s>`` (</s>
ignored, so every run makes exactly that many) three ways, each repeated ``--repeats`` times (medians
reported):

- ``hetlm_cache``: ``hetlm.sampling.Sampler`` as ``hetlm generate`` runs it (prefill, then one token per
  step on the KV cache, with incremental detokenization);
- ``hetlm_int8``: the same with ``sample.quantize=int8`` (single-token steps read int8 weights; opt-in,
  since it changes the logits: on a random model greedy tokens part from fp32's at once, so none are compared);
- ``hetlm_no_cache``: the same loop recomputing the whole window with ``Transformer.forward`` every step;
- ``hf_generate``: transformers' ``LlamaForCausalLM.generate(do_sample=False, min_new_tokens=max_new_tokens)``
  holding the same weights (hetlm uses HF's parameter names), so its greedy tokens are compared too.
  Its runs alternate with hetlm's, so a shared machine's changing load does not favour either.

Shapes: ``baby`` is nanoGPT's baby shape (4 layers, 4 heads, d_model 128) and ``11m`` its Shakespeare shape
(6 layers, 6 heads, d_model 384; 10.6M non-embedding parameters). Both use a context of 512 so 500 new
tokens fit in one window (at nanoGPT's 64 the window would slide, which HF cannot do). The vocabulary is
hetlm's default 4096, from a tokenizer trained on a slice of the standard library.

One torch thread by default: at batch 1 the products are matrix-vector ones that a second thread barely
speeds up, and on a machine whose cores are busy with other work two threads made both hetlm and HF 4-20x
slower (each step waits for the descheduled thread). ``--threads 0`` takes the planner's choice.

    .venv/bin/python bench/generate.py [--shapes baby 11m] [--new-tokens 500] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hetlm.config import Config, ModelConfig
from hetlm.model import Transformer, parameter_counts
from hetlm.planner import detect_inventory, make_plan
from hetlm.preprocess import stdlib_root
from hetlm.sampling import Sampler, make_generator
from hetlm.sampling_settings import SamplingSettings
from hetlm.tokenizer import train_tokenizer, training_sentences

SHAPES = {
    "baby": {"n_layers": 4, "n_heads": 4, "d_model": 128},
    "11m": {"n_layers": 6, "n_heads": 6, "d_model": 384},
}
CONTEXT = 512
VOCAB = 4096


def train_bench_tokenizer(work: Path):
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(stdlib_root().glob("*.py"))[:120])
    return train_tokenizer(training_sentences(text), VOCAB)


def hf_model(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, max_position_embeddings=c.context_length,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    hf = LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def summary(seconds: list[float], tokens: int) -> dict:
    median = statistics.median(seconds)
    return {
        "tokens_per_s": round(tokens / median, 1),
        "ms_per_token": round(1000 * median / tokens, 3),
        "runs_tokens_per_s": [round(tokens / s, 1) for s in seconds],
    }


def timed(run, *args, **kwargs) -> tuple[float, list[int]]:
    started = time.perf_counter()
    tokens = run(*args, **kwargs)
    return time.perf_counter() - started, tokens


def bench_shape(name: str, tokenizer, inventory, new_tokens: int, repeats: int, skip_no_cache: bool) -> dict:
    config = ModelConfig(**SHAPES[name], context_length=CONTEXT, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    sampler = Sampler(model, tokenizer)
    int8_config = Config(model=config)
    int8_config.sample.quantize = "int8"
    int8_config.device.device = "cpu"
    int8_plan = make_plan(inventory, int8_config, workload="infer")
    assert int8_plan.decode_weights == "int8", int8_plan.decode_weights
    int8_sampler = Sampler(model, tokenizer, int8_plan)
    hf = hf_model(model)
    prompt = [tokenizer.bos_id]
    ids = torch.tensor([prompt])

    def ours(max_new_tokens: int, use_cache: bool = True, which: Sampler = sampler) -> list[int]:
        settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True, use_cache=use_cache)
        return which.generate(prompt, settings, make_generator(0)).completions[0].token_ids

    def theirs(max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              pad_token_id=3)
        return out[0, 1:].tolist()

    ours(20), ours(20, which=int8_sampler), theirs(20)  # warm-up: first-call allocations and lazy initialisation
    # Alternating keeps a shared machine's changing load from favouring any of them.
    cache_s, int8_s, hf_s = [], [], []
    for _ in range(repeats):
        seconds, ours_tokens = timed(ours, new_tokens)
        cache_s.append(seconds)
        int8_s.append(timed(ours, new_tokens, which=int8_sampler)[0])
        seconds, hf_tokens = timed(theirs, new_tokens)
        hf_s.append(seconds)
    same = next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens, strict=False)) if a != b), len(ours_tokens))
    row = {
        "shape": {**SHAPES[name], "context_length": CONTEXT, "vocab_size": config.vocab_size, "d_ff": config.ffn_dim},
        "parameters": parameter_counts(config),
        "hetlm_cache": summary(cache_s, new_tokens),
        "hf_generate": summary(hf_s, new_tokens),
        "speedup_vs_hf": round(statistics.median(hf_s) / statistics.median(cache_s), 2),
        "hetlm_int8": summary(int8_s, new_tokens),
        "int8_speedup_vs_hf": round(statistics.median(hf_s) / statistics.median(int8_s), 2),
        # Same weights, so greedy decoding should agree until float rounding separates two near-equal logits.
        "greedy_tokens_equal_to_hf": same,
    }
    if not skip_no_cache:
        plain_s = []
        for _ in range(max(1, repeats - 1)):
            seconds, plain_tokens = timed(ours, new_tokens, use_cache=False)
            plain_s.append(seconds)
        row["hetlm_no_cache"] = summary(plain_s, new_tokens)
        row["cache_speedup_vs_no_cache"] = round(statistics.median(plain_s) / statistics.median(cache_s), 2)
        row["no_cache_same_tokens"] = plain_tokens == ours_tokens
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["baby", "11m"])
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = the planner's choice for inference")
    parser.add_argument("--skip-no-cache", action="store_true", help="Leave out the slow recompute baseline.")
    args = parser.parse_args()

    inventory = detect_inventory()
    plan = make_plan(inventory, Config(), workload="infer")
    threads = args.threads or plan.threads
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        tokenizer = train_bench_tokenizer(Path(work))
    shapes = {name: bench_shape(name, tokenizer, inventory, args.new_tokens, args.repeats, args.skip_no_cache)
              for name in args.shapes}
    targets = {}
    for name, row in shapes.items():
        if "cache_speedup_vs_no_cache" in row:
            targets[f"{name}: cache >= 5x recompute"] = row["cache_speedup_vs_no_cache"] >= 5
        needed = {"baby": 4, "11m": 3}[name]
        targets[f"{name}: >= {needed}x HF generate"] = row["speedup_vs_hf"] >= needed
        targets[f"{name}, int8 opt-in: >= {needed}x HF generate"] = row["int8_speedup_vs_hf"] >= needed
    print(json.dumps({
        "bench": "generate",
        "batch": 1,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "statistic": "median",
        "device": "cpu",
        "threads": threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "shapes": shapes,
        "targets_met": targets,
    }, indent=2))


if __name__ == "__main__":
    main()

"""What a split costs: batch-1 decoding of one model whole, and split 2 and 3 ways across devices.

Without a GPU the devices are aliased (``device.alias``: a simulated two-GPU machine whose devices are this
CPU), so each boundary costs only what hetlm adds at it (moving the hidden state, switching RoPE tables and
decoder tables), not a real copy over a bus: the figure says how much the split code path itself costs.
With ``--real`` on a CUDA machine the split runs on the real devices (``cuda:0`` and the CPU).

The model is randomly initialised at the ~11M shape (6 layers, 6 heads, d_model 384, context 512, vocabulary
4096); greedy tokens from ``<s>``, </s> ignored, so every run makes exactly ``--new-tokens`` tokens. The modes
alternate within each round (medians over ``--repeats`` rounds), and the greedy tokens of every split run must
equal the whole model's. Prints one JSON object.

    .venv/bin/python bench/placement.py [--new-tokens 300] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hetlm.config import load_config
from hetlm.model import Transformer
from hetlm.planner import detect_inventory, load_inventory, make_plan
from hetlm.preprocess import stdlib_root
from hetlm.sampling import Sampler, make_generator
from hetlm.sampling_settings import SamplingSettings
from hetlm.tokenizer import train_tokenizer, training_sentences

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["model.n_layers=6", "model.n_heads=6", "model.d_model=384", "model.context_length=512", "model.vocab_size=4096",
         "device.dtype=fp32"]
ALIASED = {
    "whole": ["device.alias=cuda:0=cpu,cuda:1=cpu", "device.layers=cuda:0=0-5"],
    "split_2": ["device.alias=cuda:0=cpu,cuda:1=cpu", "device.layers=cpu=0-2,cuda:0=3-5"],
    "split_3": ["device.alias=cuda:0=cpu,cuda:1=cpu", "device.layers=cpu=0-1,cuda:1=2-3,cuda:0=4-5"],
}
REAL = {"whole": ["device.layers=cuda:0=0-5"], "split_2": ["device.layers=cpu=0-2,cuda:0=3-5"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: the planner's)")
    parser.add_argument("--real", action="store_true", help="split across this machine's cuda:0 and CPU")
    args = parser.parse_args()

    text = "".join(p.read_text(encoding="utf-8") for p in sorted(stdlib_root().glob("*.py"))[:60])
    tokenizer = train_tokenizer(training_sentences(text), 4096)
    inventory = detect_inventory() if args.real else load_inventory(ROOT / "tests" / "inventories" / "two-gpus.json")
    modes = REAL if args.real else ALIASED
    torch.manual_seed(0)
    reference = Transformer(load_config(None, SHAPE).model).eval()
    samplers = {}
    for mode, sets in modes.items():
        config = load_config(None, [*SHAPE, *sets, f"device.threads={args.threads}"])
        plan = make_plan(inventory, config, "generate")
        plan.apply()
        model = Transformer(config.model).eval()
        model.load_state_dict(reference.state_dict())
        plan.place_model(model)
        samplers[mode] = (Sampler(model, tokenizer, plan), plan)
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for mode, (sampler, plan) in samplers.items():
            started = time.perf_counter()
            result = sampler.generate([tokenizer.bos_id], settings, make_generator(0, plan.torch_device))
            seconds[mode].append(time.perf_counter() - started)
            tokens[mode] = result.completions[0].token_ids
    same = all(ids == tokens["whole"] for ids in tokens.values())
    median = {mode: statistics.median(times) for mode, times in seconds.items()}
    report = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "devices": "real" if args.real else "aliased (every device this CPU)",
        "new_tokens": args.new_tokens,
        "greedy_tokens_equal": same,
        "modes": {mode: {"ms_per_token": round(1000 * median[mode] / args.new_tokens, 4),
                         "tokens_per_s": round(args.new_tokens / median[mode], 1),
                         "boundaries": len(samplers[mode][1].placements) - 1,
                         "layers": ";".join(f"{s.device}={s.describe()}" for s in samplers[mode][1].placements)}
                  for mode in modes},
    }
    for mode in modes:
        boundaries = report["modes"][mode]["boundaries"]
        if boundaries:
            report["modes"][mode]["cost_per_boundary"] = round((median[mode] / median["whole"] - 1) / boundaries, 4)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

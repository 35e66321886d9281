"""Training throughput: plain fp32 eager PyTorch against hetlm's planned training step. Prints JSON.

For each shape, on random tokens:
  baseline  hetlm's Transformer in fp32, eager, torch.optim.AdamW defaults, batches drawn inline;
  nanogpt   a GPT written the way nanoGPT's model.py and train.py write it, with its loop as it runs on the
            CPU (fp32, eager): learned absolute positions, LayerNorm without bias, GELU MLP, fused q/k/v,
            scaled_dot_product_attention, tied head, AdamW with decay on matrices only (fused only on CUDA,
            as nanoGPT picks), batches by torch.randint on a memmap, clipping at 1.0;
  planned   what `hetlm train` runs: the planner's dtype, compile choice and threads, AdamW fused where
            available, the background prefetch loader and the sync-free TrainStep.
All modes use the same vocabulary (--vocab) and shape, and run on the planner's threads.
MFU counts 6 x parameters + attention FLOPs per token (hetlm.model.flops_per_token; for nanogpt its own
parameters) against both the planner's peak and a square-matmul peak measured in each round, for the dtype each
mode computes in. Targets (issue 19), baby shape: planned >= 1.5x nanogpt without AMX, >= 2x with AMX.
The modes alternate for --rounds rounds and medians are reported: a shared machine's speed drifts.
The planner sizes the run by --max-steps, so its compile choice is the one a run that long would get;
where that is "off", a third mode shows the same plan compiled (what a longer run gets).

    .venv/bin/python bench/train.py [--shapes baby,10m] [--steps 20] [--rounds 3] [--warmup 5] [--vocab 0]
        [--compile auto|on|off] [--dtype auto|fp32|bf16] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_report
from torch import nn

from hetlm.config import load_config
from hetlm.data import PrefetchLoader, sample_windows
from hetlm.model import Transformer, flops_per_token, parameter_counts
from hetlm.planner import detect_inventory, make_plan
from hetlm.train import TrainStep, learning_rate_at, make_optimizer

SHAPES = {
    # nanoGPT's CPU "baby" run on characters: 0.8M parameters at vocab 65.
    "baby": {"n_layers": 4, "n_heads": 4, "d_model": 128, "context_length": 64, "vocab_size": 65, "batch": 12},
    # nanoGPT's shakespeare-char GPU shape: about 10M parameters at vocab 65.
    "10m": {"n_layers": 6, "n_heads": 6, "d_model": 384, "context_length": 256, "vocab_size": 65, "batch": 16},
}


def matmul_peak(dtype: torch.dtype, seconds: float, n: int = 2048) -> float:
    """FLOP/s of square matmuls in ``dtype`` on this process's threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def timed(step, sync, steps: int) -> float:
    """Seconds for ``steps`` steps, until ``sync`` says the device is done."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


def baseline(config, tokens: np.ndarray, batch: int):
    """A step function and its sync for the plain loop."""
    torch.manual_seed(0)
    model = Transformer(config.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    T = config.model.context_length

    def step() -> None:
        windows = sample_windows(tokens, batch, T + 1, generator)
        _, loss = model(windows[:, :-1], windows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, lambda: None, lambda: None


class NanoLayerNorm(nn.Module):
    # nanoGPT's own LayerNorm class (torch's had no bias=False when it was written); it trains without biases.
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.attn = NanoLayerNorm(n_embd), NanoAttention(n_embd, n_head)
        self.ln_2 = NanoLayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.h = nn.ModuleList(NanoBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = NanoLayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
        # nanoGPT's GPT-2 scaling of the residual projections.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def nanogpt_flops_per_token(model: NanoGPT, config) -> int:
    """nanoGPT's estimate_mfu count: 6 x parameters (position table left out, tied head counted) + attention."""
    params = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    c = config.model
    return 6 * params + 12 * c.n_layers * c.d_model * c.context_length


def nanogpt(config, bin_path: Path, batch: int):
    """A step function and its sync for nanoGPT's loop on the CPU, and its FLOPs per token."""
    torch.manual_seed(0)
    c = config.model
    model = NanoGPT(c.vocab_size, c.context_length, c.n_layers, c.n_heads, c.d_model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # nanoGPT asks for the fused AdamW only on CUDA; on the CPU it gets torch's default implementation.
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    block = c.context_length
    iteration = iter(range(10**9))

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        # nanoGPT opens the memmap afresh on every call (to avoid a memory leak it saw).
        data = np.memmap(bin_path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    batch_now = get_batch()

    def step() -> None:
        nonlocal batch_now
        it = next(iteration)
        lr = 1e-3 * min(1.0, (it + 1) / 101)  # get_lr's linear warm-up over 100 iterations
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = model(*batch_now)
        # nanoGPT draws the next batch between forward and backward.
        batch_now = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, lambda: None, lambda: None, nanogpt_flops_per_token(model, config)


def planned(config, plan, tokens: np.ndarray, batch: int):
    """A step function, its sync and its clean-up for what `hetlm train` runs."""
    torch.manual_seed(0)
    device = plan.torch_device
    model = Transformer(config.model).to(device).train()
    plan.prepare_model(model)
    optimizer = make_optimizer(model.named_parameters(), config.train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=plan.grad_scaler)
    stepper = TrainStep(model, optimizer, scaler, plan, config.train, step_model=plan.compile_model(model))
    T = config.model.context_length
    loader = PrefetchLoader(tokens, batch, T + 1, torch.Generator().manual_seed(0), prefetch=plan.prefetch,
                            device=device, pin_memory=plan.pin_memory, non_blocking=plan.non_blocking)
    counter = iter(range(10**9))

    def step() -> None:
        stepper(learning_rate_at(next(counter), config.train), loader)

    # read() waits for the device, so the timed region ends when the work does.
    return step, stepper.read, loader.close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="baby,10m", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, alternating the modes; medians are reported")
    parser.add_argument("--max-steps", type=int, default=5000,
                        help="train.max_steps the planner sizes the run by (5000: nanoGPT's shakespeare-char run)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the shape's own, 65 characters)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="device.compile for the planned mode")
    parser.add_argument("--threads", type=int, default=0, help="device.threads (0: the planner's choice)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="device.dtype for the planned modes")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="time spent measuring each matmul peak")
    args = parser.parse_args()

    inventory = detect_inventory()
    cpu = cpu_report()
    report = {
        "benchmark": "train",
        "torch": torch.__version__,
        "machine": f"{inventory.cpu.model_name}, {inventory.cpu.cores} cores, {platform.system()}",
        "cpu": cpu,
        "note": "CPU figures from a machine whose 2 cores were shared with other processes are noisy",
        "shapes": {},
    }
    scratch = tempfile.TemporaryDirectory(prefix="hetlm-bench-train-")
    for name in args.shapes.split(","):
        shape = dict(SHAPES[name])
        batch = shape.pop("batch")
        shape["vocab_size"] = args.vocab or shape["vocab_size"]
        tokens = np.random.default_rng(0).integers(0, shape["vocab_size"], 1_000_000, dtype=np.int64).astype(np.uint16)
        bin_path = Path(scratch.name) / f"{name}.bin"
        tokens.tofile(bin_path)
        overrides = [f"model.{k}={v}" for k, v in shape.items()] + [f"train.micro_batch_size={batch}",
            f"device.compile={args.compile}", f"device.threads={args.threads}", f"train.max_steps={args.max_steps}",
            f"device.dtype={args.dtype}",
        ]
        config = load_config(None, overrides)
        plan = make_plan(inventory, config, "train")
        plan.apply()
        fpt = flops_per_token(config.model)
        tokens_per_step = batch * config.model.context_length
        entry = {"params": parameter_counts(config.model)["total"], "flops_per_token": fpt, "batch": batch,
                 "threads": plan.threads, "plan_peak_flops": plan.peak_flops}
        plans = {"baseline": None, "nanogpt": None, "planned": plan}
        if not plan.compile and args.compile == "auto" and inventory.compiler:
            # What a run long enough for the planner to compile gets.
            plans["planned_compiled"] = make_plan(inventory, load_config(None, [*overrides, "device.compile=on"]), "train")
        runs = {}
        for mode, mode_plan in plans.items():
            mode_fpt = fpt
            if mode == "nanogpt":
                step, sync, close, mode_fpt = nanogpt(config, bin_path, batch)
            elif mode_plan is None:
                step, sync, close = baseline(config, tokens, batch)
            else:
                step, sync, close = planned(config, mode_plan, tokens, batch)
            # The untimed warm-up steps are where compilation happens.
            runs[mode] = (step, sync, close, timed(step, sync, args.warmup), [], mode_plan.dtype if mode_plan else "fp32",
                          mode_fpt)
        on_cpu = plan.torch_device.type == "cpu"
        peaks: dict[str, list[float]] = {run[5]: [] for run in runs.values()} if on_cpu else {}
        try:
            # Peaks are measured in every round too: on a shared machine the achievable rate drifts.
            for _ in range(args.rounds):
                for dtype, measured in peaks.items():
                    measured.append(matmul_peak(torch.bfloat16 if dtype == "bf16" else torch.float32, args.peak_seconds))
                for step, sync, _, _, times, *_ in runs.values():
                    times.append(timed(step, sync, args.steps))
        finally:
            for _, _, close, *_ in runs.values():
                close()
        for mode, (_, _, _, warm, times, dtype, mode_fpt) in runs.items():
            mode_plan = plans[mode]
            if mode == "nanogpt":
                label = "nanoGPT-style GPT, fp32 eager, AdamW (not fused on the CPU), torch.randint batches on a memmap"
            elif mode_plan is None:
                label = "fp32 eager, AdamW default (foreach), inline batches"
            else:
                probe = make_optimizer(torch.nn.Linear(1, 1).named_parameters(), config.train, mode_plan.torch_device)
                fused = "fused" if probe.param_groups[0].get("fused") else "foreach"
                scope = "the whole forward" if mode_plan.compile_whole else "blocks"
                label = (f"{mode_plan.dtype} (attention {mode_plan.attention_dtype}) on {mode_plan.device}, "
                         f"compile {f'on ({scope})' if mode_plan.compile else 'off'}, AdamW {fused}, prefetch thread")
            rates = sorted(args.steps * tokens_per_step / t for t in times)
            rate = statistics.median(rates)
            result = {"mode": label, "tokens_per_s": round(rate), "tokens_per_s_rounds": [round(r) for r in rates],
                      "step_ms": round(1000 * tokens_per_step / rate, 2), "warmup_s": round(warm, 2),
                      "mfu_vs_plan_peak": round(rate * mode_fpt / plan.peak_flops, 4)}
            if mode_fpt != fpt:
                result["flops_per_token"] = mode_fpt
            if dtype in peaks:
                peak = statistics.median(peaks[dtype])
                result["measured_matmul_peak_gflops"] = round(peak / 1e9, 1)
                result["matmul_peak_gflops_rounds"] = [round(p / 1e9) for p in sorted(peaks[dtype])]
                result["mfu_vs_measured_peak"] = round(rate * mode_fpt / peak, 4)
            entry[mode] = result
        entry["compile_decision"] = next(d.reason for d in plan.decisions if d.stage == "compile")
        for mode in plans:
            if mode.startswith("planned"):
                entry[f"speedup_{mode}"] = round(entry[mode]["tokens_per_s"] / entry["baseline"]["tokens_per_s"], 3)
                entry[f"speedup_{mode}_vs_nanogpt"] = round(entry[mode]["tokens_per_s"] / entry["nanogpt"]["tokens_per_s"], 3)
        if name == "baby":
            needed = 2.0 if cpu["flags"]["amx_tile"] else 1.5
            entry["target"] = f"planned >= {needed}x nanogpt ({'AMX' if cpu['flags']['amx_tile'] else 'no AMX'})"
            entry["target_met"] = entry["speedup_planned_vs_nanogpt"] >= needed
        report["shapes"][name] = entry
    scratch.cleanup()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

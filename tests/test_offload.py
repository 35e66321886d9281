"""Training that trades memory: activation checkpointing and the CPU optimizer offload give the plain run's weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hetlm.config import load_config
from hetlm.model import Transformer
from hetlm.offload import OptimizerOffload
from hetlm.planner import Inventory, load_inventory, make_plan, memory_estimate
from hetlm.store import RunDir
from hetlm.train import make_optimizer

INVENTORIES = Path(__file__).parent / "inventories"
TINY = {
    "model": {"n_layers": 4, "d_model": 32, "n_heads": 2, "context_length": 32},
    "train": {"micro_batch_size": 4, "global_batch_tokens": 256, "max_steps": 12, "warmup_steps": 3,
              "learning_rate": 0.003, "min_lr": 0.0003, "eval_every": 6, "eval_windows": 4, "log_every": 3,
              "checkpoint_every": 6, "keep_last": 5, "deterministic": True},
    "device": {"threads": 1, "compile": "off", "dtype": "fp32"},
}


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config_file(tmp_path: Path, data: Path, **changes: dict) -> Path:
    config = {section: dict(values) for section, values in TINY.items()}
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    config["data"] = {"dir": str(data)}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(RunDir(run).checkpoints()[-1].path / "model.safetensors"))


def trained(cli, tmp_path, data, name, *sets, **changes) -> Path:
    run = tmp_path / name
    args = [arg for s in sets for arg in ("--set", s)]
    result = cli("train", "--config", config_file(tmp_path, data, **changes), "--out", run, *args)
    assert result.code == 0, result.err
    return run


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_and_offload_give_the_plain_runs_weights_bitwise(cli, tiny_data, tmp_path, dropout):
    model = {"model": {**TINY["model"], "dropout": dropout}}
    plain = final_weights(trained(cli, tmp_path, tiny_data, "plain", "train.activation_checkpointing=none",
                                  "train.optimizer_offload=off", **model))
    for sets in (["train.activation_checkpointing=all"], ["train.activation_checkpointing=2"],
                 ["train.optimizer_offload=on"], ["train.optimizer_offload=on", "train.activation_checkpointing=all"]):
        run = trained(cli, tmp_path, tiny_data, "-".join(sets).replace("=", "_"), *sets, **model)
        other = final_weights(run)
        assert other.keys() == plain.keys()
        assert all(torch.equal(other[k], plain[k]) for k in plain), sets


def test_resume_is_exact_with_offload_switched_on_or_off(cli, tiny_data, tmp_path):
    # decay_steps fixes the schedule, so stopping at step 6 and going on to 12 is the straight run's schedule.
    straight = final_weights(trained(cli, tmp_path, tiny_data, "straight", "train.optimizer_offload=off",
                                     train={**TINY["train"], "decay_steps": 12}))
    for first, second in (("on", "off"), ("off", "on")):
        run = trained(cli, tmp_path, tiny_data, f"{first}-{second}", f"train.optimizer_offload={first}",
                      train={**TINY["train"], "max_steps": 6, "decay_steps": 12})
        again = cli("train", "--config", tmp_path / "tiny.yaml", "--out", run, "--max-steps", "12",
                    "--set", f"train.optimizer_offload={second}", "--set", "train.max_steps=12")
        assert again.code == 0 and "from step 6" in again.err, again.err
        resumed = final_weights(run)
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), (first, second)


def test_the_plan_and_the_log_say_what_was_chosen(cli, tiny_data, tmp_path):
    run = trained(cli, tmp_path, tiny_data, "said", "train.optimizer_offload=on", "train.activation_checkpointing=2")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    shown = cli("plan", "--config", tmp_path / "tiny.yaml", "--set", "train.optimizer_offload=on", "--set",
                "train.activation_checkpointing=2")
    assert "optimizer offload" in shown.out and "2 of 4 blocks" in shown.out


def steps_with_offload(speculative: bool, clip: float, poison_step: int | None) -> list[torch.Tensor]:
    """Weights after a few steps of a tiny model through OptimizerOffload; ``poison_step`` makes that step's loss inf."""
    config = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                                "model.context_length=16", f"train.grad_clip={clip}"])
    torch.manual_seed(0)
    model = Transformer(config.model).train()
    offload = OptimizerOffload(model, config.train, make_optimizer, speculative=speculative)
    data = torch.randint(0, 64, (6, 4, 17), generator=torch.Generator().manual_seed(1))
    bad = []
    try:
        for step, batch in enumerate(data):
            offload.arm(3e-3)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            if step == poison_step:
                loss = loss * math.inf
            loss.backward()
            _, skipped = offload.finish(loss.detach(), clip or math.inf)
            bad.append(bool(skipped))
            model.zero_grad(set_to_none=True)
    finally:
        offload.close()
    assert bad == [step == poison_step for step in range(len(data))]
    return [p.detach().clone() for p in model.parameters()]


def plain_steps(clip: float, poison_step: int | None) -> list[torch.Tensor]:
    config = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                                "model.context_length=16", f"train.grad_clip={clip}"])
    torch.manual_seed(0)
    model = Transformer(config.model).train()
    optimizer = make_optimizer(model.named_parameters(), config.train, torch.device("cpu"))
    data = torch.randint(0, 64, (6, 4, 17), generator=torch.Generator().manual_seed(1))
    for step, batch in enumerate(data):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3
        _, loss = model(batch[:, :-1], batch[:, 1:])
        if step == poison_step:
            loss = loss * math.inf
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf, foreach=True)
        optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("clip", "poison"), [(0.05, None), (0.0, 2), (0.05, 3), (100.0, None)])
def test_speculative_steps_equal_the_waiting_path_and_the_plain_optimizer(clip, poison):
    # clip 0.05 clips every step (the speculative steps are put back and made again); 100 never does.
    speculative = steps_with_offload(True, clip, poison)
    waiting = steps_with_offload(False, clip, poison)
    plain = plain_steps(clip, poison)
    for a, b, c in zip(speculative, waiting, plain, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


# --- the planner ----------------------------------------------------------------------------------


ONE_B = ["model.n_layers=16", "model.d_model=2048", "model.n_heads=16", "model.context_length=2048",
         "data.vocab_size=32000", "train.micro_batch_size=2"]


def eight_gb(*sets: str):
    return make_plan(load_inventory(INVENTORIES / "one-8gb-gpu.json"), load_config(None, [*ONE_B, *sets]), "train")


def test_a_1b_model_on_an_8gb_gpu_trains_only_with_checkpointing_and_offload():
    plan = eight_gb()
    assert plan.fits and plan.optimizer_offload and plan.checkpoint_every
    assert not eight_gb("train.activation_checkpointing=none").fits
    assert not eight_gb("train.optimizer_offload=off").fits
    cpu = next(m for m in plan.memory if m.device == "cpu")
    assert cpu.optimizer > 0 and plan.memory[0].optimizer == 0


def test_shrinking_memory_moves_from_plain_to_checkpointing_to_offload_to_refusal():
    sets = ["model.n_layers=8", "model.d_model=512", "model.n_heads=8", "model.context_length=512",
            "data.vocab_size=8192", "train.micro_batch_size=8"]
    seen = []
    for mib in range(4000, 200, -100):
        plan = make_plan(load_inventory(INVENTORIES / "one-8gb-gpu.json"),
                         load_config(None, [*sets, f"device.memory=cuda:0={mib}MiB"]), "train")
        stage = "refused" if not plan.fits else "offload" if plan.optimizer_offload else \
            "checkpointing" if plan.checkpoint_every else "plain"
        # Never a fit the estimate says exceeds the budget.
        assert not plan.fits or all(m.total <= m.available for m in plan.memory)
        if not seen or seen[-1] != stage:
            seen.append(stage)
    assert seen == ["plain", "checkpointing", "offload", "refused"], seen


@pytest.mark.parametrize("mib", [1600, 2000, 4000, 16000])
def test_micro_batch_auto_takes_the_largest_that_fits(mib):
    sets = ["model.n_layers=8", "model.d_model=512", "model.n_heads=8", "model.context_length=512",
            "data.vocab_size=8192", "train.micro_batch_size=0", "train.global_batch_tokens=65536",
            "train.activation_checkpointing=none", "train.optimizer_offload=off", f"device.memory=cuda:0={mib}MiB"]
    config = load_config(None, sets)
    plan = make_plan(load_inventory(INVENTORIES / "one-8gb-gpu.json"), config, "train")
    micro, available = plan.micro_batch_size, mib * 2**20
    assert memory_estimate(config, "cuda:0", micro, plan.dtype, True, available).fits
    larger = micro + 1
    assert micro == 128 or not memory_estimate(config, "cuda:0", larger, plan.dtype, True, available).fits or \
        128 % larger != 0
    assert plan.micro_batch_size * plan.accumulation >= 128 > (plan.accumulation - 1) * plan.micro_batch_size


def test_on_the_cpu_the_optimizer_stays_in_ram_where_it_already_is():
    plan = make_plan(Inventory.from_dict(json.loads((INVENTORIES / "no-gpu.json").read_text())),
                     load_config(None, ["train.micro_batch_size=0"]), "train")
    assert not plan.optimizer_offload and plan.micro_batch_size == 16 and plan.accumulation == 1


def test_offload_in_bf16_computes_in_bf16_and_checkpoints_the_fp32_masters(cli, tiny_data, tmp_path):
    run = trained(cli, tmp_path, tiny_data, "bf16", "train.optimizer_offload=on", "device.dtype=bf16")
    weights = final_weights(run)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    # Masters keep what bf16 would round away: some weights are not bf16-representable.
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in weights.values())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]

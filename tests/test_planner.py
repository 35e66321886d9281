import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_error

from hetlm.config import load_config
from hetlm.errors import HetlmError, UsageError
from hetlm.planner import (
    Inventory,
    RankProfile,
    detect_inventory,
    lay_out_ranks,
    load_inventory,
    make_plan,
    memory_estimate,
)

INVENTORIES = Path(__file__).parent / "inventories"
GPT2_SMALL = ["model.n_layers=12", "model.d_model=768", "model.n_heads=12", "model.context_length=1024", "data.vocab_size=50257"]


def inventory(name: str) -> Inventory:
    return load_inventory(INVENTORIES / f"{name}.json")


def plan_for(name: str, *sets: str, workload: str = "train", **kwargs):
    return make_plan(inventory(name), load_config(None, list(sets)), workload, **kwargs)


def decision(plan, stage: str):
    return next(d for d in plan.decisions if d.stage == stage)


@pytest.mark.parametrize("path", sorted(INVENTORIES.glob("*.json")), ids=lambda p: p.stem)
def test_inventory_files_round_trip(path):
    loaded = load_inventory(path)
    assert Inventory.from_dict(json.loads(json.dumps(loaded.to_dict()))) == loaded
    assert loaded.to_dict() == json.loads(path.read_text())


def test_detect_inventory_on_this_machine(monkeypatch):
    monkeypatch.delenv("HETLM_INVENTORY", raising=False)
    found = detect_inventory()
    assert found.platform == sys.platform
    assert 1 <= found.cpu.cores <= found.cpu.logical_cpus
    assert found.cpu.ram_bytes > 2**28
    assert len(found.cuda) == torch.cuda.device_count()
    assert found.mps == torch.backends.mps.is_available()
    if sys.platform.startswith("linux"):
        flags = Path("/proc/cpuinfo").read_text().split()
        assert found.cpu.amx == ("amx_bf16" in flags)
        assert found.cpu.avx512 == ("avx512f" in flags)
    # A plan can always be made for the machine we are on.
    assert make_plan(found, load_config(None, [])).threads >= 1


def test_environment_variable_simulates_a_machine(monkeypatch):
    monkeypatch.setenv("HETLM_INVENTORY", str(INVENTORIES / "two-gpus.json"))
    assert detect_inventory() == inventory("two-gpus")


def test_bad_inventory_files(tmp_path):
    with pytest.raises(UsageError, match="inventory file not found"):
        load_inventory(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not a readable JSON inventory"):
        load_inventory(bad)
    data = inventory("one-8gb-gpu").to_dict()
    del data["cpu"]["ram_bytes"]
    bad.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="missing field cpu.ram_bytes"):
        load_inventory(bad)
    data = inventory("one-8gb-gpu").to_dict()
    data["cuda"][0]["bf16"] = "yes"
    bad.write_text(json.dumps(data))
    with pytest.raises(UsageError, match=r"cuda\[0\].bf16 must be bool"):
        load_inventory(bad)


def test_no_gpu_amx_cpu():
    tiny = plan_for("no-gpu")
    assert (tiny.device, tiny.threads, tiny.pin_memory, tiny.non_blocking, tiny.grad_scaler) == ("cpu", 2, False, False, False)
    # AMX: bf16 matmuls, with attention upcast to fp32 around the CPU's slow bf16 attention kernel.
    assert tiny.dtype == "bf16" and "AMX" in decision(tiny, "dtype").reason
    assert tiny.attention_dtype == "fp32" and "flash-attention" in decision(tiny, "attention").reason
    assert tiny.compile is False and "would not pay back" in decision(tiny, "compile").reason
    assert tiny.peak_flops == pytest.approx(2 * 300e9)
    assert tiny.placements[0].layers == (0, 4) and tiny.fits

    wide = plan_for("no-gpu", "model.d_model=512", "model.n_heads=8", "train.max_steps=20000")
    assert wide.dtype == "bf16" and "AMX" in decision(wide, "dtype").reason
    assert wide.compile is True
    assert wide.peak_flops == pytest.approx(2 * 300e9)
    # A time limit bounds the run, so the compile no longer pays back.
    capped = plan_for("no-gpu", "model.d_model=512", "model.n_heads=8", "train.max_steps=20000", "train.max_time=1m")
    assert capped.compile is False
    # Residual dropout compiles; attention dropout takes CPU attention off the flash kernel, where compiling does not pay.
    dropout = plan_for("no-gpu", "model.d_model=512", "model.n_heads=8", "train.max_steps=20000", "model.dropout=0.1")
    assert dropout.compile is True
    attention = plan_for("no-gpu", "model.d_model=512", "model.n_heads=8", "train.max_steps=20000",
                         "model.attention_dropout=0.1")
    assert attention.dtype == "bf16" and attention.compile is False
    assert "flash kernel" in decision(attention, "compile").reason
    assert attention.memory[0].activations > dropout.memory[0].activations


def test_cpu_without_amx_stays_fp32():
    plan = plan_for("cpu-no-amx", "model.d_model=512", "model.n_heads=8")
    assert plan.device == "cpu" and plan.dtype == "fp32"
    assert "no AMX or AVX512-BF16" in decision(plan, "dtype").reason
    assert plan.threads == 6  # physical cores, not the 12 hyperthreads
    assert plan.preprocess_workers == 12


def test_one_8gb_gpu():
    plan = plan_for("one-8gb-gpu")
    assert (plan.device, plan.dtype, plan.grad_scaler) == ("cuda:0", "bf16", False)
    assert plan.pin_memory and plan.non_blocking and "pinned" in decision(plan, "data loading").choice
    assert plan.threads <= 4
    assert plan.peak_flops == pytest.approx(40.6e12)
    assert plan.fits and plan.memory[0].available == inventory("one-8gb-gpu").cuda[0].free_memory
    assert plan.compile is False  # a 1000-step toy run on a GPU is over in seconds
    long_run = plan_for("one-8gb-gpu", *GPT2_SMALL, "train.micro_batch_size=2", "train.max_steps=5000")
    assert long_run.compile is True and long_run.fits


def test_two_gpus():
    plan = plan_for("two-gpus")
    assert plan.device == "cuda:0"
    assert "torchrun --nproc_per_node 2" in decision(plan, "parallelism").reason
    second = plan_for("two-gpus", world_size=2, local_rank=1)
    assert second.device == "cuda:1" and "DDP x2 (NCCL)" in decision(second, "parallelism").choice
    with pytest.raises(UsageError, match="3 processes but only 2 CUDA"):
        plan_for("two-gpus", world_size=3, local_rank=2)


def test_apple_mps():
    plan = plan_for("apple-mps")
    assert (plan.device, plan.dtype, plan.compile, plan.pin_memory) == ("mps", "fp32", False, False)
    assert plan.memory[0].available == int(inventory("apple-mps").cpu.ram_bytes * 2 / 3)
    with pytest.raises(UsageError, match="MPS cannot be shared"):
        plan_for("apple-mps", "device.device=mps", world_size=2)
    assert plan_for("apple-mps", world_size=2).device == "cpu"


def test_old_gpu_uses_fp16_with_a_grad_scaler():
    plan = plan_for("old-gpu")
    assert (plan.device, plan.dtype, plan.grad_scaler) == ("cuda:0", "fp16", True)
    assert "7.5 < 8.0" in decision(plan, "dtype").reason
    assert plan.autocast_dtype == torch.float16
    assert plan_for("old-gpu", workload="infer").grad_scaler is False
    with pytest.raises(UsageError, match="Tesla T4 .* has no bf16"):
        plan_for("old-gpu", "device.dtype=bf16")


def test_windows_never_compiles_by_default():
    long_run = ("train.max_steps=1000000",)
    assert plan_for("windows-gpu", *long_run).compile is False
    assert plan_for("windows-gpu", *long_run, 'device.compile="on"').compile is True
    assert plan_for("one-8gb-gpu", *long_run, "model.d_model=512", "model.n_heads=8").compile is True


def test_model_that_does_not_fit_gets_a_proposal():
    sets = [*GPT2_SMALL, "train.micro_batch_size=64"]
    plan = plan_for("one-8gb-gpu", *sets)
    assert not plan.fits and not plan.memory[0].fits
    memory = decision(plan, "memory")
    assert memory.choice == "does not fit"
    proposed = int(memory.reason.split("train.micro_batch_size=")[1].split()[0])
    steps = int(memory.reason.split("(")[1].split()[0])
    assert f"train.global_batch_tokens={64 * 1024}" in memory.reason
    assert 1 <= proposed < 64 and proposed * steps == 64
    config = load_config(None, sets)
    available = plan.memory[0].available
    spacing = plan.checkpoint_every
    assert memory_estimate(config, "cuda:0", proposed, "bf16", True, available, spacing).fits
    assert not memory_estimate(config, "cuda:0", proposed * 2, "bf16", True, available, spacing).fits
    # The proposal itself plans as fitting.
    assert plan_for("one-8gb-gpu", *sets[:-1], f"train.micro_batch_size={proposed}").fits

    hopeless = plan_for("one-8gb-gpu", *GPT2_SMALL, "model.n_layers=400", "train.micro_batch_size=4")
    assert "even at train.micro_batch_size=1" in decision(hopeless, "memory").reason


def test_memory_estimate_grows_as_expected():
    config = load_config(None, [])
    a = memory_estimate(config, "cpu", 8, "fp32", True, 2**40)
    b = memory_estimate(config, "cpu", 16, "fp32", True, 2**40)
    assert b.activations == 2 * a.activations and b.logits == 2 * a.logits and b.weights == a.weights
    assert a.optimizer == 2 * a.gradients == 2 * a.weights
    assert memory_estimate(config, "cpu", 8, "bf16", True, 2**40).activations < a.activations
    infer = memory_estimate(config, "cpu", 8, "fp32", False, 2**40)
    assert infer.gradients == infer.optimizer == 0 and infer.total < a.total
    assert a.total == a.weights + a.gradients + a.optimizer + a.activations + a.logits + a.overhead
    assert not memory_estimate(config, "cpu", 8, "fp32", True, a.total - 1).fits
    # The vocabulary comes from the data section unless the model section sets it.
    bigger = load_config(None, ["data.vocab_size=8192"])
    assert memory_estimate(bigger, "cpu", 8, "fp32", True, 2**40).weights > a.weights
    pinned = load_config(None, ["data.vocab_size=8192", "model.vocab_size=4096"])
    assert memory_estimate(pinned, "cpu", 8, "fp32", True, 2**40).weights == a.weights


def test_overrides():
    assert plan_for("one-8gb-gpu", "device.device=cpu").device == "cpu"
    assert plan_for("one-8gb-gpu", "device.dtype=fp32").dtype == "fp32"
    assert plan_for("no-gpu", "device.threads=3").threads == 3
    assert plan_for("no-gpu", 'device.compile="on"').compile is True
    assert plan_for("no-gpu", "device.prefetch=9").prefetch == 9
    assert plan_for("two-gpus", "device.device=cuda:1").device == "cuda:1"
    assert "emulated" in decision(plan_for("cpu-no-amx", "device.dtype=bf16"), "dtype").reason
    with pytest.raises(UsageError, match="no CUDA device"):
        plan_for("no-gpu", "device.device=cuda")
    with pytest.raises(UsageError, match="only 2 CUDA device"):
        plan_for("two-gpus", "device.device=cuda:2")
    with pytest.raises(UsageError, match="no Apple MPS"):
        plan_for("no-gpu", "device.device=mps")


def test_preprocess_and_infer_workloads():
    pre = plan_for("one-8gb-gpu", workload="preprocess")
    assert (pre.device, pre.preprocess_workers, pre.memory) == ("cpu", 16, ())
    assert plan_for("one-8gb-gpu", "data.workers=3", workload="preprocess").preprocess_workers == 3
    infer = plan_for("no-gpu", "train.max_steps=10000000", workload="infer")
    assert infer.compile is False and infer.memory[0].optimizer == 0
    with pytest.raises(UsageError, match="workload must be one of"):
        plan_for("no-gpu", workload="deploy")


def test_decode_weights_follow_the_device_and_sample_quantize():
    assert plan_for("no-gpu", workload="infer").decode_weights == "fp32"
    assert plan_for("one-8gb-gpu", workload="infer").decode_weights == plan_for("one-8gb-gpu", workload="infer").dtype
    int8 = plan_for("no-gpu", "sample.quantize=int8", workload="infer")
    assert int8.decode_weights == "int8" and "int8" in decision(int8, "decode weights").reason
    on_gpu = plan_for("one-8gb-gpu", "sample.quantize=int8", workload="infer")
    assert on_gpu.decode_weights == on_gpu.dtype and "CPU only" in decision(on_gpu, "decode weights").reason
    assert not any(d.stage == "decode weights" for d in plan_for("no-gpu", "sample.quantize=int8").decisions)
    with pytest.raises(UsageError, match="multiples of 16.*d_model 72"):
        plan_for("no-gpu", "sample.quantize=int8", "model.d_model=72", "model.n_heads=4", workload="infer")
    with pytest.raises(UsageError, match="multiples of 16.*d_ff 100"):
        plan_for("no-gpu", "sample.quantize=int8", "model.d_ff=100", workload="infer")
    # Training and evaluation never decode with int8, so a config that asks for it still trains.
    assert plan_for("no-gpu", "sample.quantize=int8", "model.d_model=72", "model.n_heads=4").decode_weights == "fp32"
    with pytest.raises(UsageError, match="sample.quantize must be one of none, int8"):
        plan_for("no-gpu", "sample.quantize=int4", workload="infer")


def test_make_plan_is_pure():
    config = load_config(None, [*GPT2_SMALL, "train.micro_batch_size=64"])
    before = config.to_dict()
    machine = inventory("one-8gb-gpu")
    first = make_plan(machine, config)
    assert make_plan(machine, config) == first
    assert make_plan(inventory("one-8gb-gpu"), load_config(None, [*GPT2_SMALL, "train.micro_batch_size=64"])) == first
    assert config.to_dict() == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.device = "cpu"


def test_autocast_and_apply_on_this_machine():
    bf16 = plan_for("no-gpu", "model.d_model=512", "model.n_heads=8")
    a = torch.ones(4, 4)
    with bf16.autocast():
        assert (a @ a).dtype == torch.bfloat16
    with plan_for("cpu-no-amx").autocast():
        assert (a @ a).dtype == torch.float32
    threads = torch.get_num_threads()
    try:
        plan_for("no-gpu", "device.device=cpu", "device.threads=1").apply()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    # A simulated machine with one GPU more than this one has: its last GPU is missing here, whatever this machine is.
    data = json.loads((INVENTORIES / "one-8gb-gpu.json").read_text())
    data["cuda"] = [dict(data["cuda"][0], index=i) for i in range(torch.cuda.device_count() + 1)]
    absent = make_plan(Inventory.from_dict(data), load_config(None, [f"device.device=cuda:{len(data['cuda']) - 1}"]))
    with pytest.raises(HetlmError, match="does not have"):
        absent.apply()


@pytest.mark.parametrize("name", ["no-gpu", "one-8gb-gpu", "two-gpus", "apple-mps", "old-gpu", "cpu-no-amx"])
def test_cli_json_matches_make_plan(cli, name):
    result = cli("plan", "--inventory", INVENTORIES / f"{name}.json", "--json", "--set", "train.max_steps=50")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data == json.loads(json.dumps(plan_for(name, "train.max_steps=50").to_dict()))
    assert data["fits"] is True and data["inventory"]["platform"] in ("linux", "darwin")


def test_cli_tables(cli, monkeypatch):
    result = cli("plan", "--inventory", INVENTORIES / "old-gpu.json")
    assert result.code == 0, result.err
    for text in ("Inventory", "Tesla T4", "fp16", "grad scaler", "Memory per device", "fits"):
        assert text in result.out
    monkeypatch.setenv("HETLM_INVENTORY", str(INVENTORIES / "apple-mps.json"))
    result = cli("plan", "--workload", "infer")
    assert result.code == 0 and "Plan: infer on mps" in result.out


def test_cli_does_not_fit_still_exits_zero(cli):
    sets = [arg for key in GPT2_SMALL for arg in ("--set", key)]
    result = cli("plan", "--inventory", INVENTORIES / "one-8gb-gpu.json", *sets, "--set", "train.micro_batch_size=64")
    assert result.code == 0
    assert "does not fit" in result.out and "train.micro_batch_size=" in result.out
    as_json = cli("plan", "--inventory", INVENTORIES / "one-8gb-gpu.json", *sets, "--set", "train.micro_batch_size=64", "--json")
    assert json.loads(as_json.out)["fits"] is False


def test_cli_errors(cli, tmp_path):
    result = cli("plan", "--inventory", INVENTORIES / "no-gpu.json", "--set", "device.device=cuda")
    assert result.code == 2 and "no CUDA device" in result.err and result.out == ""
    assert len(result.err.strip().splitlines()) == 1
    result = cli("plan", "--inventory", tmp_path / "nope.json")
    assert result.code == 2 and "inventory file not found" in result.err
    result = cli("plan", "--inventory", INVENTORIES / "no-gpu.json", "--workload", "dance")
    assert result.code == 2 and "workload must be one of" in result.err


def test_threads_leave_busy_cores_to_the_programs_using_them():
    data = json.loads((INVENTORIES / "no-gpu.json").read_text())
    idle = make_plan(Inventory.from_dict(data), load_config(None, []))
    assert idle.threads == 2 and "load at start" not in decision(idle, "threads").reason
    data["cpu"].update(load=1.2, wait_policy="passive")
    busy = make_plan(Inventory.from_dict(data), load_config(None, []))
    assert busy.threads == 1 and busy.preprocess_workers == 1
    assert "load at start is 1.2 on 2 CPUs" in decision(busy, "threads").reason
    assert "OMP_WAIT_POLICY=passive" in decision(busy, "threads").reason
    data["cpu"]["load"] = 7.5
    assert make_plan(Inventory.from_dict(data), load_config(None, [])).threads == 1
    assert make_plan(Inventory.from_dict(data), load_config(None, ["device.threads=2"])).threads == 2
    assert "about" in decision(idle, "training time").choice


def test_the_wait_policy_turns_passive_under_load_before_torch_starts():
    script = "import hetlm.openmp as o; o.load_now = lambda: LOAD; print(o.set_wait_policy())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    busy = subprocess.run([sys.executable, "-c", script.replace("LOAD", "64.0")], env=env, capture_output=True, text=True)
    idle = subprocess.run([sys.executable, "-c", script.replace("LOAD", "0.0")], env=env, capture_output=True, text=True)
    chosen = subprocess.run([sys.executable, "-c", script.replace("LOAD", "64.0")], capture_output=True, text=True,
                            env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert (busy.stdout.strip(), idle.stdout.strip(), chosen.stdout.strip()) == ("passive", "default", "active")


BIG = ["model.n_layers=20", "model.d_model=1536", "model.n_heads=12", "model.context_length=1024", "data.vocab_size=50257"]


def test_fsdp_when_the_training_state_does_not_fit_a_replica():
    # ~640M parameters: 16 bytes each of weights, gradients and AdamW state overflow the 8 GB card, not the 24 GB one.
    small = plan_for("24gb-and-8gb-gpus", *BIG, world_size=2, local_rank=1)
    assert small.parallel == "fsdp" and small.fits, small.decisions
    assert decision(small, "parallelism").choice == "FSDP x2 (NCCL)"
    large = plan_for("24gb-and-8gb-gpus", *BIG, world_size=2, local_rank=0)
    assert large.parallel == "ddp" and large.fits
    # Sharded, each process holds half the state plus what it gathers whole.
    assert small.memory[0].optimizer == large.memory[0].optimizer // 2
    forced = plan_for("24gb-and-8gb-gpus", *BIG, "train.parallel=ddp", world_size=2, local_rank=1)
    assert forced.parallel == "ddp" and not forced.fits
    assert plan_for("24gb-and-8gb-gpus", "train.parallel=fsdp", world_size=2, local_rank=0).parallel == "fsdp"
    assert plan_for("24gb-and-8gb-gpus").parallel == "none"
    with pytest.raises(UsageError, match="train.parallel=fsdp shards the model over processes started by torchrun"):
        plan_for("24gb-and-8gb-gpus", "train.parallel=fsdp")


def test_plan_nproc_gives_each_process_a_share_by_speed(cli):
    path = INVENTORIES / "24gb-and-8gb-gpus.json"
    result = cli("plan", "--inventory", path, "--config", "configs/small.yaml", "--nproc", "2", "--json")
    assert result.code == 0, result.err
    shown = json.loads(result.out)
    ranks = shown["ranks"]
    assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"] and shown["parallel"] == "ddp"
    # The faster card takes more of the step, and the predicted wait for the slowest shrinks against equal shares.
    assert ranks[0]["sequences"] > ranks[1]["sequences"]
    assert shown["idle_seconds"] < shown["equal_idle_seconds"]
    for rank in ranks:
        assert sum(rank["micro_sizes"]) == rank["sequences"]
    table = cli("plan", "--inventory", path, "--config", "configs/small.yaml", "--nproc", "2")
    assert "Processes (DDP" in table.out and "with equal shares" in table.out
    # No data folder: the vocabulary is BIG's.
    sets = [a for s in [*BIG, "data.dir=no-such-folder"] for a in ("--set", s)]
    sharded = json.loads(cli("plan", "--inventory", path, *sets, "--nproc", "2", "--json").out)
    assert sharded["parallel"] == "fsdp"
    # FSDP2: the same number of micro-batches on every process.
    assert len({len(r["micro_sizes"]) for r in sharded["ranks"]}) == 1
    one_error(cli("plan", "--nproc", "2", "--workload", "generate"), 2)


def test_rank_layouts():
    config = load_config(None, [*BIG, "train.global_batch_tokens=16384"])
    fast = RankProfile("cuda:0", 100e12, 4, "ddp")
    slow = RankProfile("cuda:1", 25e12, 4, "ddp")
    weighted = lay_out_ranks(config, [fast, slow], [1.0, 3.0], 16)
    assert [r.sequences for r in weighted] == [4, 12] and weighted[1].micro_sizes == (4, 4, 4)
    balanced = lay_out_ranks(config, [fast, slow], None, 16)
    assert sum(r.sequences for r in balanced) == 16
    assert max(r.step_seconds for r in balanced) < max(r.step_seconds for r in lay_out_ranks(
        config, [fast, slow], [1.0, 1.0], 16))
    sharded = [dataclasses.replace(p, parallel="fsdp") for p in (fast, slow)]
    assert [r.micro_sizes for r in lay_out_ranks(config, sharded, [1.0, 3.0], 16)] == [(2, 1, 1), (4, 4, 4)]
    with pytest.raises(UsageError, match="same number of micro-batches"):
        lay_out_ranks(config, sharded, [1.0, 15.0], 16)
    with pytest.raises(UsageError, match="cannot give each of 2 processes one"):
        lay_out_ranks(config, [fast, slow], None, 1)

"""Splitting a model over devices: the planner's layer maps, and split runs equal to unsplit ones on aliased devices."""

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from hetlm.config import load_config
from hetlm.errors import UsageError
from hetlm.placement import DeviceSpec, Segment, device_use, layer_map, parse_layer_map, parse_size, part_sizes
from hetlm.planner import RUNTIME_OVERHEAD, Inventory, load_inventory, make_plan, planning_model
from hetlm.sampling import Sampler, encode_prompt, make_generator
from hetlm.sampling_settings import SamplingSettings
from hetlm.store import load_checkpoint

INVENTORIES = Path(__file__).parent / "inventories"
GOLDEN = Path(__file__).parent / "golden"
# The tiny checkpoint's model (tests/conftest.py) on a simulated machine with two GPUs, every device the CPU here.
ALIASED = ["device.alias=cuda:0=cpu,cuda:1=cpu", "device.dtype=fp32"]


def two_gpus_with(memory: str) -> list[str]:
    return [*ALIASED, f"device.memory={memory}", "device.margin=0"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint).model


def plan(config_sets, workload="generate", inventory="two-gpus"):
    return make_plan(load_inventory(INVENTORIES / f"{inventory}.json"), load_config(None, config_sets), workload)


def placed(model, tiny_checkpoint, sets):
    loaded = load_checkpoint(tiny_checkpoint)
    config = load_config(None, [*sets, f"model.n_layers={model.config.n_layers}", f"model.d_model={model.config.d_model}",
                                f"model.n_heads={model.config.n_heads}", f"model.n_kv_heads={model.config.n_kv_heads}",
                                f"model.context_length={model.config.context_length}",
                                f"model.vocab_size={model.config.vocab_size}"])
    result = make_plan(load_inventory(INVENTORIES / "two-gpus.json"), config, "generate")
    result.place_model(loaded.model)
    return loaded.model, result


@pytest.mark.parametrize("layers", ["cuda:0=0,cuda:1=1", "cpu=0,cuda:1=1,head=cuda:0", "cuda:1=0-1,embed=cpu,head=cuda:0"])
def test_split_logits_and_greedy_tokens_equal_the_unsplit_model(model, tiny_checkpoint, tokenizer, layers):
    split, result = placed(model, tiny_checkpoint, [*ALIASED, f"device.layers={layers}"])
    assert len(result.placements) >= 2 and {s.device for s in result.placements} <= {"cpu", "cuda:0", "cuda:1"}
    ids = torch.randint(4, model.config.vocab_size, (3, model.config.context_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(split(ids)[0], model(ids)[0])
    prompt = encode_prompt(tokenizer, "def main(")
    # Three contexts' worth: the window slides, and the caches on every device are refilled each time.
    settings = SamplingSettings(max_new_tokens=3 * model.config.context_length, temperature=0, ignore_eos=True)
    alone = Sampler(model, tokenizer).generate(prompt, settings, make_generator(0))
    apart = Sampler(split, tokenizer, result).generate(prompt, settings, make_generator(0))
    assert apart.completions[0].token_ids == alone.completions[0].token_ids and apart.slides >= 4


def test_eval_and_generate_on_a_split_model_match_the_plain_run(cli, tiny_checkpoint, monkeypatch):
    plain_eval = cli("eval", tiny_checkpoint, "--json", "--set", "device.device=cpu")
    plain_text = cli("generate", tiny_checkpoint, "--prompt", "def ", "-n", "150", "-t", "0")
    monkeypatch.setenv("HETLM_INVENTORY", str(INVENTORIES / "two-gpus.json"))
    sets = [arg for s in [*ALIASED, "device.layers=cpu=0,cuda:0=1"] for arg in ("--set", s)]
    split_eval = cli("eval", tiny_checkpoint, "--json", *sets)
    split_text = cli("generate", tiny_checkpoint, "--prompt", "def ", "-n", "150", "-t", "0", *sets)
    assert plain_eval.code == split_eval.code == 0, split_eval.err
    assert json.loads(split_eval.out)["loss"] == json.loads(plain_eval.out)["loss"]
    assert split_text.code == 0, split_text.err
    assert split_text.out == plain_text.out and "cuda:0" in split_text.err


def test_auto_split_follows_memory_and_stops_when_nothing_fits():
    model_sets = ["model.n_layers=8", "model.d_model=256", "model.n_heads=4", "data.vocab_size=8192",
                  "model.context_length=256"]
    sizes = part_sizes(planning_model(load_config(None, model_sets)), "fp32", 1, all_logits=False)
    block = sizes.block + sizes.kv
    # Room for the CUDA runtime, the prefill buffers and three blocks on cuda:0 (with the head) and on cuda:1.
    gpu0 = RUNTIME_OVERHEAD["cuda"] + sizes.compute + sizes.head + sizes.tied_copy + sizes.logits + 3 * block
    gpu1 = RUNTIME_OVERHEAD["cuda"] + sizes.compute + 3 * block
    caps = f"cuda:0={gpu0},cuda:1={gpu1}"
    roomy = plan([*model_sets, *two_gpus_with("cuda:0=1GiB,cuda:1=1GiB")])
    assert [s.device for s in roomy.placements] == ["cuda:0"]
    tight = plan([*model_sets, *two_gpus_with(caps)])
    assert [(s.device, s.layers, s.embed, s.head) for s in tight.placements] == [
        ("cpu", (0, 2), True, False), ("cuda:1", (2, 5), False, False), ("cuda:0", (5, 8), False, True)]
    assert all(m.total <= m.available for m in tight.memory)
    assert "device.layers" in next(d.reason for d in tight.decisions if d.stage == "layer map")
    # The map it prints reproduces it.
    again = plan([*model_sets, *two_gpus_with(caps), f"device.layers={layer_map(tight.placements, 8)}"])
    assert again.placements == tight.placements
    with pytest.raises(UsageError, match="no placement of the model fits") as refused:
        plan([*model_sets, *two_gpus_with(f"{caps},cpu={RUNTIME_OVERHEAD['cpu'] + block}")])
    assert "cpu needs" in str(refused.value) and "model.context_length" in str(refused.value)
    # More sequences decoded at once need more KV cache: serving 64 does not fit where one sequence does.
    cpu = RUNTIME_OVERHEAD["cpu"] + sizes.embed + sizes.compute + 2 * block
    assert plan([*model_sets, *two_gpus_with(f"{caps},cpu={cpu}")], workload="generate").fits
    with pytest.raises(UsageError, match="serve.max_concurrency"):
        plan([*model_sets, *two_gpus_with(f"{caps},cpu={cpu}"), "serve.max_concurrency=64"], workload="serve")


def test_gpu_layers_puts_the_last_blocks_on_the_accelerator():
    result = plan([*ALIASED, "model.n_layers=6", "device.gpu_layers=2"])
    assert [(s.device, s.layers, s.embed, s.head) for s in result.placements] == [
        ("cpu", (0, 4), True, False), ("cuda:0", (4, 6), False, True)]
    assert [s.device for s in plan([*ALIASED, "model.n_layers=6", "device.gpu_layers=6"]).placements] == ["cuda:0"]
    with pytest.raises(UsageError, match="no accelerator"):
        plan(["model.n_layers=6", "device.gpu_layers=2"], inventory="no-gpu")


@pytest.mark.parametrize(("sets", "fragment"), [
    (["device.layers=cuda:0=0-2,cpu=4-5"], "block 3 is missing"),
    (["device.layers=cuda:0=0-3,cpu=3-5"], "block 3 is given twice"),
    (["device.layers=cuda:0=0-5,cuda:0=1"], "names cuda:0 twice"),
    (["device.layers=cuda:0=0-6"], "outside the model's blocks 0-5"),
    (["device.layers=cuda:7=0-5"], "not a device of this machine"),
    (["device.layers=cuda:0=zero"], "not a block range"),
    (["device.layers=cuda:0=0-5,head=mps"], "names a device this plan does not have"),
    (["device.layers=cuda:0=0-5", "device.memory=cuda:0=1MiB", "device.margin=0"], "no placement of the model fits"),
    (["device.memory=cuda:9=1GiB"], "device.memory names cuda:9"),
    (["device.memory=cuda:0=lots"], "cannot read 'lots' as a size"),
    (["device.alias=cuda:0=tpu"], "must map a device name"),
    (["device.alias=cuda:3=cpu"], "device.alias names cuda:3"),
    (["device.margin=150%"], "must be a share"),
])
def test_bad_overrides_are_one_line_usage_errors(sets, fragment):
    with pytest.raises(UsageError, match=fragment):
        plan(["model.n_layers=6", *sets])


def test_a_plan_for_devices_this_machine_lacks_is_refused_unless_aliased():
    with pytest.raises(Exception, match="does not have"):
        plan(["device.layers=cpu=0,cuda:1=1-3"]).apply()
    aliased = plan([*ALIASED, "device.layers=cpu=0,cuda:1=1-3"])
    aliased.apply()
    assert aliased.physical("cuda:1") == torch.device("cpu") and aliased.torch_device == torch.device("cpu")
    assert any(d.stage == "aliasing" for d in aliased.decisions)


# --- properties over random machines and models --------------------------------------------------


def random_case(rng: random.Random):
    cuda = [dict(index=i, name=rng.choice(["NVIDIA A100-SXM4-40GB", "NVIDIA GeForce RTX 3060", "Tesla T4"]),
                 total_memory=2**34, free_memory=rng.choice([0, 2**20 * (600 + rng.randint(1, 500))]), capability=[8, 0],
                 bf16=True, memory_bandwidth=0.0) for i in range(rng.randint(0, 2))]
    inventory = Inventory.from_dict({
        "cpu": dict(cores=4, logical_cpus=8, ram_bytes=2**20 * rng.randint(300, 3000), avx512=False, amx=False,
                    avx512_bf16=False, model_name="test CPU", memory_bandwidth=0.0),
        "cuda": cuda, "mps": False, "platform": "linux", "compiler": True,
    })
    heads = rng.choice([2, 4])
    config = load_config(None, [
        f"model.n_layers={rng.randint(1, 3)}", f"model.d_model={heads * rng.choice([64, 128, 256])}",
        f"model.n_heads={heads}", f"model.context_length={rng.choice([256, 2048])}",
        f"data.vocab_size={rng.choice([8192, 32000])}", "device.margin=0",
        f"model.tie_embeddings={rng.choice(['true', 'false'])}", "device.dtype=fp32",
    ])
    return inventory, config


def every_placement(devices: list[str], n_layers: int):
    """Every assignment of (embed, blocks..., head) to devices in which each device holds one contiguous run."""
    for assignment in itertools.product(devices, repeat=n_layers + 2):
        runs = [device for device, _ in itertools.groupby(assignment)]
        if len(runs) != len(set(runs)):
            continue
        segments, position = [], 0
        for device, group in itertools.groupby(assignment):
            count = len(list(group))
            start = max(0, position - 1)
            end = min(n_layers, position + count - 1)
            segments.append(Segment(device, (start, max(start, end)), embed=position == 0,
                                    head=position + count == n_layers + 2))
            position += count
        yield tuple(segments)


def test_plans_place_every_part_once_within_budget_and_refuse_only_when_nothing_fits():
    rng = random.Random(0)
    checked = refused = split = 0
    for _ in range(100):
        inventory, config = random_case(rng)
        model = planning_model(config)
        try:
            result = make_plan(inventory, config, "generate")
        except UsageError as exc:
            assert "no placement of the model fits" in str(exc)
            refused += 1
            names = [f"cuda:{d.index}" for d in inventory.cuda] + ["cpu"]
            for segments in every_placement(names, model.n_layers):
                assert not fits_exactly(inventory, config, segments), segments
            continue
        checked += 1
        blocks = [i for s in result.placements for i in range(*s.layers)]
        assert blocks == list(range(model.n_layers))
        assert sum(s.embed for s in result.placements) == sum(s.head for s in result.placements) == 1
        assert result.placements[0].embed and result.placements[-1].head
        assert len({s.device for s in result.placements}) == len(result.placements)
        assert all(m.total <= m.available for m in result.memory)
        # The whole model sits on the fastest device whenever it fits there.
        fastest = next(d for d in result.decisions if d.stage == "device").choice
        alone = fits_exactly(inventory, config, (Segment(fastest, (0, model.n_layers), embed=True, head=True),))
        assert (len(result.placements) == 1 and result.device == fastest) == alone
        split += len(result.placements) > 1
    assert checked > 30 and refused > 3 and split > 5, (checked, refused, split)


def overrides_of(config) -> list[str]:
    m = config.model
    return [f"model.n_layers={m.n_layers}", f"model.d_model={m.d_model}", f"model.n_heads={m.n_heads}",
            f"model.context_length={m.context_length}", f"data.vocab_size={config.data.vocab_size}",
            f"model.tie_embeddings={str(m.tie_embeddings).lower()}", "device.margin=0", "device.dtype=fp32"]


def fits_exactly(inventory, config, segments) -> bool:
    """Whether ``segments`` fit, counted with the planner's own memory rule for each device."""
    try:
        result = make_plan(inventory, load_config(None, [*overrides_of(config), f"device.layers={_map(segments)}"]),
                           "generate")
    except UsageError:
        return False
    return result.fits


def _map(segments) -> str:
    items = [f"{s.device}={s.layers[0]}-{s.layers[1] - 1}" for s in segments if s.layers[1] > s.layers[0]]
    items.append(f"embed={next(s.device for s in segments if s.embed)}")
    items.append(f"head={next(s.device for s in segments if s.head)}")
    return ",".join(items)


# --- golden plans ----------------------------------------------------------------------------------


GOLDEN_CASES = {
    # A ~3B model's shape on one 8 GB GPU: it must split with the CPU.
    "3b-on-8gb-gpu": ("one-8gb-gpu", ["model.n_layers=26", "model.d_model=3072", "model.n_heads=24",
                                      "model.context_length=2048", "data.vocab_size=32000"], "generate"),
    "24gb-and-8gb-gpus": ("24gb-and-8gb-gpus", ["model.n_layers=72", "model.d_model=2048", "model.n_heads=16",
                                                "model.context_length=2048", "data.vocab_size=32000"], "generate"),
    "apple-mps": ("apple-mps", ["model.n_layers=12", "model.d_model=768", "model.n_heads=12",
                                "model.context_length=1024", "data.vocab_size=32000"], "serve"),
    "gpu-with-0-free": ("gpu-0-free", ["model.n_layers=6", "model.d_model=512", "model.n_heads=8"], "generate"),
    "cpu-only": ("no-gpu", ["model.n_layers=12", "model.d_model=768", "model.n_heads=12", "data.vocab_size=32000"], "eval"),
}


def golden_view(result) -> dict:
    return {
        "device": result.device,
        "placements": [[s.device, list(s.layers), s.embed, s.head] for s in result.placements],
        "memory": {m.device: {"total": m.total, "available": m.available} for m in result.memory},
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 1),
    }


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_plans(name):
    inventory, sets, workload = GOLDEN_CASES[name]
    got = golden_view(plan(sets, workload, inventory))
    path = GOLDEN / f"{name}.json"
    assert got == json.loads(path.read_text()), f"plan changed: compare with {path} (regenerate it if intended)"


def test_sizes_parse_and_devices_use_what_parts_need():
    assert parse_size("6GiB", "x") == 6 * 2**30 and parse_size("1.5GB", "x") == 1_500_000_000 and parse_size("64", "x") == 64
    config = load_config(None, ["data.vocab_size=1000"])
    sizes = part_sizes(planning_model(config), "fp32", 1, all_logits=False)
    segments = parse_layer_map("cpu=0-1,cuda:0=2-3", 4, ("cuda:0", "cpu"))
    assert [s.describe() for s in segments] == ["embed+0-1", "2-3+head"]
    assert plan([*ALIASED]).memory[0].device == "cuda:0"
    spec = DeviceSpec("cuda:0", 2**40, 0, 0, 1e12, 25e9, 1e-5, 1e-4, 1e14)
    use = device_use(segments[1], sizes, spec, "cpu")
    assert use.weights == 2 * sizes.block + sizes.head + sizes.tied_copy and use.kv_cache == 2 * sizes.kv


def test_plan_measure_reads_this_machines_bandwidth(cli):
    result = cli("plan", "--measure", "--json", "--workload", "generate", "--set", "device.threads=1")
    assert result.code == 0, result.err
    measured = json.loads(result.out)["inventory"]["cpu"]["memory_bandwidth"]
    assert 1e8 < measured < 1e13
    refused = cli("plan", "--measure", "--inventory", INVENTORIES / "no-gpu.json")
    assert refused.code == 2 and "cannot measure a simulated" in refused.err

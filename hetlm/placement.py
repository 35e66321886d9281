"""Where each part of a model sits for inference, chosen from every device's memory and speed.

A model's parts, in order, are the embedding, the blocks 0..L-1 (each with its KV cache) and the head (final
norm and LM head). A placement gives each device one contiguous run of them; hidden states (d_model per
token) cross at the boundaries and weights never move. Pure functions of the model's shape, the devices'
budgets and the overrides, so ``hetlm plan`` can show and explain a split before anything is loaded.

The split minimises the predicted time of a decoding step, whose cost is reading the weights: each part on
a device costs its bytes over the device's memory bandwidth plus a fixed per-layer overhead, and each
boundary costs the hidden states over the link plus its latency. Decoding runs the parts one after another,
so the step time is their sum (not a pipeline's maximum), and the fastest devices should hold as much as fits.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from hetlm.config import ModelConfig
from hetlm.errors import UsageError

SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 1000**2, "mb": 1000**2, "mib": 2**20,
              "g": 1000**3, "gb": 1000**3, "gib": 2**30, "t": 1000**4, "tb": 1000**4, "tib": 2**40}
DEVICE_NAME = re.compile(r"^(cpu|mps|cuda:\d+)$")
PHYSICAL_NAME = re.compile(r"^(cpu|mps|cuda|cuda:\d+)$")
# The safety margin ``device.margin: auto`` keeps free: the larger of a share of the device and a floor.
MARGIN_SHARE, MARGIN_FLOOR = 0.10, 512 * 2**20
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


def parse_size(text: str, what: str) -> int:
    """Bytes in "6GiB", "512MiB", "1.5GB" or "1000"."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise UsageError(f"{what}: cannot read {text!r} as a size (try 512MiB or 6GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"{what}: expected NAME=VALUE items separated by commas, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def parse_memory_caps(text: str) -> dict[str, int]:
    """``device.memory``: {"cuda:0": bytes, ...}."""
    caps: dict[str, int] = {}
    for device, size in _pairs(text, "device.memory"):
        if not DEVICE_NAME.match(device):
            raise UsageError(f"device.memory: {device!r} is not a device name (cpu, mps or cuda:N)")
        if device in caps:
            raise UsageError(f"device.memory names {device} twice")
        caps[device] = parse_size(size, f"device.memory {device}")
    return caps


def parse_aliases(text: str) -> dict[str, str]:
    """``device.alias``: {simulated device: device of this machine}."""
    aliases: dict[str, str] = {}
    for simulated, real in _pairs(text, "device.alias"):
        if not DEVICE_NAME.match(simulated) or not PHYSICAL_NAME.match(real):
            raise UsageError(f"device.alias: {simulated}={real} must map a device name to cpu, mps, cuda or cuda:N")
        if simulated in aliases:
            raise UsageError(f"device.alias names {simulated} twice")
        aliases[simulated] = real
    return aliases


def margin_bytes(spec: str, available: int) -> int:
    """The memory ``device.margin`` keeps free on a device that has ``available``."""
    spec = spec.strip().lower()
    if spec == "auto":
        return max(int(MARGIN_SHARE * available), MARGIN_FLOOR)
    if spec.endswith("%"):
        try:
            share = float(spec[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 <= share < 1:
            raise UsageError(f"device.margin: {spec!r} must be a share in [0%, 100%)")
        return int(share * available)
    return parse_size(spec, "device.margin")


# --- the parts of a model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One device's contiguous run of parts: blocks [start, end), and whether it holds the embedding and the head."""

    device: str
    layers: tuple[int, int]
    embed: bool = False
    head: bool = False

    @property
    def blocks(self) -> int:
        return self.layers[1] - self.layers[0]

    def describe(self) -> str:
        parts = (["embed"] if self.embed else []) + ([_range(self.layers)] if self.blocks else []) + (
            ["head"] if self.head else [])
        return "+".join(parts)


def _range(layers: tuple[int, int]) -> str:
    start, end = layers
    return f"{start}" if end - start == 1 else f"{start}-{end - 1}"


@dataclass(frozen=True)
class PartSizes:
    """Bytes of each part on the device that holds it, for ``sequences`` sequences decoded at once."""

    embed: int
    block: int
    kv: int
    head: int
    # The LM head's weight again, when tied to the embedding but placed on another device.
    tied_copy: int
    # Buffers of the largest prefill, on every device that holds blocks; logits on the head's device.
    compute: int
    logits: int
    # Bytes a decoding step reads: per block (weights and, on average, half the KV cache) and for the head.
    block_read: int
    head_read: int
    hidden: int


def part_sizes(model: ModelConfig, decode: str, sequences: int, all_logits: bool, decoder: bool = True) -> PartSizes:
    """The parts of ``model`` whose single-token steps read ``decode`` weights ("fp32", "bf16", "int8"...).

    The model's own fp32 weights serve prefill; with ``decoder`` (sampling, not eval) the decoder keeps copies
    prepared in ``decode`` (the embedding only when that is not fp32). ``all_logits``: prefill keeps logits for
    every position (eval).
    """
    D, F, V, T = model.d_model, model.ffn_dim, model.vocab_size, model.context_length
    KE, HE = model.kv_heads * model.head_dim, model.n_heads * model.head_dim
    low = BYTES[decode] if decoder else 0
    cache = 2 if decode in ("bf16", "fp16") else 4
    block_matmul = D * HE + 2 * D * KE + HE * D + 3 * D * F
    block = 4 * (block_matmul + 2 * D) + low * block_matmul
    kv = sequences * 2 * T * KE * cache
    embed = 4 * V * D + (low * V * D if decode != "fp32" else 0)
    read = BYTES[decode]
    head = 4 * D + (0 if model.tie_embeddings else 4 * V * D) + low * V * D
    rows = sequences * T
    compute = rows * (4 * D + 3 * F) * 4
    logits = (rows if all_logits else sequences) * V * 8
    return PartSizes(
        embed=embed, block=block, kv=kv, head=head, tied_copy=4 * V * D if model.tie_embeddings else 0,
        compute=compute, logits=logits, block_read=read * block_matmul + kv // 2, head_read=read * V * D,
        hidden=sequences * D * 4,
    )


@dataclass(frozen=True)
class DeviceSpec:
    """What the planner knows of one device for placing a model on it."""

    device: str
    available: int
    margin: int
    overhead: int
    # Bytes per second of memory reads, and of the link to the host; seconds per layer of launch/dispatch cost.
    bandwidth: float
    link: float
    latency: float
    layer_seconds: float
    peak_flops: float

    @property
    def usable(self) -> int:
        return self.available - self.margin - self.overhead


@dataclass(frozen=True)
class DeviceUse:
    device: str
    weights: int
    kv_cache: int
    activations: int
    logits: int
    overhead: int
    margin: int
    total: int
    available: int

    @property
    def fits(self) -> bool:
        return self.total <= self.available


def device_use(segment: Segment, sizes: PartSizes, spec: DeviceSpec, embed_device: str) -> DeviceUse:
    weights = segment.blocks * sizes.block + (sizes.embed if segment.embed else 0)
    if segment.head:
        weights += sizes.head + (sizes.tied_copy if segment.device != embed_device else 0)
    kv = segment.blocks * sizes.kv
    activations = sizes.compute if segment.blocks else 0
    logits = sizes.logits if segment.head else 0
    total = weights + kv + activations + logits + spec.overhead + spec.margin
    return DeviceUse(segment.device, weights, kv, activations, logits, spec.overhead, spec.margin, total, spec.available)


def step_seconds(segments: tuple[Segment, ...], sizes: dict[str, PartSizes], specs: dict[str, DeviceSpec]) -> float:
    """Predicted time of one decoding step (one token per sequence) over ``segments``."""
    seconds = 0.0
    for segment in segments:
        spec, size = specs[segment.device], sizes[segment.device]
        seconds += segment.blocks * (size.block_read / spec.bandwidth + spec.layer_seconds)
        if segment.head:
            seconds += size.head_read / spec.bandwidth + spec.layer_seconds
    for before, after in zip(segments, segments[1:], strict=False):
        link = min(specs[before.device].link, specs[after.device].link)
        seconds += sizes[before.device].hidden / link + max(specs[before.device].latency, specs[after.device].latency)
    return seconds


def prefill_seconds(segments: tuple[Segment, ...], model: ModelConfig, tokens: int, specs: dict[str, DeviceSpec],
                    forward_flops_per_token: float) -> float:
    """Predicted time to prefill ``tokens`` tokens: each device's share of the forward FLOPs at its peak."""
    seconds = 0.0
    per_block = forward_flops_per_token * tokens / (model.n_layers + 1)
    for segment in segments:
        share = segment.blocks + (1 if segment.head else 0)
        seconds += share * per_block / specs[segment.device].peak_flops
    hidden = tokens * model.d_model * 4
    for before, after in zip(segments, segments[1:], strict=False):
        seconds += hidden / min(specs[before.device].link, specs[after.device].link)
    return seconds


# --- choosing a placement ---------------------------------------------------------------------------------


def whole(device: str, n_layers: int) -> tuple[Segment, ...]:
    return (Segment(device, (0, n_layers), embed=True, head=True),)


def fill_from_the_end(order: list[str], sizes: dict[str, PartSizes], specs: dict[str, DeviceSpec], n_layers: int,
                      cpu: str, limit: int | None = None) -> tuple[Segment, ...] | None:
    """The head and as many of the last blocks as fit on ``order[0]``, earlier blocks on the next devices, the rest and
    the embedding on ``cpu``; at most ``limit`` blocks off the CPU. None when even the CPU cannot hold the rest."""
    segments: list[Segment] = []
    end = n_layers
    budget = n_layers if limit is None else limit
    for device in order:
        if device == cpu:
            break
        spec, size = specs[device], sizes[device]
        room = spec.usable
        head = not segments
        if head:
            room -= size.head + size.tied_copy + size.logits
            if room < 0:
                continue
        per_block = size.block + size.kv
        room -= size.compute
        count = max(0, min(end, budget, room // per_block if per_block else end))
        if count == 0 and not head:
            continue
        segments.append(Segment(device, (end - count, end), head=head))
        end -= count
        budget -= count
    rest = Segment(cpu, (0, end), embed=True, head=not segments)
    if not device_use(rest, sizes[cpu], specs[cpu], cpu).fits:
        return None
    return (rest, *reversed(segments))


def fastest_split(devices: list[str], sizes: dict[str, PartSizes], specs: dict[str, DeviceSpec],
                  n_layers: int) -> tuple[Segment, ...] | None:
    """The placement with the lowest predicted step time that fits every device, or None when none fits.

    Every ordered chain of distinct devices is tried (the embedding on its first, the head on its last); within a
    chain the blocks go to the devices that decode a block fastest, up to what each can hold, which minimises the
    summed step time for that chain. A handful of devices gives at most a few hundred chains.
    """
    best: tuple[float, int, tuple[Segment, ...]] | None = None
    for length in range(1, len(devices) + 1):
        for chain in itertools.permutations(devices, length):
            segments = _fill_chain(chain, sizes, specs, n_layers)
            if segments is None:
                continue
            key = (step_seconds(segments, sizes, specs), len(segments))
            if best is None or key < best[:2]:
                best = (*key, segments)
    return best[2] if best is not None else None


def _fill_chain(chain: tuple[str, ...], sizes: dict[str, PartSizes], specs: dict[str, DeviceSpec],
                n_layers: int) -> tuple[Segment, ...] | None:
    caps = []
    for position, device in enumerate(chain):
        size, room = sizes[device], specs[device].usable
        if position == 0:
            room -= size.embed
        if position == len(chain) - 1:
            room -= size.head + (size.tied_copy if device != chain[0] else 0) + size.logits
        if room < 0:
            return None
        caps.append(max(0, (room - size.compute) // (size.block + size.kv)))
    counts = [0] * len(chain)
    left = n_layers
    by_speed = sorted(range(len(chain)), key=lambda i: sizes[chain[i]].block_read / specs[chain[i]].bandwidth
                      + specs[chain[i]].layer_seconds)
    for i in by_speed:
        counts[i] = min(caps[i], left)
        left -= counts[i]
    if left or any(count == 0 for count in counts[1:-1]):
        # Blocks left over, or a device in the middle with nothing to do (the shorter chain covers that case).
        return None
    segments, start = [], 0
    for position, (device, count) in enumerate(zip(chain, counts, strict=True)):
        segments.append(Segment(device, (start, start + count), embed=position == 0, head=position == len(chain) - 1))
        start += count
    return tuple(segments)


def parse_layer_map(text: str, n_layers: int, devices: tuple[str, ...]) -> tuple[Segment, ...]:
    """``device.layers`` ("cuda:0=0-17,cpu=18-23", with optional embed=DEV and head=DEV) as segments in block order."""
    ranges: dict[str, tuple[int, int]] = {}
    named: dict[str, str] = {}
    for key, value in _pairs(text, "device.layers"):
        if key in ("embed", "head"):
            if value not in devices:
                raise UsageError(f"device.layers: {key}={value} names a device this plan does not have "
                                 f"({', '.join(devices)})")
            named[key] = value
            continue
        if key not in devices:
            raise UsageError(f"device.layers: {key} is not a device of this machine ({', '.join(devices)})")
        if key in ranges:
            raise UsageError(f"device.layers names {key} twice: give each device one contiguous range")
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", value)
        if match is None:
            raise UsageError(f"device.layers: {key}={value} is not a block range like 0-17 or 5")
        start, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < start or last >= n_layers:
            raise UsageError(f"device.layers: {key}={value} is outside the model's blocks 0-{n_layers - 1}")
        ranges[key] = (start, last + 1)
    if not ranges:
        raise UsageError("device.layers: no block range given")
    ordered = sorted(ranges.items(), key=lambda item: item[1])
    expected = 0
    for _, (start, end) in ordered:
        if start != expected:
            problem = f"block {expected} is missing" if start > expected else f"block {start} is given twice"
            raise UsageError(f"device.layers: {problem} (every block 0-{n_layers - 1} exactly once)")
        expected = end
    if expected != n_layers:
        raise UsageError(f"device.layers: blocks {expected}-{n_layers - 1} are missing (every block exactly once)")
    embed = named.get("embed", ordered[0][0])
    head = named.get("head", ordered[-1][0])
    segments = [Segment(device, layers, embed=device == embed, head=device == head) for device, layers in ordered]
    for part, device in (("embed", embed), ("head", head)):
        if not any(s.device == device for s in segments):
            segments.insert(0 if part == "embed" else len(segments), Segment(device, (0, 0) if part == "embed" else (
                n_layers, n_layers), embed=part == "embed", head=part == "head"))
    if not segments[0].embed or not segments[-1].head:
        raise UsageError("device.layers: the embedding must sit with or before the first block, and the head with or "
                         "after the last")
    return tuple(segments)


def layer_map(segments: tuple[Segment, ...], n_layers: int) -> str:
    """The ``device.layers`` value that reproduces ``segments``."""
    items = [f"{s.device}={_range(s.layers)}" for s in segments if s.blocks]
    holders = [s.device for s in segments if s.blocks]
    embed = next(s.device for s in segments if s.embed)
    head = next(s.device for s in segments if s.head)
    if embed != holders[0]:
        items.append(f"embed={embed}")
    if head != holders[-1]:
        items.append(f"head={head}")
    return ",".join(items)


def bar(segments: tuple[Segment, ...], n_layers: int, width: int = 48) -> list[str]:
    """One line per device: which blocks it holds, drawn over the model's depth."""
    lines = []
    for segment in segments:
        start, end = segment.layers
        cells = ["#" if start <= math.floor(i * n_layers / width) < end else "." for i in range(width)]
        lines.append(f"{segment.device:>7} |{''.join(cells)}| {segment.describe()}")
    return lines

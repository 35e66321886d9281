"""The device planner: which hardware runs each stage, in which dtype, and why.

``detect_inventory`` looks at the machine once; ``make_plan`` is a pure function of that
inventory, the config and the workload, so the same inputs always give the same Plan and
tests can plan for machines they do not have (``HETLM_INVENTORY=path.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetlm.config import MAX_AUTO_SLOTS, Config, ModelConfig, parse_duration
from hetlm.decode import INT8_WIDTH_MULTIPLE, Decoding
from hetlm.errors import HetlmError, UsageError
from hetlm.model import DTYPES, flops_per_token, parameter_counts
from hetlm.openmp import WAIT_POLICY, load_now
from hetlm.placement import (
    DeviceSpec,
    Segment,
    device_use,
    fastest_split,
    fill_from_the_end,
    layer_map,
    margin_bytes,
    parse_aliases,
    parse_layer_map,
    parse_memory_caps,
    part_sizes,
    prefill_seconds,
    step_seconds,
    whole,
)

# "infer" plans like "generate": one sequence. "eval" and "serve" decode eval.batch_size and serve.max_concurrency.
INFERENCE = ("infer", "generate", "eval", "serve")
WORKLOADS = ("train", *INFERENCE, "preprocess")
INVENTORY_ENV = "HETLM_INVENTORY"

# Without AMX, AVX512-BF16 still runs the matmuls of nanoGPT's baby shape (d_model 128) 4-5x faster than fp32
# (294-372 against 73-83 GFLOP/s on one thread of a 2-core AMD EPYC), and with attention in fp32 the planned
# step went from 10.1k tokens/s in fp32 to 22.3k in bf16 there (bench/train.py --shapes baby --vocab 1024,
# --dtype bf16 against auto). In fp32 the step cannot pull far ahead of a plain loop: matmuls are ~65% of both
# hetlm's compiled step and a nanoGPT-style eager one (bench/profile_step.py). Below this width bf16 was not
# measured, so those stay fp32. (With AMX, bf16 pays at every size.)
CPU_BF16_MIN_D_MODEL = 128
# Compiling the blocks costs about 30 s up front on 2 CPU cores with a cold cache (a few seconds warm). On
# the CPU with bf16 it made steps 1.4-1.9x faster at 0.8M-10M parameters, which won the cold compile back
# after 90-130 s of training at both sizes; the threshold keeps a margin above that. On a GPU small models
# gain less, so it needs a longer run.
COMPILE_MIN_SECONDS = {"cpu": 150.0, "cuda": 300.0}
# Fraction of peak FLOP/s a training step reaches, used only to guess a run's length.
ASSUMED_MFU = 0.5
# Overhead-bound time of an eager step, per Transformer layer and micro-batch: small models never reach
# ASSUMED_MFU. On a GPU it is kernel launches; on the CPU, dispatch and small ops (the nanoGPT baby shape
# measured 9-14 ms per layer in bf16 on 2 Xeon cores, where its FLOPs alone would take 3 ms).
LAYER_SECONDS = {"cuda": 1e-3, "cpu": 9e-3}
# RAM a process may plan to use: the rest stays for the OS and the page cache of the memmapped data.
CPU_RAM_FRACTION = 0.85
# Metal lets one process wire about two thirds of unified memory.
MPS_RAM_FRACTION = 2 / 3
RUNTIME_OVERHEAD = {"cuda": 600 * 2**20, "mps": 400 * 2**20, "cpu": 300 * 2**20}
# Sequences per step when neither train.micro_batch_size nor train.global_batch_tokens says.
DEFAULT_MICRO_BATCH = 16
FRAGMENTATION = 0.10

# Dense peak FLOP/s by GPU name fragment: (bf16/fp16 tensor cores with fp32 accumulation, plain fp32).
# The first matching fragment wins, so more specific names come first.
CUDA_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("B200", 2250e12, 80e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("H200", 989e12, 67e12),
    ("H800", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("A800", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 30.3e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 4080", 97e12, 48.7e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("RTX 3080", 59.5e12, 29.8e12),
    ("RTX 3070", 40.6e12, 20.3e12),
    ("RTX 3060", 25.6e12, 12.7e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
)
# Measured on this project's Xeon (AMX): 2 cores ran bf16 matmuls at 540-640 GFLOP/s and fp32 at 160-250.
CPU_CORE_PEAK = {"amx": 300e9, "avx512_bf16": 200e9, "avx512": 110e9, "other": 55e9}
# Nominal memory bandwidth (bytes/s), the cost of a decoding step, by GPU name fragment (first match wins);
# an inventory's memory_bandwidth, when set, replaces it.
CUDA_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("B200", 8.0e12), ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H800", 3.35e12),
    ("A100-SXM4-80GB", 2.0e12), ("A100", 1.55e12), ("A800", 1.55e12), ("L40", 0.86e12), ("L4", 0.3e12),
    ("A10", 0.6e12), ("RTX 4090", 1.0e12), ("RTX 4080", 0.72e12), ("RTX 3090", 0.94e12), ("RTX 3080", 0.76e12),
    ("RTX 3070", 0.45e12), ("RTX 3060", 0.36e12), ("V100", 0.9e12), ("T4", 0.32e12),
)
# One core of this project's Xeon read a token's 48 MB of weights at ~23 GB/s; a socket tops out well below
# cores x that.
CPU_CORE_BANDWIDTH, CPU_MAX_BANDWIDTH = 23e9, 150e9
# PCIe 4.0 x16 carries ~25 GB/s of pinned copies each way; a small copy costs ~10 us of launch and sync.
CUDA_LINK, CUDA_LINK_LATENCY = 25e9, 10e-6
# Fixed cost of one layer of a decoding step: ~30 small operations. The nanoGPT baby shape decodes at ~0.6 ms
# per token over 4 layers on 2 Xeon cores, when its weights take ~0.2 ms to read; GPU kernel launches cost alike.
DECODE_LAYER_SECONDS = {"cpu": 1e-4, "cuda": 1e-4, "mps": 2e-4}


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_memory: int
    free_memory: int
    capability: tuple[int, int]
    bf16: bool
    # Bytes/s; 0 takes the nominal figure for the GPU's name, or for PCIe 4.0 x16 (the link to the host).
    memory_bandwidth: float = 0.0
    link_bandwidth: float = 0.0


@dataclass(frozen=True)
class CpuInfo:
    # Physical cores this process may use.
    cores: int
    # Logical CPUs this process may use (affinity and cgroup quota applied).
    logical_cpus: int
    ram_bytes: int
    avx512: bool
    amx: bool
    avx512_bf16: bool
    model_name: str
    # Bytes/s; 0 takes the nominal figure for the core count.
    memory_bandwidth: float = 0.0
    # Load average when detected: other programs' share of the CPUs, which threads should not fight for.
    load: float = 0.0
    # How idle OpenMP threads wait in this process (hetlm.openmp): "passive" sleeps at once.
    wait_policy: str = "default"


@dataclass(frozen=True)
class Inventory:
    cpu: CpuInfo
    cuda: tuple[CudaDevice, ...]
    mps: bool
    # sys.platform of the machine: "linux", "darwin", "win32".
    platform: str
    # A C compiler is on PATH: torch.compile's Inductor needs one for CPU kernels and Triton's launchers.
    compiler: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cuda"] = [dict(d, capability=list(d["capability"])) for d in data["cuda"]]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Inventory:
        """Rebuild an inventory from ``to_dict`` output; a missing or mistyped field raises UsageError."""
        if not isinstance(data, dict):
            raise UsageError("inventory: expected a JSON object")
        cpu = _record(CpuInfo, _field(data, "cpu", dict), "cpu")
        cuda = []
        for i, entry in enumerate(_field(data, "cuda", list, [])):
            if not isinstance(entry, dict):
                raise UsageError(f"inventory: cuda[{i}] must be an object")
            capability = _field(entry, "capability", list, where=f"cuda[{i}]")
            if len(capability) != 2 or not all(isinstance(c, int) for c in capability):
                raise UsageError(f"inventory: cuda[{i}].capability must be [major, minor]")
            cuda.append(_record(CudaDevice, dict(entry, capability=tuple(capability)), f"cuda[{i}]"))
        if [d.index for d in cuda] != list(range(len(cuda))):
            raise UsageError("inventory: cuda devices must be listed in index order 0, 1, ...")
        return cls(
            cpu=cpu,
            cuda=tuple(cuda),
            mps=_field(data, "mps", bool, False),
            platform=_field(data, "platform", str),
            compiler=_field(data, "compiler", bool, False),
        )


def _field(data: dict, key: str, kind: type, default: Any = ..., where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if key not in data:
        if default is ...:
            raise UsageError(f"inventory: missing field {name}")
        return default
    value = data[key]
    if (kind in (int, (int, float)) and isinstance(value, bool)) or not isinstance(value, kind):
        what = "number" if kind == (int, float) else kind.__name__
        raise UsageError(f"inventory: {name} must be {what}, got {value!r}")
    return value


def _record(cls: type, data: dict, where: str) -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        kind = tuple if f.name == "capability" else {"int": int, "str": str, "bool": bool, "float": (int, float)}.get(
            str(f.type), object)
        default = f.default if f.default is not dataclasses.MISSING else ...
        values[f.name] = _field(data, f.name, kind, default, where=where)
    unknown = sorted(set(data) - set(values))
    if unknown:
        raise UsageError(f"inventory: unknown field {where}.{unknown[0]}")
    return cls(**values)


def load_inventory(path: str | Path) -> Inventory:
    """A simulated machine from a JSON file (the format of ``Inventory.to_dict``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"inventory file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not a readable JSON inventory ({exc})") from None
    try:
        return Inventory.from_dict(data)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


# --- detection: the only part that looks at the machine ------------------------------------------


def detect_inventory() -> Inventory:
    """The machine this process runs on, or the simulated one named by $HETLM_INVENTORY."""
    simulated = os.environ.get(INVENTORY_ENV)
    if simulated:
        return load_inventory(simulated)
    return Inventory(
        cpu=_detect_cpu(),
        cuda=_detect_cuda(),
        mps=bool(torch.backends.mps.is_available()),
        platform=sys.platform,
        compiler=any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "cl")),
    )


def measure_inventory(inventory: Inventory, threads: int) -> Inventory:
    """``inventory`` with the memory bandwidth of this machine's CPU and GPUs, and each GPU's link to the host,
    measured: a few hundred milliseconds of reads and copies per device."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu = dataclasses.replace(inventory.cpu, memory_bandwidth=_read_bandwidth(torch.device("cpu")))
    finally:
        torch.set_num_threads(previous)
    cuda = tuple(dataclasses.replace(d, memory_bandwidth=_read_bandwidth(torch.device("cuda", d.index)),
                                     link_bandwidth=_link_bandwidth(torch.device("cuda", d.index)))
                 for d in inventory.cuda)
    return dataclasses.replace(inventory, cpu=cpu, cuda=cuda)


def _best_seconds(work: Any, device: torch.device, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 1):
        _wait_for(device)
        started = time.perf_counter()
        work()
        _wait_for(device)
        times.append(time.perf_counter() - started)
    return min(times[1:])


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_bandwidth(device: torch.device) -> float:
    # 256 MiB is well past every cache; a sum reads each byte once, as a decoding step reads its weights.
    data = torch.ones(64 * 2**20, dtype=torch.float32, device=device)
    return data.numel() * 4 / _best_seconds(data.sum, device)


def _link_bandwidth(device: torch.device) -> float:
    host = torch.ones(16 * 2**20, dtype=torch.float32).pin_memory()
    return host.numel() * 4 / _best_seconds(lambda: host.to(device, non_blocking=True), device)


def _detect_cuda() -> tuple[CudaDevice, ...]:
    if not torch.cuda.is_available():
        return ()
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        total = int(props.total_memory)
        devices.append(CudaDevice(index, props.name, total, _free_cuda_memory(index, total), capability, bf16=capability >= (8, 0)))
    return tuple(devices)


def _free_cuda_memory(index: int, total: int) -> int:
    try:
        # NVML reads usage without a CUDA context; mem_get_info creates one per GPU (~500 MB each) in every
        # torchrun process that takes an inventory.
        return max(0, total - int(torch.cuda.device_memory_used(index)))
    except Exception:  # pynvml missing or NVML unavailable
        return int(torch.cuda.mem_get_info(index)[0])


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _usable_cpus() -> tuple[set[int] | None, int]:
    """CPU ids this process may run on (None where unknown) and how many, after any cgroup CPU quota."""
    ids = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    count = len(ids) if ids else (os.cpu_count() or 1)
    quota = _read("/sys/fs/cgroup/cpu.max").split()
    if len(quota) == 2 and quota[0] != "max":
        with contextlib.suppress(ValueError, ZeroDivisionError):
            count = min(count, max(1, math.ceil(int(quota[0]) / int(quota[1]))))
    return ids, count


def _detect_cpu() -> CpuInfo:
    ids, logical = _usable_cpus()
    cores, flags, model_name = logical, set(), ""
    if sys.platform.startswith("linux"):
        physical = set()
        for block in _read("/proc/cpuinfo").split("\n\n"):
            fields = dict(
                (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()) if k.strip()
            )
            if "processor" not in fields:
                continue
            flags = flags or set(fields.get("flags", "").split())
            model_name = model_name or fields.get("model name", "")
            if ids is None or int(fields["processor"]) in ids:
                physical.add((fields.get("physical id"), fields.get("core id", fields["processor"])))
        if physical:
            cores = min(len(physical), logical)
    elif sys.platform == "darwin":
        cores = min(int(_sysctl("hw.physicalcpu") or logical), logical)
        model_name = _sysctl("machdep.cpu.brand_string")
    if not flags:
        # Outside Linux the ISA comes from torch's own dispatch level; AMX is not visible there.
        capability = torch.backends.cpu.get_cpu_capability()
        flags = {"avx512f"} if "AVX512" in capability else set()
    return CpuInfo(
        cores=max(1, cores),
        logical_cpus=max(1, logical),
        ram_bytes=_detect_ram(),
        avx512="avx512f" in flags,
        amx="amx_bf16" in flags,
        avx512_bf16="avx512_bf16" in flags,
        model_name=model_name or "unknown CPU",
        load=round(load_now(), 2),
        wait_policy=os.environ.get(WAIT_POLICY, "default").lower(),
    )


def _detect_ram() -> int:
    if sys.platform == "darwin":
        return int(_sysctl("hw.memsize") or 0)
    if sys.platform == "win32":
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
                (name, ctypes.c_ulonglong)
                for name in ("total", "avail", "page_total", "page_avail", "virtual_total", "virtual_avail", "ext")
            ]

        status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
        return int(status.total)
    total = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    if not total:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _read("/sys/fs/cgroup/memory.max").strip()
    if limit.isdigit():
        total = min(total, int(limit)) if total else int(limit)
    return total


# --- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    stage: str
    choice: str
    reason: str


@dataclass(frozen=True)
class MemoryEstimate:
    device: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    total: int
    available: int
    fits: bool
    # Inference: the KV cache, and the margin device.margin keeps free (both inside total).
    kv_cache: int = 0
    margin: int = 0


@dataclass(frozen=True)
class Plan:
    workload: str
    device: str
    # Autocast compute dtype; weights stay fp32.
    dtype: str
    # The dtype attention runs in: the autocast dtype, or fp32 where the attention kernel is slow in it.
    attention_dtype: str
    # What single-token sampling steps read their weights as: a dtype name, or "int8" (sample.quantize).
    decode_weights: str
    compile: bool
    threads: int
    pin_memory: bool
    non_blocking: bool
    prefetch: int
    preprocess_workers: int
    grad_scaler: bool
    # FLOP/s of the compute device at the chosen dtype, the denominator of MFU.
    peak_flops: float
    # Where the model's parts sit (one segment for a single device); inference may split them.
    placements: tuple[Segment, ...]
    memory: tuple[MemoryEstimate, ...]
    decisions: tuple[Decision, ...]
    inventory: Inventory
    # device.alias: (simulated device, device of this machine) pairs the plan runs on.
    aliases: tuple[tuple[str, str], ...] = ()
    # Inference: predicted tokens per second of decoding (per sequence) and of prefill.
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    # Training: sequences per forward/backward, micro-batches per optimizer step on this process, every N-th block
    # recomputed in backward (0: none), and the AdamW state stepped in CPU RAM.
    micro_batch_size: int = 0
    accumulation: int = 1
    checkpoint_every: int = 0
    optimizer_offload: bool = False
    # Training under torchrun: "ddp" replicas or "fsdp" shards ("none" for one process).
    parallel: str = "none"
    # Training compiles the whole forward as one graph rather than each block in place.
    compile_whole: bool = False

    def physical(self, device: str) -> torch.device:
        """The torch device that runs the plan's ``device`` (itself unless device.alias maps it)."""
        return torch.device(dict(self.aliases).get(device, device))

    @property
    def torch_device(self) -> torch.device:
        """Where inputs meet the model's output: the device of its head (the only one, unless split)."""
        return self.physical(self.device)

    @property
    def split(self) -> bool:
        return len({segment.device for segment in self.placements}) > 1

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.dtype == "fp32" else DTYPES[self.dtype]

    @property
    def decode_dtype(self) -> torch.dtype:
        """The dtype single-token steps compute in: fp32 for int8 weights (only the products read int8)."""
        return DTYPES.get(self.decode_weights, torch.float32)

    def weights_in_use(self, model: Any, decoder: Any = None) -> dict[str, int]:
        """Bytes of weights (the model's, and a decoder's prepared copies) now held per device of ``placements``,
        to set beside the plan's prediction (``memory``'s weights)."""
        used = {s.device: 0 for s in self.placements}
        layers = list(model.model.layers)
        copies = list(decoder.layers) if decoder is not None else [()] * len(layers)
        seen: set[int] = set()

        def add(device: str, *tensors: Any) -> None:
            for tensor in tensors:
                for leaf in (tensor if isinstance(tensor, tuple) else (tensor,)):
                    if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() not in seen:
                        seen.add(leaf.untyped_storage().data_ptr())
                        used[device] += leaf.untyped_storage().nbytes()

        for segment in self.placements:
            if segment.embed:
                add(segment.device, model.model.embed_tokens.weight, getattr(decoder, "embed", None))
            for i in range(*segment.layers):
                add(segment.device, *layers[i].parameters(), *copies[i])
            if segment.head:
                add(segment.device, *model.model.norm.parameters(), model.lm_head.weight, getattr(decoder, "head", None))
        return used

    def place_model(self, model: Any) -> None:
        """Move a Transformer's parts to the devices of ``placements`` (through device.alias)."""
        blocks = [self.physical(s.device) for s in self.placements for _ in range(s.blocks)]
        embed = next(self.physical(s.device) for s in self.placements if s.embed)
        head = next(self.physical(s.device) for s in self.placements if s.head)
        model.place(embed, blocks, head)

    def decoding(self, device: torch.device) -> Decoding:
        """How sampling runs a model that sits on ``device`` under this plan.

        On the CPU prefill stays fp32 whatever the plan's dtype, like the steps there (``_choose_decode_weights``),
        so CPU sampling is full precision unless int8 weights are asked for. A plan made for another kind of
        device (a CUDA plan for a model left on the CPU) says nothing about the steps on this one.
        """
        prefill = self.autocast_dtype if device.type != "cpu" else None
        if device.type != self.torch_device.type:
            return Decoding(prefill_autocast=prefill)
        return Decoding(prefill_autocast=prefill, dtype=self.decode_dtype, int8=self.decode_weights == "int8")

    @property
    def fits(self) -> bool:
        return all(m.fits for m in self.memory)

    def prepare_model(self, model: Any) -> None:
        """Give a Transformer the plan's per-module settings: attention's dtype where it differs from autocast's, and
        which blocks recompute their activations in backward."""
        model.checkpoint_every = self.checkpoint_every
        if self.attention_dtype == self.dtype:
            model.set_attention_dtype(None)
        else:
            model.set_attention_dtype(DTYPES[self.attention_dtype])

    def compile_model(self, model: Any) -> Any:
        """What training calls for its forward pass: the model itself with each block compiled in place, or a
        compiled wrapper of the whole (the model's own names, which checkpoints use, do not change either way)."""
        if not self.compile:
            return model
        if self.compile_whole:
            return torch.compile(model)
        model.compile_blocks()
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region forward passes run in (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=self.autocast_dtype)

    def apply(self) -> None:
        """Set process-wide torch state from the plan; call once before the work starts."""
        for name in dict.fromkeys([self.device, *(s.device for s in self.placements)]):
            device = self.physical(name)
            index = device.index or 0
            missing = {"cuda": not torch.cuda.is_available() or index >= torch.cuda.device_count(),
                       "mps": not torch.backends.mps.is_available()}
            if missing.get(device.type, False):
                shown = name if str(device) == name else f"{name} (aliased to {device})"
                raise HetlmError(
                    f"the plan puts work on {shown}, which this machine does not have (was the plan made from a "
                    f"simulated inventory? unset {INVENTORY_ENV}, or map its devices with device.alias)"
                )
        torch.set_num_threads(self.threads)
        if self.torch_device.type == "cuda":
            torch.cuda.set_device(self.torch_device)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["placements"] = [dict(p, layers=list(p["layers"])) for p in data["placements"]]
        data["aliases"] = [list(pair) for pair in self.aliases]
        data["inventory"] = self.inventory.to_dict()
        data["fits"] = self.fits
        return data


def planning_model(config: Config) -> ModelConfig:
    """The model section with its vocabulary size filled in from the data section when unset."""
    return dataclasses.replace(config.model, vocab_size=config.model.vocab_size or config.data.vocab_size)


@functools.lru_cache(maxsize=32)
def _sizes(model_fields: tuple) -> tuple[int, int]:
    # Counting builds the model on the meta device, which takes a second at GPT-2 size; plans ask repeatedly.
    model = ModelConfig(*model_fields)
    return parameter_counts(model)["total"], flops_per_token(model)


def _parameters(model: ModelConfig) -> int:
    return _sizes(dataclasses.astuple(model))[0]


def _flops_per_token(model: ModelConfig) -> int:
    return _sizes(dataclasses.astuple(model))[1]


def _root_parameters(model: ModelConfig) -> int:
    """Parameters outside the blocks: the embedding (tied to the head or not) and the final norm."""
    untied = 0 if model.tie_embeddings else model.vocab_size * model.d_model
    return model.vocab_size * model.d_model + untied + model.d_model


def make_plan(inventory: Inventory, config: Config, workload: str = "train", world_size: int = 1, local_rank: int = 0) -> Plan:
    """Decide where and how ``workload`` runs on ``inventory``; pure, so equal inputs give equal plans.

    Under torchrun each process plans for itself: ``world_size`` processes share the machine and
    this one is ``local_rank`` among those on it.
    """
    if workload not in WORKLOADS:
        raise UsageError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if world_size < 1 or not 0 <= local_rank < world_size:
        raise UsageError(f"bad process layout: local rank {local_rank} of world size {world_size}")
    decisions: list[Decision] = []
    free_cpus = max(1, math.floor(inventory.cpu.logical_cpus - inventory.cpu.load + 0.5))
    workers = config.data.workers or free_cpus
    workers_why = (
        "set by data.workers" if config.data.workers else
        f"one per free CPU ({free_cpus} of {inventory.cpu.logical_cpus} at load {inventory.cpu.load:g}) for tokenizing shards"
    )
    if workload == "preprocess":
        decisions.append(Decision("device", "cpu", "tokenizing is CPU work; no accelerator helps SentencePiece"))
        decisions.append(Decision("preprocess workers", str(workers), workers_why))
        threads = config.device.threads or inventory.cpu.cores
        return Plan(
            workload=workload, device="cpu", dtype="fp32", attention_dtype="fp32", decode_weights="fp32", compile=False,
            threads=threads, pin_memory=False, non_blocking=False, prefetch=config.device.prefetch,
            preprocess_workers=workers, grad_scaler=False, peak_flops=_cpu_peak(inventory.cpu, "fp32", threads),
            placements=(), memory=(), decisions=tuple(decisions), inventory=inventory,
        )

    model = planning_model(config)
    caps = parse_memory_caps(config.device.memory)
    aliases = _check_aliases(inventory, parse_aliases(config.device.alias), caps)
    device, why = _choose_device(inventory, config.device.device, world_size, local_rank)
    decisions.append(Decision("device", device, why))
    if aliases:
        decisions.append(Decision(
            "aliasing", ", ".join(f"{a}={b}" for a, b in aliases),
            "device.alias runs this plan for the simulated machine on this one's devices; the simulated memory "
            "budgets still bind",
        ))
    kind = device.split(":")[0]
    cuda = inventory.cuda[int(device.split(":")[1])] if kind == "cuda" else None
    training = workload == "train"

    dtype, why = _choose_dtype(inventory, cuda, kind, model, config.device.dtype)
    decisions.append(Decision("dtype", dtype, why))
    attention_dtype = dtype
    if kind == "cpu" and dtype == "bf16":
        attention_dtype = "fp32"
        decisions.append(Decision(
            "attention", "fp32",
            "torch's CPU flash-attention kernel is about 6x slower in bf16 than in fp32 (forward and backward at "
            "the baby shape: 6.4 vs 1.0 ms), so attention upcasts while the matmuls around it stay bf16",
        ))
    # Only sampling reads decode weights: a training config that asks for int8 is not held to its limits.
    inference = workload in INFERENCE
    quantize = config.sample.quantize if inference else "none"
    decode_weights, why = _choose_decode_weights(kind, dtype, quantize, model)
    if inference:
        decisions.append(Decision("decode weights", decode_weights, why))
    grad_scaler = training and dtype == "fp16"
    if grad_scaler:
        decisions.append(Decision("grad scaler", "on", "fp16 gradients underflow without loss scaling"))

    threads, why = _choose_threads(inventory.cpu, kind, config.device.threads, world_size)
    decisions.append(Decision("threads", str(threads), why))
    if cuda is not None:
        peak = _cuda_peak(cuda, dtype)[0]
    else:
        peak = _mps_peak(inventory.cpu) if kind == "mps" else _cpu_peak(inventory.cpu, dtype, threads)

    fit = _fit_training(config, inventory, device, dtype, world_size, caps, decisions) if training else None
    micro_batch = fit.micro_batch if fit is not None else config.eval.batch_size
    accumulation = fit.accumulation if fit is not None else 1
    tokens_per_step = micro_batch * accumulation * model.context_length * world_size
    compile_, why = _choose_compile(inventory, kind, config, workload, model, micro_batch, tokens_per_step / world_size,
                                    peak)
    # The whole forward, embedding to loss, as one graph fuses what the blocks leave outside (RoPE tables, final
    # norm, head and loss): 37.2k against 27.2k tokens/s at the baby shape, 5.2k against 5.0k at ~10M (bf16, 2 EPYC
    # cores, measured alternating). Kept to one process without dropout or recomputation, where the compiled
    # graph draws no random numbers and holds no checkpointed region; evaluation and samples stay eager there.
    compile_whole = compile_ and training and world_size == 1 and not (model.dropout or model.attention_dropout) \
        and not (fit.checkpoint_every or fit.offload)
    decisions.append(Decision(
        "compile", ("on (the whole forward)" if compile_whole else "on (each block)") if compile_ else "off", why))
    if training:
        plain_step = _estimated_run_seconds(config, model, kind, micro_batch, tokens_per_step / world_size, peak,
                                            steps=1)
        step = plain_step * (1 + len(range(0, model.n_layers, fit.checkpoint_every)) / model.n_layers / 3
                             if fit.checkpoint_every else 1)
        if fit.offload:
            # Gradients out and weights back over the host link each step; the CPU's AdamW step hides behind
            # backward unless clipping makes it step again after.
            params = _parameters(model)
            link = (cuda.link_bandwidth or CUDA_LINK) if cuda is not None else CUDA_LINK
            cpu_bandwidth = inventory.cpu.memory_bandwidth or min(CPU_MAX_BANDWIDTH, CPU_CORE_BANDWIDTH * inventory.cpu.cores)
            step += 2 * (2 if dtype != "fp32" else 4) * params / link + (
                28 * params / cpu_bandwidth if config.train.grad_clip > 0 else 0)
        seconds = _estimated_run_seconds(config, model, kind, micro_batch, tokens_per_step / world_size, peak) \
            * step / plain_step
        budget = f", capped by train.max_time={config.train.max_time}" if config.train.max_time else ""
        versus = f" (the plain plan: {plain_step:.3g} s)" if step != plain_step else ""
        decisions.append(Decision(
            "training time", f"about {_duration(seconds)}",
            f"{step:.3g} s per step{versus}; {config.train.max_steps:,} steps at an assumed {ASSUMED_MFU:.0%} of the "
            f"peak below (or the per-layer floor of small models){budget}, before compiling; the first log lines give "
            "the measured rate and ETA",
        ))

    # Pinned memory needs a real CUDA device, whatever the simulated inventory says.
    pinned = torch.device(dict(aliases).get(device, device)).type == "cuda"
    decisions.append(Decision(
        "data loading",
        f"background thread, prefetch {config.device.prefetch}" + (", pinned" if pinned else ""),
        "memmap window sampling is light CPU work; a bounded queue keeps the next batches ready"
        + (" in pinned memory so host-to-GPU copies overlap compute (non_blocking)" if pinned
           else "; pinned memory and non_blocking copies matter only for CUDA"),
    ))
    decisions.append(Decision("preprocess workers", str(workers), workers_why))

    if kind == "cuda" and world_size == 1 and len(inventory.cuda) > 1:
        n = len(inventory.cuda)
        decisions.append(Decision(
            "parallelism", "one process",
            f"{n} CUDA devices: run `torchrun --nproc_per_node {n} -m hetlm train ...` for data parallel training on all",
        ))

    decode_rate = prefill_rate = 0.0
    if inference:
        placements, memory, decode_rate, prefill_rate, device = _place_for_inference(
            inventory, config, workload, device, dtype, threads, quantize, caps, decisions)
        if placements[-1].device.split(":")[0] != kind:
            # An explicit map put the head elsewhere: the plan's dtype is that device's.
            kind = device.split(":")[0]
            cuda = inventory.cuda[int(device.split(":")[1])] if kind == "cuda" else None
            dtype, why = _choose_dtype(inventory, cuda, kind, model, config.device.dtype)
            attention_dtype = "fp32" if kind == "cpu" and dtype == "bf16" else dtype
            decode_weights, _ = _choose_decode_weights(kind, dtype, quantize, model)
            decisions.append(Decision("dtype", dtype, f"the head sits on {device}: {why}"))
    else:
        placements = whole(device, model.n_layers)
        decisions.append(Decision("placement", f"layers 0-{model.n_layers - 1} on {device}",
                                  "training runs each process's whole model on one device"))
        decisions.append(_memory_decision(config, fit.memory[0], micro_batch, dtype, training, world_size, fit))
        memory = fit.memory

    return Plan(
        workload=workload,
        device=device,
        dtype=dtype,
        attention_dtype=attention_dtype,
        decode_weights=decode_weights,
        compile=compile_,
        compile_whole=compile_whole,
        threads=threads,
        pin_memory=pinned,
        non_blocking=pinned,
        prefetch=config.device.prefetch,
        preprocess_workers=workers,
        grad_scaler=grad_scaler,
        peak_flops=peak,
        placements=placements,
        memory=memory,
        decisions=tuple(decisions),
        inventory=inventory,
        aliases=aliases,
        decode_tokens_per_s=decode_rate,
        prefill_tokens_per_s=prefill_rate,
        micro_batch_size=micro_batch if training else 0,
        accumulation=accumulation,
        checkpoint_every=fit.checkpoint_every if fit is not None else 0,
        optimizer_offload=fit.offload if fit is not None else False,
        parallel=fit.parallel if fit is not None else "none",
    )


@dataclass(frozen=True)
class TrainingFit:
    micro_batch: int
    accumulation: int
    # 0: no activation checkpointing; N: every N-th block recomputes its activations in backward.
    checkpoint_every: int
    offload: bool
    memory: tuple[MemoryEstimate, ...]
    plain: MemoryEstimate
    # "none" (one process), "ddp" or "fsdp".
    parallel: str = "none"


def _global_sequences(config: Config, world_size: int) -> int:
    """Sequences per optimizer step on each process: the global batch's share, or 16 when it is not set."""
    T = planning_model(config).context_length
    if config.train.global_batch_tokens:
        return max(1, round(config.train.global_batch_tokens / (T * world_size)))
    return config.train.micro_batch_size or DEFAULT_MICRO_BATCH


def _fit_training(config: Config, inventory: Inventory, device: str, dtype: str, world_size: int,
                  caps: dict[str, int], decisions: list[Decision]) -> TrainingFit:
    """Micro-batch, accumulation, activation checkpointing and optimizer offload for the memory there is."""
    model = planning_model(config)
    tc = config.train
    kind = device.split(":")[0]
    cuda = inventory.cuda[int(device.split(":")[1])] if kind == "cuda" else None
    available = _available_memory(inventory, kind, cuda, world_size, caps)
    ram = _available_memory(inventory, "cpu", None, world_size, caps)
    sequences = _global_sequences(config, world_size)
    L = model.n_layers
    # Least recomputation first: one block in L, then denser, then every block.
    spacings = sorted({L, *(max(1, L // k) for k in range(2, L + 1)), 1}, reverse=True)
    wanted = tc.activation_checkpointing
    if wanted == "none":
        options = [0]
    elif wanted == "all":
        options = [1]
    elif wanted == "auto":
        options = [0, *spacings]
    else:
        options = [int(wanted)]
    speculative = tc.grad_clip > 0
    offload_ram = offload_estimate(config, ram, speculative)

    def choose(offload: bool, shards: int = 1) -> tuple[int, int, MemoryEstimate]:
        """Micro-batch and checkpoint spacing with the least recomputation that fits, with or without offload, the
        training state whole or sharded over ``shards`` processes."""
        def estimate(micro: int, spacing: int) -> MemoryEstimate:
            return memory_estimate(config, device, micro, dtype, True, available, spacing, offload, shards)

        if tc.micro_batch_size:
            micro = tc.micro_batch_size
            spacing = next((n for n in options if estimate(micro, n).fits), options[-1])
        else:
            micro, spacing = 0, options[-1]
            for n in options:
                micro = largest_micro_batch(config, device, dtype, True, available, sequences, n, offload, shards)
                if micro:
                    spacing = n
                    break
            # Prefer a micro-batch that divides the step's sequences, unless that costs more than half of it.
            if micro:
                exact = next(b for b in range(micro, 0, -1) if sequences % b == 0)
                micro = exact if exact * 2 > micro else micro
            micro = max(1, micro)
        return micro, spacing, estimate(micro, spacing)

    micro, spacing, chosen = choose(False)
    parallel, why_parallel = _choose_parallel(tc.parallel, world_size, chosen.fits, device)
    if parallel == "fsdp":
        micro, spacing, sharded = choose(False, world_size)
        if tc.parallel == "auto" and not sharded.fits:
            parallel, why_parallel = "ddp", f"the training state does not fit {device} sharded over {world_size} either"
        else:
            chosen = sharded
    shards = world_size if parallel == "fsdp" else 1
    if parallel == "ddp":
        micro, spacing, chosen = choose(False)
    if tc.optimizer_offload == "on":
        offload, why_offload = True, "set by train.optimizer_offload"
    elif tc.optimizer_offload == "off" or kind == "cpu":
        offload = False
        why_offload = "set by train.optimizer_offload" if tc.optimizer_offload == "off" else \
            "training runs on the CPU: its RAM already holds the optimizer state"
    elif chosen.fits:
        offload, why_offload = False, f"weights, gradients, AdamW state and activations fit {device}" + (
            f" once sharded over {world_size} processes" if shards > 1 else "")
    elif world_size > 1:
        offload, why_offload = False, "the optimizer offload runs in a single process; under torchrun FSDP2 shards instead"
    else:
        offload = offload_ram.fits and choose(True)[2].fits
        why_offload = (f"training does not fit {device} even with activation checkpointing, but fits once the AdamW "
                       "moments and fp32 master weights move to RAM, where the CPU steps them while backward runs"
                       if offload else f"moving the AdamW state to RAM would not make it fit {device} either")
    if offload:
        if dtype == "fp16":
            raise UsageError("train.optimizer_offload does not work with fp16's gradient scaler; use bf16 or fp32")
        micro, spacing, chosen = choose(True)
    accumulation = max(1, math.ceil(sequences / micro)) if tc.global_batch_tokens or not tc.micro_batch_size else 1
    plain = memory_estimate(config, device, micro, dtype, True, available, shards=shards)
    how = "set by train.micro_batch_size" if tc.micro_batch_size else (
        f"the largest that fits, up to the {sequences} sequences of a step")
    decisions.append(Decision("micro-batch", f"{micro} x {accumulation} accumulation", how))
    if spacing:
        recomputed = len(range(0, L, spacing))
        checkpoint_why = "set by train.activation_checkpointing" if wanted != "auto" else (
            f"the least recomputation that fits micro-batch {micro}: activations {_gib(plain.activations)} -> "
            f"{_gib(chosen.activations)}")
        decisions.append(Decision("activation checkpointing", f"{recomputed} of {L} blocks", checkpoint_why + (
            "; recomputing a block costs about a third of its step time")))
    else:
        decisions.append(Decision("activation checkpointing", "none",
                                  "set by train.activation_checkpointing" if wanted != "auto" else
                                  "activations fit without recomputation"))
    decisions.append(Decision("optimizer offload", "on" if offload else "off", why_offload))
    if world_size > 1:
        decisions.append(Decision("parallelism", f"{parallel.upper()} x{world_size} "
                                  f"({'NCCL' if kind == 'cuda' else 'gloo'})", why_parallel))
    memory = (chosen, offload_ram) if offload else (chosen,)
    return TrainingFit(micro, accumulation, spacing, offload, memory, plain, parallel)


def _choose_parallel(wanted: str, world_size: int, whole_fits: bool, device: str) -> tuple[str, str]:
    """How torchrun's processes share the model: none alone, else DDP replicas or FSDP2 shards."""
    if world_size == 1:
        if wanted == "fsdp":
            raise UsageError("train.parallel=fsdp shards the model over processes started by torchrun (or shown by "
                             "`hetlm plan --nproc N`): one process has nothing to shard over; use auto or ddp")
        return "none", "one process"
    if wanted != "auto":
        return wanted, f"set by train.parallel; torchrun started {world_size} processes"
    if whole_fits:
        return "ddp", (f"torchrun started {world_size} processes and each holds the whole training state on {device}; "
                       "replicas need one gradient all-reduce per step and no gathers")
    return "fsdp", (f"weights, gradients and AdamW state do not fit {device} whole: FSDP2 shards them over the "
                    f"{world_size} processes and gathers each block as it runs")


@dataclass(frozen=True)
class RankProfile:
    """What the other processes need to know of one process's plan: every process gathers all of them once."""

    device: str
    peak_flops: float
    micro_batch: int
    parallel: str
    dtype: str = "fp32"

    @classmethod
    def of(cls, plan: Plan) -> RankProfile:
        return cls(plan.device, plan.peak_flops, plan.micro_batch_size, plan.parallel, plan.dtype)


@dataclass(frozen=True)
class RankShare:
    """One process's part of a training step, and the planner's prediction of the seconds it takes."""

    sequences: int
    micro_sizes: tuple[int, ...]
    step_seconds: float


def agreed_profiles(profiles: list[RankProfile]) -> list[RankProfile]:
    """Every process's profile once they agree how to share the model: one process that needs shards makes all of
    them shard (sharding only lowers what each one holds)."""
    parallel = "fsdp" if any(profile.parallel == "fsdp" for profile in profiles) else profiles[0].parallel
    return [dataclasses.replace(profile, parallel=parallel) for profile in profiles]


def step_sequences(config: Config, plan: Plan, world_size: int) -> int:
    """Sequences in one optimizer step across all processes."""
    T = planning_model(config).context_length
    if config.train.global_batch_tokens:
        return max(world_size, round(config.train.global_batch_tokens / T))
    return plan.accumulation * plan.micro_batch_size * world_size


def share_weights(config: Config, profiles: list[RankProfile]) -> list[float] | None:
    """Each process's weight in the step: equal, or as train.rank_shares gives them; None for auto (and measure,
    until the trainer has timed the model), which balances the predicted step times."""
    wanted, world = config.train.rank_shares, len(profiles)
    if wanted == "equal" or world == 1:
        return [1.0] * world
    if wanted in ("auto", "measure"):
        return None
    weights = [float(w) for w in wanted.split(",")]
    if len(weights) != world:
        raise UsageError(f"train.rank_shares gives {len(weights)} weights for {world} processes")
    return weights


def lay_out_ranks(config: Config, profiles: list[RankProfile], weights: list[float] | None, sequences: int) -> list[RankShare]:
    """Every process's sequences of a step, cut into micro-batches, with its predicted step time.

    Shares are in proportion to ``weights``; without them (train.rank_shares=auto) each sequence goes to the
    process that would finish it soonest by the predicted step times, which also counts the fixed cost of a
    process's extra micro-batches that a proportion of FLOP/s leaves out.

    Under DDP each process cuts its share into micro-batches as large as its plan allows, however many that
    makes. FSDP2 gathers weights and reduces gradients in every micro-batch, a collective all processes must
    enter alike, so there every process takes the same number of micro-batches, each within its own plan's size.
    """
    model = planning_model(config)

    def seconds(profile: RankProfile, micro_sizes: list[int]) -> float:
        return _estimated_run_seconds(config, model, profile.device.split(":")[0], micro_sizes[0],
                                      sum(micro_sizes) * model.context_length, profile.peak_flops, steps=1)

    def cut(share: int, profile: RankProfile) -> list[int]:
        micro = min(profile.micro_batch, share)
        return [micro] * (share // micro) + ([share % micro] if share % micro else [])

    if len(profiles) == 1:
        shares = [sequences]
    elif weights is not None:
        shares = rank_shares(sequences, weights)
    else:
        _check_one_each(sequences, len(profiles))
        shares = [1] * len(profiles)
        for _ in range(sequences - len(profiles)):
            finish = [seconds(p, cut(share + 1, p)) for share, p in zip(shares, profiles, strict=True)]
            shares[finish.index(min(finish))] += 1
    if any(profile.parallel == "fsdp" for profile in profiles):
        count = max(math.ceil(share / min(p.micro_batch, share)) for share, p in zip(shares, profiles, strict=True))
        if min(shares) < count:
            raise UsageError(
                f"FSDP2 needs the same number of micro-batches ({count}) on every process, but a share of "
                f"{min(shares)} sequences cannot make that many: raise train.global_batch_tokens, or give "
                "train.rank_shares closer weights")
        sizes = [[share // count + (1 if i < share % count else 0) for i in range(count)] for share in shares]
    else:
        sizes = [cut(share, profile) for share, profile in zip(shares, profiles, strict=True)]
    return [RankShare(share, tuple(micro), seconds(profile, micro))
            for share, micro, profile in zip(shares, sizes, profiles, strict=True)]


@dataclass(frozen=True)
class RankPlan:
    """``hetlm plan --nproc``: every process's plan, its share of a step, and the same with equal shares."""

    plans: tuple[Plan, ...]
    shares: tuple[RankShare, ...]
    equal: tuple[RankShare, ...]

    def idle(self, shares: tuple[RankShare, ...]) -> float:
        """Seconds per step the least busy process waits for the slowest."""
        times = [part.step_seconds for part in shares]
        return max(times) - min(times)

    def to_dict(self) -> dict[str, Any]:
        return {"ranks": [{"rank": rank, "device": plan.device, **dataclasses.asdict(part),
                           "equal_step_seconds": even.step_seconds}
                          for rank, (plan, part, even) in enumerate(zip(self.plans, self.shares, self.equal, strict=True))],
                "parallel": self.plans[0].parallel, "idle_seconds": self.idle(self.shares),
                "equal_idle_seconds": self.idle(self.equal)}


def plan_ranks(inventory: Inventory, config: Config, world_size: int) -> RankPlan:
    """Training under torchrun with ``world_size`` processes on this machine, as every one of them will plan it."""
    plans = [make_plan(inventory, config, "train", world_size, rank) for rank in range(world_size)]
    profiles = agreed_profiles([RankProfile.of(plan) for plan in plans])
    if profiles[0].parallel != plans[0].parallel and config.train.parallel == "auto":
        # Planned again as sharded, so that every process's table shows what it will hold.
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, parallel=profiles[0].parallel))
        plans = [make_plan(inventory, config, "train", world_size, rank) for rank in range(world_size)]
    sequences = step_sequences(config, plans[0], world_size)
    shares = lay_out_ranks(config, profiles, share_weights(config, profiles), sequences)
    equal = lay_out_ranks(config, profiles, [1.0] * world_size, sequences)
    return RankPlan(tuple(plans), tuple(shares), tuple(equal))


def _check_one_each(sequences: int, processes: int) -> None:
    if sequences < processes:
        raise UsageError(f"a step of {sequences} sequences cannot give each of {processes} processes one: raise "
                         "train.global_batch_tokens")


def rank_shares(sequences: int, weights: list[float]) -> list[int]:
    """Whole sequences per process in proportion to ``weights``, summing to ``sequences``, each at least one
    (largest remainders get the sequences that rounding down leaves)."""
    _check_one_each(sequences, len(weights))
    exact = [sequences * w / sum(weights) for w in weights]
    shares = [max(1, math.floor(x)) for x in exact]
    while sum(shares) > sequences:
        shares[max(range(len(shares)), key=lambda i: shares[i] - exact[i])] -= 1
    order = sorted(range(len(shares)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in order[: sequences - sum(shares)]:
        shares[i] += 1
    return shares


def _check_aliases(inventory: Inventory, aliases: dict[str, str], caps: dict[str, int]) -> tuple[tuple[str, str], ...]:
    names = _device_names(inventory)
    for device in [*aliases, *caps]:
        if device not in names:
            setting = "device.alias" if device in aliases else "device.memory"
            raise UsageError(f"{setting} names {device}, which this machine does not have ({', '.join(names)})")
    return tuple(sorted(aliases.items()))


def _device_names(inventory: Inventory) -> tuple[str, ...]:
    return (*(f"cuda:{d.index}" for d in inventory.cuda), *(("mps",) if inventory.mps else ()), "cpu")


def _sequences(config: Config, inventory: Inventory, workload: str, device: str, decode_weights: str,
               decisions: list[Decision]) -> int:
    """Sequences decoded at once: what the KV cache and the prefill buffers are sized for."""
    if workload == "eval":
        return config.eval.batch_size
    if workload == "serve":
        slots, why = serving_slots(config, inventory, device, decode_weights)
        decisions.append(Decision("serving slots", str(slots), why))
        return slots
    return 1


def _device_spec(inventory: Inventory, device: str, dtype: str, threads: int, caps: dict[str, int],
                 margin: str) -> DeviceSpec:
    kind = device.split(":")[0]
    cuda = inventory.cuda[int(device.split(":")[1])] if kind == "cuda" else None
    available = _available_memory(inventory, kind, cuda, 1, caps)
    if cuda is not None:
        bandwidth = cuda.memory_bandwidth or _cuda_bandwidth(cuda)
        link, latency = cuda.link_bandwidth or CUDA_LINK, CUDA_LINK_LATENCY
        peak = _cuda_peak(cuda, dtype if cuda.bf16 or dtype != "bf16" else "fp16")[0]
    elif kind == "mps":
        # Unified memory: no copy crosses a bus, but a hand-over still waits for the GPU's queue.
        bandwidth, link, latency, peak = _mps_bandwidth(inventory.cpu), 100e9, 20e-6, _mps_peak(inventory.cpu)
    else:
        cpu = inventory.cpu
        bandwidth = cpu.memory_bandwidth or min(CPU_MAX_BANDWIDTH, CPU_CORE_BANDWIDTH * max(1, min(threads, cpu.cores)))
        link, latency, peak = 1e12, 0.0, _cpu_peak(cpu, "fp32", threads)
    return DeviceSpec(device, available, margin_bytes(margin, available), RUNTIME_OVERHEAD[kind], bandwidth, link, latency,
                      DECODE_LAYER_SECONDS[kind], peak)


def _cuda_bandwidth(device: CudaDevice) -> float:
    for fragment, bandwidth in CUDA_BANDWIDTH:
        if fragment in device.name:
            return bandwidth
    return 2e12 if device.capability >= (9, 0) else 1e12 if device.capability >= (8, 0) else 0.3e12


def _mps_bandwidth(cpu: CpuInfo) -> float:
    for tier, bandwidth in (("Ultra", 800e9), ("Max", 400e9), ("Pro", 200e9)):
        if tier in cpu.model_name:
            return bandwidth
    return 100e9


def _place_for_inference(
    inventory: Inventory, config: Config, workload: str, device: str, dtype: str, threads: int, quantize: str,
    caps: dict[str, int], decisions: list[Decision],
) -> tuple[tuple[Segment, ...], tuple[MemoryEstimate, ...], float, float, str]:
    """Choose the layer map for inference; returns it with memory per device, predicted rates and the head's device."""
    model = planning_model(config)
    names = _device_names(inventory)
    primary_kind = device.split(":")[0]
    sequences = _sequences(config, inventory, workload, device,
                           _choose_decode_weights(primary_kind, dtype, quantize, model)[0], decisions)
    specs, sizes = {}, {}
    for name in names:
        kind = name.split(":")[0]
        spec_dtype = dtype if kind == device.split(":")[0] else ("fp32" if kind == "cpu" else dtype)
        specs[name] = _device_spec(inventory, name, spec_dtype, threads, caps, config.device.margin)
        decode, _ = _choose_decode_weights(kind, spec_dtype if kind != "cpu" else "fp32", quantize, model)
        sizes[name] = part_sizes(model, decode, sequences, all_logits=workload == "eval", decoder=workload != "eval")
    L = model.n_layers
    accelerators = [device] if device != "cpu" else []
    accelerators += sorted((n for n in names if n not in (device, "cpu")), key=lambda n: -specs[n].bandwidth)

    def uses(segments: tuple[Segment, ...]) -> tuple[MemoryEstimate, ...]:
        embed_device = next(s.device for s in segments if s.embed)
        out = []
        for segment in segments:
            use = device_use(segment, sizes[segment.device], specs[segment.device], embed_device)
            out.append(MemoryEstimate(use.device, use.weights, 0, 0, use.activations, use.logits, use.overhead, use.total,
                                      use.available, use.fits, kv_cache=use.kv_cache, margin=use.margin))
        return _merge_unified(inventory, tuple(out), caps)

    explicit = config.device.layers.strip()
    if explicit:
        chosen = parse_layer_map(explicit, L, names)
        why = "set by device.layers"
    elif config.device.gpu_layers >= 0:
        limit = config.device.gpu_layers
        if limit and not accelerators:
            raise UsageError(f"device.gpu_layers={limit} but this machine has no accelerator")
        if limit >= L:
            chosen, why = whole(accelerators[0], L), f"set by device.gpu_layers={limit}: every block on {accelerators[0]}"
        else:
            found = fill_from_the_end(accelerators, sizes, specs, L, "cpu", limit=limit)
            chosen = found if found is not None else _refuse(model, sequences, workload, uses(whole("cpu", L)))
            why = f"set by device.gpu_layers={limit}: the last {limit} blocks and the head on the accelerators"
    else:
        chosen, why = _auto_placement(accelerators, device, sizes, specs, L, uses, model, sequences, workload)
    memory = uses(chosen)
    if not all(m.fits for m in memory):
        _refuse(model, sequences, workload, memory)
    step = step_seconds(chosen, sizes, specs)
    flops = _flops_per_token(model) / 3
    prefill = prefill_seconds(chosen, model, model.context_length, specs, flops)
    decode_rate, prefill_rate = 1 / step, model.context_length / prefill
    shown = "; ".join(f"{s.device} {s.describe()}" for s in chosen)
    decisions.append(Decision("placement", shown, f"{why}; predicted {decode_rate:,.0f} tokens/s per sequence decoding, "
                                                  f"{prefill_rate:,.0f} prefilling"))
    if len(chosen) > 1:
        decisions.append(Decision("layer map", layer_map(chosen, L), "reproduce this split with --set device.layers=..."))
    need = ", ".join(f"{m.device} {_gib(m.total)} of {_gib(m.available)}" for m in memory)
    decisions.append(Decision("memory", "fits", f"about {need} (weights, KV cache for {sequences} x "
                                                f"{model.context_length} tokens, buffers and margin)"))
    return chosen, memory, decode_rate, prefill_rate, chosen[-1].device


def _auto_placement(accelerators: list[str], device: str, sizes: dict, specs: dict, L: int, uses: Any,
                    model: ModelConfig, sequences: int, workload: str) -> tuple[tuple[Segment, ...], str]:
    alone = whole(device, L)
    if all(m.fits for m in uses(alone)):
        return alone, f"the whole model fits on {device}, the fastest device"
    split = fastest_split([*accelerators, "cpu"], sizes, specs, L)
    if split is None or not all(m.fits for m in uses(split)):
        _refuse(model, sequences, workload, uses(whole("cpu", L)))
    cpu_only = whole("cpu", L)
    if split != cpu_only and all(m.fits for m in uses(cpu_only)):
        ratio = step_seconds(cpu_only, sizes, specs) / step_seconds(split, sizes, specs)
        versus = f"; {ratio:.1f}x the predicted decoding speed of the CPU alone"
    else:
        versus = ""
    return split, (f"the model does not fit on {device}: this split has the lowest predicted step time of those that "
                   f"fit{versus}")


def _merge_unified(inventory: Inventory, memory: tuple[MemoryEstimate, ...], caps: dict[str, int]) -> tuple[MemoryEstimate, ...]:
    """On Apple machines MPS and the CPU draw on one RAM: a split between them must fit it together."""
    if not inventory.mps or {m.device for m in memory} != {"mps", "cpu"} or "cpu" in caps:
        return memory
    pool = int(inventory.cpu.ram_bytes * CPU_RAM_FRACTION)
    together = sum(m.total for m in memory)
    return tuple(dataclasses.replace(m, fits=m.fits and together <= pool) for m in memory)


def _refuse(model: ModelConfig, sequences: int, workload: str, memory: tuple[MemoryEstimate, ...]) -> Any:
    breakdown = "; ".join(
        f"{m.device} needs {_gib(m.total)} of {_gib(m.available)} (weights {_gib(m.weights)}, KV cache {_gib(m.kv_cache)}, "
        f"buffers {_gib(m.activations + m.logits)}, overhead and margin {_gib(m.overhead + m.margin)})" for m in memory)
    batch = {"eval": "eval.batch_size", "serve": "serve.max_concurrency"}.get(workload)
    ways = [f"a shorter model.context_length (now {model.context_length})"]
    if batch:
        ways.append(f"a smaller {batch} (now {sequences})")
    ways += ["sample.quantize=int8 or device.dtype=bf16 weights", "a larger device.memory cap or a smaller device.margin"]
    raise UsageError(f"no placement of the model fits this machine: {breakdown}; try {', '.join(ways)}")


def _choose_decode_weights(kind: str, dtype: str, quantize: str, model: ModelConfig) -> tuple[str, str]:
    if quantize == "int8":
        if kind != "cpu":
            return dtype, f"sample.quantize=int8 is implemented for the CPU only; on {kind} the steps run in the plan's {dtype}"
        widths = (("d_model", model.d_model), ("d_ff", model.ffn_dim))
        odd = [f"{name} {value}" for name, value in widths if value % INT8_WIDTH_MULTIPLE]
        if odd:
            raise UsageError(f"sample.quantize=int8 needs d_model and d_ff to be multiples of {INT8_WIDTH_MULTIPLE} "
                             f"(torch's int8 kernel), but this model has {', '.join(odd)}")
        return "int8", ("sample.quantize=int8: single-token steps read int8 weights with a scale per output channel, "
                        "a quarter of fp32's bytes; the prompt's prefill stays fp32")
    if kind == "cpu":
        return "fp32", ("batch-1 steps are matrix-vector products, which AMX does not speed up (bf16 measured slower); "
                        "fp32 keeps greedy output equal to the full-precision model's")
    return dtype, "the plan's dtype: the accelerator's matrix units run it"


def _choose_device(inventory: Inventory, wanted: str, world_size: int, local_rank: int) -> tuple[str, str]:
    n = len(inventory.cuda)
    if wanted == "cpu":
        return "cpu", "set by device.device"
    if wanted == "mps":
        if not inventory.mps:
            raise UsageError("device.device is mps but this machine has no Apple MPS device")
        if world_size > 1:
            raise UsageError("MPS cannot be shared by several processes; run one process or use device.device=cpu")
        return "mps", "set by device.device"
    if wanted.startswith("cuda"):
        if not n:
            raise UsageError(f"device.device is {wanted} but this machine has no CUDA device (use auto or cpu)")
        if ":" in wanted:
            index = int(wanted.split(":")[1])
            if index >= n:
                raise UsageError(f"device.device is {wanted} but this machine has only {n} CUDA device(s)")
            return wanted, "set by device.device"
    elif not n:
        if inventory.mps and world_size == 1:
            return "mps", "no CUDA device; the Apple GPU (MPS) beats the CPU for matmuls"
        return "cpu", "no CUDA device" + (" or MPS" if not inventory.mps else "; MPS cannot be shared by several processes")
    if world_size > 1:
        if world_size > n:
            raise UsageError(f"{world_size} processes but only {n} CUDA device(s): use --nproc_per_node {n} or device.device=cpu")
        return f"cuda:{local_rank}", f"process {local_rank} of {world_size} takes CUDA device {local_rank}"
    best = max(inventory.cuda, key=lambda d: (_cuda_peak(d, "bf16" if d.bf16 else "fp16")[0], d.free_memory, -d.index))
    how = "set by device.device" if wanted.startswith("cuda") else "CUDA beats MPS and the CPU"
    if n > 1:
        how += f"; the fastest of {n} CUDA devices ({best.name})"
    return f"cuda:{best.index}", how


def _choose_dtype(inventory: Inventory, cuda: CudaDevice | None, kind: str, model: ModelConfig, wanted: str) -> tuple[str, str]:
    cpu = inventory.cpu
    if wanted != "auto":
        if wanted == "bf16" and cuda is not None and not cuda.bf16:
            raise UsageError(
                f"device.dtype is bf16 but {cuda.name} (compute capability {cuda.capability[0]}.{cuda.capability[1]}) "
                "has no bf16 support; use fp16 or auto"
            )
        note = ""
        if kind == "cpu" and wanted == "bf16" and not (cpu.amx or cpu.avx512_bf16):
            note = "; this CPU has no bf16 instructions, so it is emulated and likely slower than fp32"
        if kind == "cpu" and wanted == "fp16":
            note = "; CPUs mostly emulate fp16, so expect it slower than fp32"
        return wanted, "set by device.dtype" + note
    if cuda is not None:
        if cuda.bf16:
            return "bf16", f"{cuda.name} has bf16 tensor cores: mixed precision at full fp32 range, no loss scaling"
        return "fp16", (
            f"{cuda.name} (compute capability {cuda.capability[0]}.{cuda.capability[1]} < 8.0) has no bf16; "
            "fp16 tensor cores with a gradient scaler"
        )
    if kind == "mps":
        return "fp32", "MPS autocast gains little for small models and fp16 would need loss scaling; fp32 is the safe default"
    if not (cpu.amx or cpu.avx512_bf16):
        return "fp32", "this CPU has no AMX or AVX512-BF16, so bf16 would be emulated and slower"
    if cpu.amx:
        return "bf16", "the CPU has AMX matrix units: bf16 matmuls run about 3x faster than fp32"
    if model.d_model < CPU_BF16_MIN_D_MODEL:
        return "fp32", (
            f"the CPU has AVX512-BF16 but no AMX; bf16 was measured to pay from d_model {CPU_BF16_MIN_D_MODEL}, and "
            f"this model's is {model.d_model}"
        )
    return "bf16", (f"the CPU has AVX512-BF16: its bf16 matmuls ran 4-5x faster than fp32 at d_model 128, and the "
                    f"whole step about 2x (d_model {model.d_model})")


def _choose_threads(cpu: CpuInfo, kind: str, wanted: int, world_size: int) -> tuple[int, str]:
    if wanted:
        over = wanted * world_size > cpu.logical_cpus
        note = f" (more than the {cpu.logical_cpus} usable CPUs: expect contention)" if over else ""
        return wanted, "set by device.threads" + note
    if kind == "cpu":
        # Cores that other programs keep busy would make every parallel region wait for a descheduled thread.
        free = min(cpu.cores, max(1, math.floor(cpu.logical_cpus - cpu.load + 0.5)))
        threads = max(1, free // world_size)
        share = f" shared by {world_size} processes" if world_size > 1 else ""
        busy = (f"; the load at start is {cpu.load:g} on {cpu.logical_cpus} CPUs, so {cpu.cores - free} core(s) are left "
                "to the programs keeping them busy" if free < cpu.cores else "")
        waits = ", idle threads sleep at once (OMP_WAIT_POLICY=passive)" if cpu.wait_policy == "passive" else ""
        return threads, (
            f"one per free physical core ({free}{share}): hyperthreads add nothing to matmuls, "
            f"and data loading is a light background thread{busy}{waits}"
        )
    threads = max(1, min(4, cpu.cores // world_size))
    return threads, "the accelerator does the math; a few host threads launch kernels and prepare batches"


def _estimated_run_seconds(
    config: Config, model: ModelConfig, kind: str, micro_batch: int, tokens_per_step: float, peak: float,
    steps: int | None = None,
) -> float:
    step = tokens_per_step * _flops_per_token(model) / (peak * ASSUMED_MFU)
    if kind in LAYER_SECONDS:
        micro_batches = tokens_per_step / (micro_batch * model.context_length)
        step = max(step, LAYER_SECONDS[kind] * model.n_layers * micro_batches)
    if steps is not None:
        return steps * step
    seconds = config.train.max_steps * step
    if config.train.max_time:
        seconds = min(seconds, parse_duration(config.train.max_time, "train.max_time"))
    return seconds


def _choose_compile(
    inventory: Inventory, kind: str, config: Config, workload: str, model: ModelConfig, micro_batch: int,
    tokens_per_step: float, peak: float,
) -> tuple[bool, str]:
    wanted = config.device.compile
    if wanted != "auto":
        return wanted == "on", "set by device.compile"
    if kind == "mps":
        return False, "torch.compile support for MPS is experimental"
    if inventory.platform == "win32":
        return False, "torch.compile's Inductor backend is not reliable on Windows"
    if not inventory.compiler:
        return False, "no C compiler on PATH (Inductor needs one)"
    if workload != "train":
        return False, "incremental decoding changes shapes every step, so compiled graphs would keep recompiling"
    if kind == "cpu" and model.attention_dropout > 0:
        return False, (
            "attention dropout takes CPU attention off the flash kernel, and compiled steps then measured no faster "
            "than eager, so the compile time would be lost"
        )
    seconds = _estimated_run_seconds(config, model, kind, micro_batch, tokens_per_step, peak)
    threshold = COMPILE_MIN_SECONDS[kind]
    estimate = f"the run is estimated at {_duration(seconds)}"
    if seconds < threshold:
        return False, f"{estimate}, under {_duration(threshold)}: compiling would not pay back its start-up time"
    return True, f"{estimate}: fused kernels win back the compile time"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _cuda_peak(device: CudaDevice, dtype: str) -> tuple[float, bool]:
    """Peak FLOP/s for the device and whether it came from the table (False: a rough guess)."""
    for fragment, low, fp32 in CUDA_PEAKS:
        if fragment in device.name:
            return (fp32 if dtype == "fp32" else low), True
    low = 400e12 if device.capability >= (9, 0) else 100e12 if device.capability >= (8, 0) else 30e12
    return (low / 8 if dtype == "fp32" else low), False


def _mps_peak(cpu: CpuInfo) -> float:
    # Apple does not publish FLOP/s per chip; these are fp32 shader throughputs by chip tier.
    for tier, flops in (("Ultra", 27e12), ("Max", 14e12), ("Pro", 7e12)):
        if tier in cpu.model_name:
            return flops
    return 4e12


def _cpu_peak(cpu: CpuInfo, dtype: str, threads: int) -> float:
    if dtype == "bf16" and cpu.amx:
        per_core = CPU_CORE_PEAK["amx"]
    elif dtype == "bf16" and cpu.avx512_bf16:
        per_core = CPU_CORE_PEAK["avx512_bf16"]
    else:
        per_core = CPU_CORE_PEAK["avx512" if cpu.avx512 else "other"]
    return min(threads, cpu.cores) * per_core


# --- serving slots ----------------------------------------------------------------------------------


def serving_slots(config: Config, inventory: Inventory, device: str, decode_weights: str) -> tuple[int, str]:
    """How many sequences ``hetlm serve`` decodes at once on ``device``, and why: serve.max_concurrency, or for auto
    as many KV-cache slots (with their step buffers) as fit beside the weights, at most ``MAX_AUTO_SLOTS``."""
    model = planning_model(config)
    kind = device.split(":")[0]
    low = 2 if decode_weights in ("bf16", "fp16") else 4
    L, T, V = model.n_layers, model.context_length, model.vocab_size
    kv = L * 2 * T * model.kv_heads * model.head_dim * low
    # A step's buffers per sequence: fp32 logits and sampling's sorted copy, indices and float64 CDF; attention
    # scores; the hidden state and the MLP's products.
    buffers = V * (4 + 4 + 8 + 8) + 4 * model.n_heads * T + 4 * (6 * model.d_model + 3 * model.ffn_dim)
    per_slot = kv + buffers
    params = _parameters(model)
    # The model's fp32 weights, the decoder's prepared copy, the prefill's scratch cache and its activations.
    prepared = {"int8": params + 4 * V * model.d_model, "bf16": 2 * params, "fp16": 2 * params}.get(decode_weights, 4 * params)
    fixed = 4 * params + prepared + kv + 256 * (4 * model.d_model + 3 * model.ffn_dim) * 4 + RUNTIME_OVERHEAD[kind]
    cuda = inventory.cuda[int(device.split(":")[1])] if kind == "cuda" else None
    available = _available_memory(inventory, kind, cuda, 1, parse_memory_caps(config.device.memory))
    each = f"{_size(per_slot)} per slot (KV cache {_size(kv)})"
    if config.serve.slots is not None:
        slots = config.serve.slots
        fits = fixed + slots * per_slot <= available
        return slots, f"set by serve.max_concurrency; {each}" + ("" if fits else f", more than {_gib(available)} allows")
    fit = max(0, (available - fixed) // per_slot)
    if fit < 1:
        return 1, f"{each}: not even one fits beside the weights in {_gib(available)} on {device}"
    if fit >= MAX_AUTO_SLOTS:
        return MAX_AUTO_SLOTS, f"auto: {each}; {fit} would fit in {_gib(available)} on {device}, the cap is {MAX_AUTO_SLOTS}"
    return fit, f"auto: {each}; as many as fit beside the weights in {_gib(available)} on {device}"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


# --- memory --------------------------------------------------------------------------------------


def _available_memory(inventory: Inventory, kind: str, cuda: CudaDevice | None, world_size: int,
                      caps: dict[str, int] | None = None) -> int:
    name = f"cuda:{cuda.index}" if cuda is not None else kind
    if caps and name in caps:
        return caps[name] // (world_size if kind != "cuda" else 1)
    if cuda is not None:
        return cuda.free_memory
    fraction = MPS_RAM_FRACTION if kind == "mps" else CPU_RAM_FRACTION
    return int(inventory.cpu.ram_bytes * fraction) // world_size


def memory_estimate(config: Config, device: str, micro_batch: int, dtype: str, training: bool, available: int,
                    checkpoint_every: int = 0, offload: bool = False, shards: int = 1) -> MemoryEstimate:
    """Bytes one process needs on ``device`` at ``micro_batch`` sequences, against ``available``.

    Weights stay fp32 (with AdamW's two fp32 moments when training); under autocast the
    matmul inputs and outputs saved for backward are 2 bytes, norms and RoPE products fp32.
    With ``checkpoint_every`` N, every N-th block keeps only its input and recomputes the rest in backward
    (one block's activations and their gradients live at a time then); with ``offload`` the AdamW moments live in CPU RAM
    (``offload_estimate``). With ``shards`` > 1 (FSDP2) each process keeps 1/shards of the weights, gradients and
    moments, plus what a step gathers whole: the root's parameters (embedding, final norm, head) for the whole pass,
    and two blocks at a time (the one computing and the one prefetched), with their gradients before the
    reduce-scatter.
    """
    model = planning_model(config)
    kind = device.split(":")[0]
    params = _parameters(model)
    low = dtype != "fp32"
    a = 2 if low else 4
    B, T, L = micro_batch, model.context_length, model.n_layers
    D, F, V, KE = model.d_model, model.ffn_dim, model.vocab_size, model.kv_heads * model.head_dim
    # Offloaded, the device keeps weights and gradients in the compute dtype; the fp32 masters live in RAM.
    weights = (a if offload else 4) * params
    gradients = (a if offload else 4) * params if training else 0
    optimizer = 8 * params if training and not offload else 0
    gathered = 0
    if shards > 1:
        block = (params - _root_parameters(model)) // L
        weights, gradients, optimizer = weights // shards, gradients // shards, optimizer // shards
        # Gathered in the compute dtype (MixedPrecisionPolicy), their gradients reduced in fp32.
        gathered = (a + 4) * (_root_parameters(model) + 2 * block)
    if training:
        # Per token and layer: two RMSNorms keep ~3 fp32 tensors each, RoPE two fp32 products,
        # the projections their inputs/outputs, SwiGLU four F-wide tensors.
        per_token_layer = 4 * (6 * D + 2 * (D + KE)) + a * (3 * D + 2 * KE + 4 * F)
        if model.kv_heads != model.n_heads:
            per_token_layer += a * 2 * D  # keys and values repeated to every query head
        if model.dropout > 0:
            per_token_layer += 2 * 2 * D  # int16 dropout noise of the two residual branches
        recomputed = len(range(0, L, checkpoint_every)) if checkpoint_every else 0
        # Backward through a recomputed block holds its activations and, while they are consumed, their gradients.
        kept = (L - recomputed) * per_token_layer + recomputed * a * D + (2 * per_token_layer if recomputed else 0)
        activations = B * T * (kept + 4 * D * 4)
        if model.attention_dropout > 0 and kind != "cuda":
            activations += B * L * model.n_heads * T * T * 12  # off CUDA: three fp32 score-sized tensors kept for backward
        if kind == "mps":
            activations += B * L * model.n_heads * T * T * 4 * 2  # MPS attention materialises the score matrix
        logits = B * T * V * (a + 12)  # logits, their fp32 copy, log-softmax and its gradient
    else:
        cache = B * L * 2 * T * KE * a
        activations = cache + B * T * (4 * D + 3 * F) * a
        logits = B * T * V * (a + 4)
    # Autocast keeps a low-precision copy of each fp32 weight it casts; offloaded weights already are low precision.
    casts = 2 * params if low and not offload and shards == 1 else 0
    overhead = RUNTIME_OVERHEAD[kind] + casts + gathered + int(FRAGMENTATION * (activations + logits))
    total = weights + gradients + optimizer + activations + logits + overhead
    return MemoryEstimate(
        device, weights, gradients, optimizer, activations, logits, overhead, total, available, fits=total <= available
    )


def offload_estimate(config: Config, available: int, speculative: bool) -> MemoryEstimate:
    """CPU RAM the optimizer offload takes: fp32 master weights, the AdamW moments, pinned gradient buffers, and
    with ``speculative`` stepping (clipping on) a copy of weights and moments to undo a step with."""
    params = _parameters(planning_model(config))
    weights, optimizer, gradients = 4 * params, 8 * params, 4 * params
    undo = 12 * params if speculative else 0
    total = weights + optimizer + gradients + undo
    return MemoryEstimate("cpu", weights, gradients, optimizer + undo, 0, 0, 0, total, available, fits=total <= available)


def largest_micro_batch(config: Config, device: str, dtype: str, training: bool, available: int, upper: int,
                        checkpoint_every: int = 0, offload: bool = False, shards: int = 1) -> int:
    """The largest micro-batch in [1, upper] whose estimate fits ``available`` (0 when none does)."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        if memory_estimate(config, device, mid, dtype, training, available, checkpoint_every, offload, shards).fits:
            low = mid
        else:
            high = mid - 1
    return low


def _memory_decision(
    config: Config, estimate: MemoryEstimate, micro_batch: int, dtype: str, training: bool, world_size: int,
    fit: TrainingFit | None = None,
) -> Decision:
    need, have = _gib(estimate.total), _gib(estimate.available)
    if fit is not None and fit.offload and not fit.memory[1].fits:
        return Decision("memory", "does not fit", (
            f"the offloaded optimizer state needs about {_gib(fit.memory[1].total)} of RAM but the CPU has "
            f"{_gib(fit.memory[1].available)}: use a smaller model, or a machine with more memory"))
    if estimate.fits:
        plain = "" if fit is None or fit.plain.total == estimate.total else (
            f" (without checkpointing or offload: {_gib(fit.plain.total)})")
        return Decision("memory", "fits", f"about {need} of {have} available on {estimate.device}{plain}")
    batch_key = "train.micro_batch_size" if training else "eval.batch_size"
    spacing, offload = (fit.checkpoint_every, fit.offload) if fit is not None else (0, False)
    shards = world_size if fit is not None and fit.parallel == "fsdp" else 1
    best = largest_micro_batch(config, estimate.device, dtype, training, estimate.available, micro_batch - 1, spacing,
                               offload, shards)
    if best == 0:
        return Decision("memory", "does not fit", (
            f"needs about {need} but {estimate.device} has {have}, even at {batch_key}=1: "
            "use a smaller model or context, or a device with more memory"
        ))
    if not training:
        return Decision("memory", "does not fit", (
            f"needs about {need} but {estimate.device} has {have}: use --set {batch_key}={best}"
        ))
    T = planning_model(config).context_length
    global_tokens = config.train.global_batch_tokens or micro_batch * T * world_size
    per_rank_sequences = max(1, global_tokens // (T * world_size))
    # Prefer a micro-batch that divides the global batch exactly, unless that costs more than half of it.
    exact = next((b for b in range(best, 0, -1) if per_rank_sequences % b == 0), best)
    proposal = exact if exact * 2 > best else best
    steps = math.ceil(per_rank_sequences / proposal)
    return Decision("memory", "does not fit", (
        f"needs about {need} but {estimate.device} has {have}: use --set {batch_key}={proposal} "
        f"--set train.global_batch_tokens={global_tokens} ({steps} accumulation steps keep the global batch)"
    ))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n < 2**40 else f"{n / 2**40:.2f} TiB"

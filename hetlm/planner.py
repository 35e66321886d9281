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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetlm.config import MAX_AUTO_SLOTS, Config, ModelConfig, parse_duration
from hetlm.decode import INT8_WIDTH_MULTIPLE, Decoding
from hetlm.errors import HetlmError, UsageError
from hetlm.model import flops_per_token, parameter_counts

WORKLOADS = ("train", "infer", "preprocess")
INVENTORY_ENV = "HETLM_INVENTORY"

# Without AMX, AVX512-BF16 alone speeds up only large matmuls; below this width the casts around each
# small op cost more than they save. (With AMX, bf16 pays at every size measured once attention runs in fp32.)
CPU_BF16_MIN_D_MODEL = 256
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


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_memory: int
    free_memory: int
    capability: tuple[int, int]
    bf16: bool


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
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise UsageError(f"inventory: {name} must be {kind.__name__}, got {value!r}")
    return value


def _record(cls: type, data: dict, where: str) -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        kind = tuple if f.name == "capability" else {"int": int, "str": str, "bool": bool}.get(str(f.type), object)
        values[f.name] = _field(data, f.name, kind, where=where)
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
class Placement:
    device: str
    # [start, end) range of Transformer blocks held by this device.
    layers: tuple[int, int]


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


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


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
    loader: str
    prefetch: int
    preprocess_workers: int
    grad_scaler: bool
    # FLOP/s of the compute device at the chosen dtype, the denominator of MFU.
    peak_flops: float
    placements: tuple[Placement, ...]
    memory: tuple[MemoryEstimate, ...]
    decisions: tuple[Decision, ...]
    inventory: Inventory

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.dtype]

    @property
    def decode_dtype(self) -> torch.dtype:
        """The dtype single-token steps compute in: fp32 for int8 weights (only the products read int8)."""
        return _DTYPES.get(self.decode_weights) or torch.float32

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
        """Give a Transformer the plan's per-module settings (where attention's dtype differs from autocast's)."""
        if self.attention_dtype == self.dtype:
            model.set_attention_dtype(None)
        else:
            model.set_attention_dtype(_DTYPES[self.attention_dtype] or torch.float32)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region forward passes run in (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=self.autocast_dtype)

    def apply(self) -> None:
        """Set process-wide torch state from the plan; call once before the work starts."""
        kind = self.torch_device.type
        index = self.torch_device.index or 0
        missing = {"cuda": not torch.cuda.is_available() or index >= torch.cuda.device_count(),
                   "mps": not torch.backends.mps.is_available()}
        if missing.get(kind, False):
            raise HetlmError(
                f"the plan puts the work on {self.device}, which this machine does not have "
                f"(was the plan made from a simulated inventory? unset {INVENTORY_ENV})"
            )
        torch.set_num_threads(self.threads)
        if kind == "cuda":
            torch.cuda.set_device(self.torch_device)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["placements"] = [dict(p, layers=list(p["layers"])) for p in data["placements"]]
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
    workers = config.data.workers or inventory.cpu.logical_cpus
    workers_why = (
        "set by data.workers" if config.data.workers else f"one per usable CPU ({inventory.cpu.logical_cpus}) for tokenizing shards"
    )
    if workload == "preprocess":
        decisions.append(Decision("device", "cpu", "tokenizing is CPU work; no accelerator helps SentencePiece"))
        decisions.append(Decision("preprocess workers", str(workers), workers_why))
        threads = config.device.threads or inventory.cpu.cores
        return Plan(
            workload=workload, device="cpu", dtype="fp32", attention_dtype="fp32", decode_weights="fp32", compile=False,
            threads=threads, pin_memory=False, non_blocking=False, loader="none", prefetch=config.device.prefetch,
            preprocess_workers=workers, grad_scaler=False, peak_flops=_cpu_peak(inventory.cpu, "fp32", threads),
            placements=(), memory=(), decisions=tuple(decisions), inventory=inventory,
        )

    model = planning_model(config)
    device, why = _choose_device(inventory, config.device.device, world_size, local_rank)
    decisions.append(Decision("device", device, why))
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
    quantize = config.sample.quantize if workload == "infer" else "none"
    decode_weights, why = _choose_decode_weights(kind, dtype, quantize, model)
    if workload == "infer":
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

    micro_batch = config.train.micro_batch_size if training else config.eval.batch_size
    tokens_per_step = config.train.global_batch_tokens or micro_batch * model.context_length * world_size
    compile_, why = _choose_compile(inventory, kind, config, workload, model, tokens_per_step / world_size, peak)
    decisions.append(Decision("compile", "on" if compile_ else "off", why))

    pinned = kind == "cuda"
    decisions.append(Decision(
        "data loading",
        f"background thread, prefetch {config.device.prefetch}" + (", pinned" if pinned else ""),
        "memmap window sampling is light CPU work; a bounded queue keeps the next batches ready"
        + (" in pinned memory so host-to-GPU copies overlap compute (non_blocking)" if pinned
           else "; pinned memory and non_blocking copies matter only for CUDA"),
    ))
    decisions.append(Decision("preprocess workers", str(workers), workers_why))

    placements = (Placement(device, (0, model.n_layers)),)
    decisions.append(Decision(
        "placement", f"layers 0-{model.n_layers - 1} on {device}",
        "one device holds every layer; splitting layers across devices is not supported yet",
    ))
    if kind == "cuda" and world_size == 1 and len(inventory.cuda) > 1:
        n = len(inventory.cuda)
        decisions.append(Decision(
            "parallelism", "one process",
            f"{n} CUDA devices: run `torchrun --nproc_per_node {n} -m hetlm train ...` for data parallel training on all",
        ))
    elif world_size > 1:
        backend = "NCCL" if kind == "cuda" else "gloo"
        decisions.append(Decision("parallelism", f"DDP x{world_size} ({backend})", f"torchrun started {world_size} processes"))

    available = _available_memory(inventory, kind, cuda, world_size)
    if workload == "infer":
        slots, why = serving_slots(config, inventory, device, decode_weights)
        decisions.append(Decision("serving slots", str(slots), why))
    estimate = memory_estimate(config, device, micro_batch, dtype, training, available)
    decisions.append(_memory_decision(config, estimate, micro_batch, dtype, training, world_size))

    return Plan(
        workload=workload,
        device=device,
        dtype=dtype,
        attention_dtype=attention_dtype,
        decode_weights=decode_weights,
        compile=compile_,
        threads=threads,
        pin_memory=pinned,
        non_blocking=pinned,
        loader="background-thread",
        prefetch=config.device.prefetch,
        preprocess_workers=workers,
        grad_scaler=grad_scaler,
        peak_flops=peak,
        placements=placements,
        memory=(estimate,),
        decisions=tuple(decisions),
        inventory=inventory,
    )


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
            f"the CPU has AVX512-BF16 but no AMX; at d_model {model.d_model} < {CPU_BF16_MIN_D_MODEL} per-op casts "
            "would outweigh faster matmuls"
        )
    return "bf16", f"the CPU has AVX512-BF16: bf16 matmuls run up to 2x faster than fp32 at d_model {model.d_model}"


def _choose_threads(cpu: CpuInfo, kind: str, wanted: int, world_size: int) -> tuple[int, str]:
    if wanted:
        over = wanted * world_size > cpu.logical_cpus
        note = f" (more than the {cpu.logical_cpus} usable CPUs: expect contention)" if over else ""
        return wanted, "set by device.threads" + note
    if kind == "cpu":
        threads = max(1, cpu.cores // world_size)
        share = f" shared by {world_size} processes" if world_size > 1 else ""
        return threads, (
            f"one per physical core ({cpu.cores}{share}): hyperthreads add nothing to matmuls, "
            "and data loading is a light background thread"
        )
    threads = max(1, min(4, cpu.cores // world_size))
    return threads, "the accelerator does the math; a few host threads launch kernels and prepare batches"


def _estimated_run_seconds(
    config: Config, model: ModelConfig, kind: str, micro_batch: int, tokens_per_step: float, peak: float
) -> float:
    step = tokens_per_step * _flops_per_token(model) / (peak * ASSUMED_MFU)
    if kind in LAYER_SECONDS:
        micro_batches = tokens_per_step / (micro_batch * model.context_length)
        step = max(step, LAYER_SECONDS[kind] * model.n_layers * micro_batches)
    seconds = config.train.max_steps * step
    if config.train.max_time:
        seconds = min(seconds, parse_duration(config.train.max_time, "train.max_time"))
    return seconds


def _choose_compile(
    inventory: Inventory, kind: str, config: Config, workload: str, model: ModelConfig, tokens_per_step: float, peak: float,
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
    seconds = _estimated_run_seconds(config, model, kind, config.train.micro_batch_size, tokens_per_step, peak)
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
    available = _available_memory(inventory, kind, cuda, 1)
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


def _available_memory(inventory: Inventory, kind: str, cuda: CudaDevice | None, world_size: int) -> int:
    if cuda is not None:
        return cuda.free_memory
    fraction = MPS_RAM_FRACTION if kind == "mps" else CPU_RAM_FRACTION
    return int(inventory.cpu.ram_bytes * fraction) // world_size


def memory_estimate(config: Config, device: str, micro_batch: int, dtype: str, training: bool, available: int) -> MemoryEstimate:
    """Bytes one process needs on ``device`` at ``micro_batch`` sequences, against ``available``.

    Weights stay fp32 (with AdamW's two fp32 moments when training); under autocast the
    matmul inputs and outputs saved for backward are 2 bytes, norms and RoPE products fp32.
    """
    model = planning_model(config)
    kind = device.split(":")[0]
    params = _parameters(model)
    low = dtype != "fp32"
    a = 2 if low else 4
    B, T, L = micro_batch, model.context_length, model.n_layers
    D, F, V, KE = model.d_model, model.ffn_dim, model.vocab_size, model.kv_heads * model.head_dim
    weights = 4 * params
    gradients = 4 * params if training else 0
    optimizer = 8 * params if training else 0
    if training:
        # Per token and layer: two RMSNorms keep ~3 fp32 tensors each, RoPE two fp32 products,
        # the projections their inputs/outputs, SwiGLU four F-wide tensors.
        per_token_layer = 4 * (6 * D + 2 * (D + KE)) + a * (3 * D + 2 * KE + 4 * F)
        if model.kv_heads != model.n_heads:
            per_token_layer += a * 2 * D  # keys and values repeated to every query head
        if model.dropout > 0:
            per_token_layer += 2 * 2 * D  # int16 dropout noise of the two residual branches
        activations = B * T * (L * per_token_layer + 4 * D * 4)
        if model.attention_dropout > 0 and kind != "cuda":
            activations += B * L * model.n_heads * T * T * 12  # off CUDA: three fp32 score-sized tensors kept for backward
        if kind == "mps":
            activations += B * L * model.n_heads * T * T * 4 * 2  # MPS attention materialises the score matrix
        logits = B * T * V * (a + 12)  # logits, their fp32 copy, log-softmax and its gradient
    else:
        cache = B * L * 2 * T * KE * a
        activations = cache + B * T * (4 * D + 3 * F) * a
        logits = B * T * V * (a + 4)
    overhead = RUNTIME_OVERHEAD[kind] + (2 * params if low else 0) + int(FRAGMENTATION * (activations + logits))
    total = weights + gradients + optimizer + activations + logits + overhead
    return MemoryEstimate(
        device, weights, gradients, optimizer, activations, logits, overhead, total, available, fits=total <= available
    )


def largest_micro_batch(config: Config, device: str, dtype: str, training: bool, available: int, upper: int) -> int:
    """The largest micro-batch in [1, upper] whose estimate fits ``available`` (0 when none does)."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        if memory_estimate(config, device, mid, dtype, training, available).fits:
            low = mid
        else:
            high = mid - 1
    return low


def _memory_decision(
    config: Config, estimate: MemoryEstimate, micro_batch: int, dtype: str, training: bool, world_size: int
) -> Decision:
    need, have = _gib(estimate.total), _gib(estimate.available)
    if estimate.fits:
        return Decision("memory", "fits", f"about {need} of {have} available on {estimate.device}")
    batch_key = "train.micro_batch_size" if training else "eval.batch_size"
    best = largest_micro_batch(config, estimate.device, dtype, training, estimate.available, micro_batch - 1)
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

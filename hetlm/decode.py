"""Single-token decoding steps for a batch of sequences on a KV cache, with weights prepared for them once.

Small-batch decoding is bound by per-operation overhead (and, for larger models, by reading the weights), not
arithmetic. So single-token steps do not go through ``Transformer.forward``: a ``Decoder`` prepares the
weights once for them and a step runs about 30 tensor operations per layer instead of about 60. One step
advances every sequence in a ``SlotCache`` by a token, each at its own position, so the weights read once serve
them all (what continuous batching in the server builds on). Prefill and the no-cache path use the model
itself; the tests check that a step's logits match the model's, batched or alone.

How a model decodes (the dtypes, int8 weights) is the planner's decision (``Plan.decoding``); this module
only carries it out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hetlm.config import ModelConfig
from hetlm.errors import UsageError
from hetlm.model import KVCache, Transformer, to_device

# torch's int8 kernel gives wrong numbers, or crashes, unless a matrix's inner width is a multiple of this.
INT8_WIDTH_MULTIPLE = 16


@dataclass(frozen=True)
class Decoding:
    """How a sampler runs one model: the defaults are full precision, for a model sampled without a plan."""

    # The autocast dtype prefill runs under; None runs it in fp32.
    prefill_autocast: torch.dtype | None = None
    # The dtype single-token steps and the KV cache compute in.
    dtype: torch.dtype = torch.float32
    # Whether the steps' matrix products read int8 weights (``Int8Weight``).
    int8: bool = False


class Int8Weight(NamedTuple):
    """A matrix stored for ``torch.ops.aten._weight_int8pack_mm``: values (out, in) and one scale per output row."""

    values: torch.Tensor  # int8
    scales: torch.Tensor  # bf16, the kernel's scale dtype for bf16 inputs

    @classmethod
    def quantize(cls, matrix: torch.Tensor) -> Int8Weight:
        """matrix (in, out), as ``torch.mm`` takes it -> symmetric int8 with a scale per output channel."""
        if matrix.shape[0] % INT8_WIDTH_MULTIPLE:
            raise UsageError(f"int8 weights need inner widths that are multiples of {INT8_WIDTH_MULTIPLE}, "
                             f"got a {matrix.shape[0]} x {matrix.shape[1]} matrix")
        rows = matrix.t().float()
        # Rounded to bf16 first, so the int8 values are computed against the scale the kernel will use.
        scales = (rows.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        values = torch.round(rows / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(values.contiguous(), scales)


def int8_mm(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    # The kernel is fast for bf16 inputs only (about 10x slower for fp32); its output is bf16.
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight.values, weight.scales).float()


def int8_addmm(x: torch.Tensor, h: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    return x + torch.ops.aten._weight_int8pack_mm(h.to(torch.bfloat16), weight.values, weight.scales)


class SlotCache:
    """Keys and values of up to ``slots`` sequences, each at its own length, for batched single-token steps.

    The sequences that decode together sit in rows 0..n-1 (the caller keeps them packed: a row that leaves
    takes the last one's sequence), so a step reads a prefix of the rows as a view instead of gathering them.
    """

    def __init__(self, config: ModelConfig, slots: int, device: torch.device | Sequence[torch.device],
                 dtype: torch.dtype) -> None:
        shape = (2, slots, config.kv_heads, config.context_length, config.head_dim)
        # One device for every layer, or one per layer: a split model's caches sit with their blocks.
        devices = list(device) if isinstance(device, Sequence) else [device] * config.n_layers
        # Keys and values of a layer share one tensor, so a step stores both with one copy.
        self.layers = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        # Per layer, keys and values seen as (slots*K, T, E): rows r.. are a slice of them, one matrix product per head.
        self.heads = [(kv[0].flatten(0, 1), kv[1].flatten(0, 1)) for kv in self.layers]
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def load(self, row: int, cache: KVCache) -> None:
        """Copy the positions held by ``cache`` (batch 1: a prefill's) into ``row``."""
        n = cache.length
        for kv, source in zip(self.layers, cache.layers, strict=True):
            kv[:, row, :, :n] = source[:, 0, :, :n]
        self.lengths[row] = n

    def move(self, source: int, row: int) -> None:
        """Give ``row`` the sequence held by ``source``, which is then free."""
        n = self.lengths[source]
        for kv in self.layers:
            kv[:, row, :, :n] = kv[:, source, :, :n]
        self.lengths[row], self.lengths[source] = n, 0


class Decoder:
    """One-token steps of a batch of sequences on a SlotCache, with weights prepared for them (see the module docstring).

    Queries, keys and values come from one matmul, gate and up from another, with the weights
    transposed once for ``torch.mm``. An RMSNorm's weight (and the sqrt(D) of its mean) scales the next
    matmul's inputs, so it lives in that matrix and what is left of the norm is
    ``x / sqrt(|x|^2 + D * eps)``: one vector norm and one hypot. RoPE is linear, so the 1/sqrt(head_dim)
    attention scale lives in the query weights; with each head seen as (2, E/2), rotate_half(x) * sin is
    x.flip(halves) * [-sin, sin].
    (Computing rotate_half with extra matmul columns saves an operation but reads 15% more weights per
    token at d_model 384, where reading the weights is what takes the time.)

    With ``int8``, those prepared matrices are quantized (``Int8Weight``) and the products read a quarter
    of the bytes, with bf16 inputs; the residual stream, norms, attention and the cache stay fp32.
    """

    @torch.no_grad()
    def __init__(self, model: Transformer, dtype: torch.dtype, int8: bool = False) -> None:
        config = model.config
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.d_model = config.d_model
        E, D = self.head_dim, self.d_model
        self.dtype = dtype
        self.mm, self.addmm = (int8_mm, int8_addmm) if int8 else (torch.mm, torch.addmm)
        # A model split over devices (Transformer.place) decodes each layer where its weights and cache are.
        self.devices = model.layer_devices()
        self.head_device = model.output_device
        half = E // 2
        cos = model.rope_cos.to(dtype).view(-1, 2, half)  # (context, 2, E/2)
        sin = torch.cat([-model.rope_sin[:, :half], model.rope_sin[:, half:]], dim=-1).to(dtype).view(-1, 2, half)
        floor = torch.tensor(math.sqrt(D * config.norm_eps), dtype=dtype)
        self.tables = {d: (cos.to(d), sin.to(d), floor.to(d)) for d in {*self.devices, self.head_device}}
        self.context = cos.shape[0]

        def prepare(weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor | Int8Weight:
            # (out, in) -> (in, out) for x @ W; a norm's weight and sqrt(D) are folded into the rows it scales.
            if norm is not None:
                weight = weight * (norm * math.sqrt(D))
            matrix = weight.to(dtype).t().contiguous()
            return Int8Weight.quantize(matrix) if int8 else matrix

        self.layers = []
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv = torch.cat([attn.q_proj.weight / math.sqrt(E), attn.k_proj.weight, attn.v_proj.weight])
            self.layers.append((
                prepare(qkv, block.input_layernorm.weight),
                prepare(attn.o_proj.weight),
                prepare(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), block.post_attention_layernorm.weight),
                prepare(mlp.down_proj.weight),
            ))
        self.embed = model.model.embed_tokens.weight.detach().to(dtype)
        self.head = prepare(model.lm_head.weight, model.model.norm.weight)

    @staticmethod
    def _normalized(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), floor)

    def step(self, tokens: torch.Tensor, cache: SlotCache, first_row: int = 0) -> torch.Tensor:
        """tokens (B,) of the sequences in rows first_row.. of ``cache``, each at its row's length -> logits (B, V) in fp32.

        Rows at different lengths attend over the longest one's positions with the others masked; when all are at the
        same length (one sequence, or samples of one prompt) the step needs no mask and no per-row indexing.
        """
        B, H, K, E, D = tokens.shape[0], self.n_heads, self.kv_heads, self.head_dim, self.d_model
        rows = slice(first_row, first_row + B)
        lengths = cache.lengths[rows]
        end = max(lengths) + 1
        if end > self.context:
            raise ValueError(f"a row holds {end - 1} positions, the whole context: slide its window before stepping")
        low = self.dtype != torch.float32
        x = F.embedding(tokens.to(self.embed.device), self.embed)  # (B, D)
        uniform = min(lengths) == end - 1
        heads = slice(first_row * K, (first_row + B) * K)
        device = None
        for (qkv_w, o_w, gate_up_w, down_w), kv, (keys, values), layer_device in zip(
                self.layers, cache.layers, cache.heads, self.devices, strict=True):
            if layer_device != device:
                # The first layer, or a boundary of a split model: the hidden state and the position tables move.
                device = layer_device
                x = to_device(x, device)
                cos_table, sin_table, floor = self.tables[device]
                hidden = None
                if uniform:
                    pos = end - 1
                    cos, sin = cos_table[pos], sin_table[pos]  # (2, E/2), the same for every row
                else:
                    pos = torch.tensor(lengths, device=device)  # (B,)
                    cos, sin = cos_table[pos].unsqueeze(1), sin_table[pos].unsqueeze(1)  # (B, 1, 2, E/2)
                    # Positions past a row's own length hold another sequence's leftovers (or nothing): no row sees them.
                    hidden = (torch.arange(end, device=device) > pos[:, None]).view(B, 1, 1, end)
                    row_index = torch.arange(first_row, first_row + B, device=device)
            qkv = self.mm(self._normalized(x, floor), qkv_w).view(B, H + 2 * K, 2, E // 2)
            qk = qkv[:, : H + K]
            torch.addcmul(qk * cos, qk.flip(2), sin, out=qk)  # RoPE on queries and keys, in place
            new = qkv[:, H:].view(B, 2, K, E)  # this step's keys and values
            if hidden is None:
                kv[:, rows, :, pos] = new.transpose(0, 1)
            else:
                kv[:, row_index, :, pos] = new
            # Query heads grouped by the key/value head they share: (B*K, H/K, E) against (B*K, end, E).
            scores = torch.bmm(qkv[:, :H].reshape(B * K, H // K, E), keys[heads, :end].transpose(1, 2))  # (B*K, H/K, end)
            if hidden is not None:
                scores.view(B, K, H // K, end).masked_fill_(hidden, float("-inf"))
            weights = torch.softmax(scores.float(), dim=-1).to(values.dtype) if low else torch.softmax(scores, dim=-1)
            x = self.addmm(x, torch.bmm(weights, values[heads, :end]).view(B, D), o_w)
            gate, up = self.mm(self._normalized(x, floor), gate_up_w).chunk(2, dim=-1)
            x = self.addmm(x, F.silu(gate) * up, down_w)
        cache.lengths[rows] = [n + 1 for n in lengths]
        x = to_device(x, self.head_device)
        logits = self.mm(self._normalized(x, self.tables[self.head_device][2]), self.head)
        return logits.float() if low else logits

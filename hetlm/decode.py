"""Single-token decoding steps on a KV cache, with weights prepared for them once.

Batch-1 decoding is bound by per-operation overhead (and, for larger models, by reading the weights), not
arithmetic. So single-token steps do not go through ``Transformer.forward``: a ``Decoder`` prepares the
weights once for them and a step runs about 30 tensor operations per layer instead of about 60. Prefill
and the no-cache path use the model itself; the tests check that a step's logits match the model's.

How a model decodes (the dtypes, int8 weights) is the planner's decision (``Plan.decoding``); this module
only carries it out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

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


FlatCache = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Decoder:
    """One-token steps on a KVCache with weights prepared for them (see the module docstring).

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

    def flat_cache(self, cache: KVCache) -> FlatCache:
        """Per layer: the (2, B, K, T, E) keys-and-values tensor, and its keys and values seen as (B*K, T, E)
        (one matrix product per key/value head)."""
        return [(kv, kv[0].flatten(0, 1), kv[1].flatten(0, 1)) for kv in cache.layers]

    def step(self, tokens: torch.Tensor, cache: KVCache, flat: FlatCache) -> torch.Tensor:
        """tokens (B,) at position cache.length -> logits (B, V) in fp32; ``flat`` is ``flat_cache(cache)``."""
        B, H, K, E, D = tokens.shape[0], self.n_heads, self.kv_heads, self.head_dim, self.d_model
        pos = cache.length
        end = pos + 1
        low = self.dtype != torch.float32
        x = F.embedding(tokens.to(self.embed.device), self.embed)  # (B, D)
        device = None
        for (qkv_w, o_w, gate_up_w, down_w), (kv, keys, values), layer_device in zip(self.layers, flat, self.devices,
                                                                                      strict=True):
            if layer_device != device:
                device = layer_device
                x = to_device(x, device)
                cos_table, sin_table, floor = self.tables[device]
                cos, sin = cos_table[pos], sin_table[pos]  # (2, E/2)
            qkv = self.mm(self._normalized(x, floor), qkv_w).view(B, H + 2 * K, 2, E // 2)
            qk = qkv[:, : H + K]
            torch.addcmul(qk * cos, qk.flip(2), sin, out=qk)  # RoPE on queries and keys, in place
            kv[:, :, :, pos] = qkv[:, H:].view(B, 2, K, E).transpose(0, 1)  # (2, B, K, E): this step's k, v
            # Query heads grouped by the key/value head they share: (B*K, H/K, E).
            scores = torch.bmm(qkv[:, :H].reshape(B * K, H // K, E), keys[:, :end].transpose(1, 2))  # (B*K, H/K, end)
            weights = torch.softmax(scores.float(), dim=-1).to(values.dtype) if low else torch.softmax(scores, dim=-1)
            x = self.addmm(x, torch.bmm(weights, values[:, :end]).view(B, D), o_w)
            gate, up = self.mm(self._normalized(x, floor), gate_up_w).chunk(2, dim=-1)
            x = self.addmm(x, F.silu(gate) * up, down_w)
        cache.length = end
        x = to_device(x, self.head_device)
        logits = self.mm(self._normalized(x, self.tables[self.head_device][2]), self.head)
        return logits.float() if low else logits

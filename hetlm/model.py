"""A decoder-only Transformer in the Llama style.

Parameter names match Hugging Face's ``LlamaForCausalLM`` and RoPE uses the same
rotate-half convention, so exporting is a plain copy of the state dict.

Shapes: B batch, T sequence, D d_model, H query heads, K key/value heads, E head_dim, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hetlm.config import ModelConfig

# The dtype names configs, plans and bundles use.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast: bf16 sums of squares lose too much precision.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, length: int, theta: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (length, head_dim) for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)  # (length, E/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (length, E)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, E); cos, sin: (T, E)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def dropout_noise(like: torch.Tensor, copies: int) -> torch.Tensor:
    """Uniform random int16s of shape (copies, *like.shape), from the device's default RNG like ``nn.Dropout``.

    On the CPU they are drawn as 64-bit words viewed as four int16s, ~7x cheaper than ``bernoulli_`` (and
    inductor's per-element random numbers inside a compiled block cost as much as the rest of the step).
    """
    shape = (copies, *like.shape)
    if like.device.type != "cpu":
        return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, device=like.device)
    count = copies * like.numel()
    words = torch.empty(-(-count // 4), dtype=torch.int64).random_(-(2**63), None)
    return words.view(torch.int16)[:count].view(shape)


def apply_dropout(x: torch.Tensor, noise: torch.Tensor, p: float) -> torch.Tensor:
    """Zero the elements of x whose noise falls in the lowest fraction p and scale the rest by 1/(1-p).

    p is rounded to a multiple of 1/65536 (at most 65535/65536), and the scale uses the rounded value, so the
    mean is kept exactly.
    """
    dropped = min(round(p * 65536), 65535)
    return torch.where(noise >= dropped - 32768, x * (65536 / (65536 - dropped)), 0.0)


class KVCache:
    """Keys and values of earlier positions, per layer, preallocated to the context length.

    ``device`` is one device for every layer, or one per layer (each layer's cache sits with its block).
    """

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device | Sequence[torch.device],
                 dtype: torch.dtype) -> None:
        shape = (2, batch_size, config.kv_heads, config.context_length, config.head_dim)
        devices = list(device) if isinstance(device, Sequence) else [device] * config.n_layers
        # Keys and values of a layer share one tensor, so a decoding step stores both with one copy.
        self.layers = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        self.keys = [kv[0] for kv in self.layers]  # each (B, K, context, E)
        self.values = [kv[1] for kv in self.layers]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, E) at positions [length, length+T); return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)
        # When set, attention runs in this dtype whatever autocast chose (see Transformer.set_attention_dtype).
        self.compute_dtype: torch.dtype | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, E = self.n_heads, self.n_kv_heads, self.head_dim
        # One product for queries, keys and values (the parameters keep HF's names): fewer, larger matmuls
        # made a compiled CPU training step 10-15% faster at d_model 128.
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # ((H+2K)*E, D)
        qkv = F.linear(x, weight).view(B, T, H + 2 * K, E).transpose(1, 2)  # (B, H+2K, T, E)
        q, k, v = qkv.split((H, K, K), dim=1)  # (B, H, T, E), (B, K, T, E), (B, K, T, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, K, past+T, E)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)  # (B, H, S, E)
            v = v.repeat_interleave(groups, dim=1)

        mask = None
        if past and T > 1:
            # Several new queries after a cached prefix: query i sees keys up to past + i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # Without a cache the mask is causal; one new query after a cache sees every position, unmasked.
        y = self._attend(q, k, v, mask, is_causal=past == 0)  # (B, H, T, E)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*E)
        return self.o_proj(y)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        dtype = self.compute_dtype
        if dtype is None or q.dtype == dtype:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        with torch.autocast(q.device.type, enabled=False):
            y = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, dropout_p=dropout,
                                               is_causal=is_causal)
        return y.to(q.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gate and up in one product, like queries, keys and values.
        gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, layer: int,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """noise (2, B, T, D) from ``dropout_noise`` switches dropout on for the two residual branches."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        if noise is not None:
            attended = apply_dropout(attended, noise[0], self.dropout)
        x = x + attended
        transformed = self.mlp(self.post_attention_layernorm(x))
        if noise is not None:
            transformed = apply_dropout(transformed, noise[1], self.dropout)
        return x + transformed


class Backbone(nn.Module):
    """Embedding, blocks and final norm: HF's ``LlamaModel`` (the ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta)
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Set by the plan for training: every N-th block (0: none) recomputes its activations in backward.
        self.checkpoint_every = 0
        # Set by ``place``: each block's device, and the RoPE tables on each of them.
        self.block_devices: list[torch.device] | None = None
        self.rope_copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # Residual projections are scaled down so the residual stream's variance stays put with depth.
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(param, mean=0.0, std=std)
        if self.rope_cos.device.type != "meta":
            cos, sin = rope_tables(self.config.head_dim, self.config.context_length, self.config.rope_theta,
                                   device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor],
                        device: str | torch.device = "cpu") -> Transformer:
        """The model with ``state``'s weights, in fp32 on ``device``; KeyError names a missing or unexpected weight.

        Built on the meta device, so no memory or time goes into random weights that are overwritten at once.
        """
        with torch.device("meta"):
            model = cls(config)
        weights = {name: tensor.to(device, torch.float32) for name, tensor in state.items()}
        if config.tie_embeddings:
            weights.pop("lm_head.weight", None)
        expected = {name for name, _ in model.named_parameters()}
        if unknown := sorted(set(weights) - expected):
            raise KeyError(f"unexpected {unknown[:3]}")
        if missing := sorted(expected - set(weights)):
            raise KeyError(f"missing {missing[:3]}")
        model.load_state_dict(weights, strict=False, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta, device=torch.device(device))
        model.rope_cos, model.rope_sin = cos, sin
        return model

    @torch.no_grad()
    def place(self, embed: torch.device, blocks: Sequence[torch.device], head: torch.device) -> None:
        """Put the embedding, each block (``blocks[i]`` for block i) and the final norm with the LM head on a device
        each; forward moves the hidden states across. A tied LM head away from the embedding gets its own copy
        (for inference: the two then no longer train as one)."""
        blocks = [torch.device(d) for d in blocks]
        embed, head = torch.device(embed), torch.device(head)
        self.model.embed_tokens.to(embed)
        for block, device in zip(self.model.layers, blocks, strict=True):
            block.to(device)
        self.model.norm.to(head)
        if self.config.tie_embeddings and _same(head, embed):
            self.lm_head.weight = self.model.embed_tokens.weight
        elif self.config.tie_embeddings:
            self.lm_head.weight = nn.Parameter(self.model.embed_tokens.weight.detach().to(head), requires_grad=False)
        else:
            self.lm_head.to(head)
        self.rope_cos, self.rope_sin = self.rope_cos.to(head), self.rope_sin.to(head)
        devices = {str(d): d for d in (*blocks, head)}
        self.rope_copies = {d: (self.rope_cos.to(d), self.rope_sin.to(d)) for d in devices.values()}
        self.block_devices = blocks

    @property
    def input_device(self) -> torch.device:
        """Where token ids go in: the embedding's device."""
        return self.model.embed_tokens.weight.device

    @property
    def output_device(self) -> torch.device:
        """Where logits come out: the LM head's device."""
        return self.lm_head.weight.device

    def layer_devices(self) -> list[torch.device]:
        """Each block's device (where its KV cache belongs)."""
        return [block.input_layernorm.weight.device for block in self.model.layers]

    def set_attention_dtype(self, dtype: torch.dtype | None) -> None:
        """Run attention in ``dtype`` even inside an autocast region (None: autocast decides).

        The planner asks for fp32 attention under CPU bf16 autocast: torch's CPU flash-attention kernel
        is several times slower in bf16 than in fp32, while the matmuls around it gain from bf16.
        """
        for block in self.model.layers:
            block.self_attn.compute_dtype = dtype

    def compile_blocks(self) -> None:
        """torch.compile each block in place (regional compilation); state-dict names do not change.

        The blocks share code, so one compiled graph serves them all: a cold compile costs one block's
        time (30 s instead of 45 s for the whole model on 2 CPU cores, for the same step time).
        """
        for block in self.model.layers:
            block.compile()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) (or (B, 1, V) with last_only) and the mean loss.

        With a cache, idx holds only the new tokens; their positions follow the cached ones.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.config.context_length}")
        cos = self.rope_cos[start : start + T]  # (T, E)
        sin = self.rope_sin[start : start + T]
        x = self.model.embed_tokens(idx.to(self.input_device))  # (B, T, D)
        p = self.config.dropout if self.training else 0.0
        if p:
            x = apply_dropout(x, dropout_noise(x, 1)[0], p)
        rope_device = self.rope_cos.device
        for i, block in enumerate(self.model.layers):
            if self.block_devices is not None:
                device = self.block_devices[i]
                # At a boundary between devices only the hidden states cross.
                x = to_device(x, device)
                if not _same(rope_device, device):
                    cos, sin = (t[start : start + T] for t in self.rope_copies[device])
                    rope_device = device
            # The noise is drawn outside the (possibly compiled) block: random numbers drawn inside a compiled
            # CPU graph cost more than the rest of the block. Being an input, it is also what makes a recomputed
            # block (activation checkpointing) drop the same elements as the first pass.
            noise = dropout_noise(x, 2) if p else None
            if self.training and self.checkpoint_every and i % self.checkpoint_every == 0:
                x = checkpoint(block, x, cos, sin, cache, i, noise, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, noise)
        if cache is not None:
            cache.length += T
        x = self.model.norm(to_device(x, self.output_device))
        if last_only:
            x = x[:, -1:, :]  # (B, 1, D)
        logits = self.lm_head(x)  # (B, T, V)
        loss = next_token_loss(logits, targets) if targets is not None else None
        return logits, loss


# A target that is not scored (the context of a chat's replies).
IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), skipping IGNORE_INDEX targets.

    Taken in fp32 whatever the autocast dtype. A "sum" over no scored target is 0 with a zero gradient, where
    the "mean" would be 0/0.
    """
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; the copy is asynchronous only towards a GPU, whose stream orders it before the kernels
    that read it: the CPU does not wait for a GPU's stream, so a copy to the CPU must complete first."""
    return x.to(device, non_blocking=device.type == "cuda")


def _same(a: torch.device, b: torch.device) -> bool:
    # torch.device("cuda") and torch.device("cuda:0") name the same device once set_device has run.
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Total, embedding and non-embedding parameters, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    if not config.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(config: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward): 6 x matmul parameters + attention scores.

    Matmul parameters include the LM head (it is a matmul even when tied); attention adds
    QK^T and AV: 2 x 2 x n_layers x context x d_model forward, x3 with backward, halved
    for the causal mask is left out (following the PaLM / nanoGPT convention).
    """
    counts = parameter_counts(config)
    matmul_params = counts["non_embedding"] + config.vocab_size * config.d_model
    norms = config.d_model * (2 * config.n_layers + 1)
    matmul_params -= norms
    attention = 12 * config.n_layers * config.context_length * config.n_heads * config.head_dim
    return 6 * matmul_params + attention

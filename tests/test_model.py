import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hetlm.config import ModelConfig
from hetlm.model import KVCache, Transformer, apply_dropout, dropout_noise, flops_per_token, parameter_counts

V = 97


@pytest.fixture(autouse=True)
def one_thread():
    # Shapes this small gain nothing from threads, and on a busy machine idle OpenMP threads spin for seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> ModelConfig:
    values = dict(n_layers=2, d_model=32, n_heads=4, context_length=16, vocab_size=V)
    values.update(overrides)
    config = ModelConfig(**values)
    config.validate()
    return config


def build(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_loss():
    model = build(tiny())
    idx = tokens(3, 16)
    logits, loss = model(idx)
    assert logits.shape == (3, 16, V) and loss is None
    logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert logits.shape == (3, 15, V) and loss.shape == ()
    # An untrained model is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(V)) < 0.5
    last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], model(idx)[0][:, -1])
    with pytest.raises(ValueError, match="exceeds the context length 16"):
        model(tokens(1, 17))


def test_future_tokens_never_change_earlier_logits():
    model = build(tiny(n_kv_heads=2, init_std=0.1))
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1 + tokens(2, 7, seed=5)) % V
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 9:], after[:, 9:], atol=1e-3)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kv_cache_matches_full_forward(kv_heads):
    config = tiny(n_kv_heads=kv_heads, init_std=0.1)
    model = build(config)
    idx = tokens(2, 16)
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(config, batch_size=2, device=torch.device("cpu"), dtype=torch.float32)
        pieces = [model(idx[:, :5], cache=cache)[0]]  # prefill
        for position in range(5, 9):  # single tokens
            pieces.append(model(idx[:, position : position + 1], cache=cache)[0])
        pieces.append(model(idx[:, 9:16], cache=cache)[0])  # a multi-token chunk after the prefix
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_parameter_names_follow_hugging_face_llama():
    model = build(tiny(n_kv_heads=2))
    keys = set(model.state_dict())
    layer = [
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    ]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{name}" for i in range(2) for name in layer}
    assert keys == expected
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    untied = build(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_residual_projections_are_scaled_down():
    config = tiny(n_layers=8, d_model=128, n_heads=4)
    model = build(config)
    std = model.model.layers[3].self_attn.q_proj.weight.std().item()
    residual = model.model.layers[3].mlp.down_proj.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    assert residual == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_on_meta_match_a_real_model(tie):
    config = tiny(n_kv_heads=2, tie_embeddings=tie)
    counts = parameter_counts(config)
    real = build(config)
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert counts["embedding"] == V * 32 * (1 if tie else 2)
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]


@pytest.mark.parametrize("overrides", [{"n_kv_heads": 2}, {"tie_embeddings": False, "context_length": 32}])
def test_flops_per_token_is_what_torch_counts(overrides):
    # torch's own counter over a real forward and backward at full context; the math attention kernel, because
    # the CPU flash kernel is not counted. Causal masking is not halved, as in the PaLM / nanoGPT convention.
    config = tiny(**overrides)
    model = build(config).train()
    idx = tokens(1, config.context_length + 1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
    assert flops_per_token(config) == counter.get_total_flops() / config.context_length


def test_loss_falls_when_overfitting_one_batch():
    model = build(tiny()).train()
    idx = tokens(4, 17)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.5


@pytest.mark.parametrize("tie,kv_heads", [(True, 4), (False, 2)])
def test_logits_equal_transformers_llama(tie, kv_heads):
    transformers = pytest.importorskip("transformers")
    # A wider init than the default sharpens attention, so any mismatch shows well above the tolerance.
    config = tiny(n_kv_heads=kv_heads, tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-6, d_ff=48, init_std=0.1)
    model = build(config)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    idx = tokens(2, 16)
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(input_ids=idx).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_attention_dtype_overrides_autocast():
    config = tiny()
    model = build(config).train()
    idx = tokens(2, config.context_length)
    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    reference, _ = model(idx, idx)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx, idx)
        assert set(seen) == {torch.bfloat16}
        seen.clear()
        model.set_attention_dtype(torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx, idx)
        assert set(seen) == {torch.float32}
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    # The output keeps autocast's dtype and the result stays close to fp32's; gradients reach every weight.
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_compiled_blocks_match_eager_and_keep_parameter_names():
    config = tiny()
    eager, compiled = build(config).train(), build(config).train()
    names = list(eager.state_dict())
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == names
    idx = tokens(2, config.context_length)
    _, eager_loss = eager(idx, idx)
    _, compiled_loss = compiled(idx, idx)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_residual_dropout_drops_p_and_keeps_the_mean():
    x = torch.ones(64, 128, 32)
    torch.manual_seed(0)
    noise = dropout_noise(x, 3)
    assert noise.shape == (3, 64, 128, 32) and noise.dtype == torch.int16
    dropped = apply_dropout(x, noise[1], 0.1)
    assert (dropped == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.01)
    # A rate just below 1 keeps one value in 65536 instead of dividing by zero.
    assert torch.isfinite(apply_dropout(x, noise[2], 0.9999999)).all()
    # Other draws give other masks; the same seed gives the same ones.
    assert not torch.equal(noise[0], noise[1])
    torch.manual_seed(0)
    assert torch.equal(dropout_noise(x, 3), noise)


def test_dropout_acts_only_in_training():
    model = build(tiny(dropout=0.2, attention_dropout=0.2))
    idx = torch.randint(0, V, (2, 16))
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    torch.manual_seed(1)
    first, loss = model(idx, idx)
    torch.manual_seed(2)
    assert not torch.allclose(first, model(idx)[0])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

"""The decoder's single-token steps, int8 weights, and the plan's decode decisions."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hetlm.config import Config, ModelConfig
from hetlm.decode import Decoder, Decoding, Int8Weight, SlotCache, int8_mm
from hetlm.errors import UsageError
from hetlm.model import KVCache, Transformer
from hetlm.planner import detect_inventory, load_inventory, make_plan
from hetlm.sampling import Sampler, encode_prompt, make_generator
from hetlm.sampling_settings import SamplingSettings
from hetlm.store import load_checkpoint

MIXED = "def naïve(x):\n    return '中文字符' + \"😀🎉\"  # ok ✓\n"
INVENTORIES = Path(__file__).parent / "inventories"


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint).model


def greedy(max_new_tokens, **kw):
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True, **kw)


def prefilled(model, rows, dtype=torch.float32):
    """A SlotCache whose row i holds the model's keys and values of ``rows[i]``, as a batch's prefill leaves them."""
    device = next(model.parameters()).device
    slots = SlotCache(model.config, len(rows) + 1, device, dtype)
    for i, ids in enumerate(rows):
        scratch = KVCache(model.config, 1, device, dtype)
        model(torch.tensor([ids], device=device), cache=scratch)
        slots.load(i, scratch)
    return slots


@pytest.mark.parametrize("tied", [True, False])
def test_single_token_steps_match_the_model(trained, tokenizer, tied):
    model = trained
    if not tied:
        torch.manual_seed(2)
        model = Transformer(ModelConfig(n_layers=2, d_model=64, n_heads=8, n_kv_heads=2, context_length=64,
                                        tie_embeddings=False, vocab_size=tokenizer.vocab_size)).eval()
    decoder = Decoder(model, torch.float32)
    ids = torch.tensor([encode_prompt(tokenizer, MIXED)[:40]])
    with torch.inference_mode():
        cache = prefilled(model, [ids[0, :10].tolist()])
        full, _ = model(ids)
        for t in range(10, 40):
            step = decoder.step(ids[:, t], cache)
            torch.testing.assert_close(step, full[:, t], atol=1e-4, rtol=1e-4)
        assert cache.lengths[:1] == [40]


def test_a_batched_step_gives_each_row_its_own_sequences_logits(trained, tokenizer):
    """Rows at different lengths, one of them over a longer sequence's leftovers: each row's logits are its own."""
    decoder = Decoder(trained, torch.float32)
    texts = [encode_prompt(tokenizer, t)[:24] for t in (MIXED, "import os\nimport sys\n" * 3, "x = 1\n" * 9)]
    starts = [5, 17, 11]
    with torch.inference_mode():
        full = [trained(torch.tensor([t]))[0][0] for t in texts]
        # Row 0 held a 20-token sequence that left; the last row's sequence moved in, over its leftovers.
        cache = prefilled(trained, [texts[1][:20], texts[1][:17], texts[2][:11], texts[0][:5]])
        cache.move(3, 0)
        assert cache.lengths == [5, 17, 11, 0, 0]
        for k in range(6):
            tokens = torch.tensor([t[s + k] for t, s in zip(texts, starts, strict=True)])
            logits = decoder.step(tokens, cache)
            for row in range(3):
                torch.testing.assert_close(logits[row], full[row][starts[row] + k], atol=1e-4, rtol=1e-4)
        assert cache.lengths == [11, 23, 17, 0, 0]
        # Rows past the first: a step of row 1 alone, as the turn-by-turn engine runs them.
        torch.testing.assert_close(decoder.step(torch.tensor([texts[1][23]]), cache, first_row=1)[0], full[1][23],
                                   atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="whole context"):
            cache.lengths[0] = trained.config.context_length
            decoder.step(torch.tensor([1, 1, 1]), cache)


def test_int8_weights_round_to_their_nearest_step_and_the_kernel_multiplies_them():
    torch.manual_seed(3)
    matrix = torch.randn(64, 48)  # (in, out), as torch.mm takes it
    weight = Int8Weight.quantize(matrix)
    assert weight.values.dtype == torch.int8 and weight.values.shape == (48, 64)
    dequantized = (weight.values.float() * weight.scales.float()[:, None]).t()
    step = weight.scales.float()[None, :]
    assert torch.all((dequantized - matrix).abs() <= step * 0.51)
    x = torch.randn(3, 64)
    torch.testing.assert_close(int8_mm(x, weight), x.bfloat16().float() @ dequantized, atol=0.05, rtol=0.02)


def test_int8_steps_score_text_like_the_model(trained, tokenizer):
    config = Config()
    config.model = trained.config
    config.sample.quantize = "int8"
    plan = make_plan(detect_inventory(), config, workload="infer")
    assert plan.decode_weights == "int8"
    sampler = Sampler(trained, tokenizer, plan)
    assert isinstance(sampler.decoder.head, Int8Weight)
    ids = torch.tensor([encode_prompt(tokenizer, MIXED + "import os\nfor line in open(path):\n    print(line)\n")])
    n = min(ids.shape[1], trained.config.context_length)
    with torch.inference_mode():
        cache = prefilled(trained, [ids[0, :1].tolist()])
        full, _ = trained(ids[:, :n])
        steps = torch.stack([sampler.decoder.step(ids[:, t], cache)[0] for t in range(1, n - 1)])
    targets = ids[0, 2:n]
    quantized_loss = F.cross_entropy(steps, targets)
    full_loss = F.cross_entropy(full[0, 1:n - 1], targets)
    assert abs(quantized_loss - full_loss) < 0.01 * full_loss
    # A batch of samples decodes each row as a batch of one would.
    prompt = encode_prompt(tokenizer, "def ")
    alone = sampler.generate(prompt, greedy(40), make_generator(0)).completions[0].token_ids
    batch = sampler.generate(prompt, greedy(40, num_samples=3), make_generator(0)).completions
    assert [c.token_ids for c in batch] == [alone] * 3


@pytest.mark.parametrize("int8", [False, True])
def test_batched_steps_equal_steps_alone(trained, tokenizer, int8):
    """The same rows stepped together or one at a time (the turn-by-turn engine): float rounding apart, equal."""
    decoder = Decoder(trained, torch.float32, int8=int8)
    texts = [encode_prompt(tokenizer, t)[:30] for t in (MIXED, "import os\n" * 12, "def f(x):\n    return x\n" * 8)]
    starts = [3, 12, 20]
    with torch.inference_mode():
        together = prefilled(trained, [t[:s] for t, s in zip(texts, starts, strict=True)])
        apart = prefilled(trained, [t[:s] for t, s in zip(texts, starts, strict=True)])
        for k in range(8):
            tokens = torch.tensor([t[s + k] for t, s in zip(texts, starts, strict=True)])
            batched = decoder.step(tokens, together)
            alone = torch.cat([decoder.step(tokens[i : i + 1], apart, first_row=i) for i in range(3)])
            torch.testing.assert_close(batched, alone, atol=2e-3 if int8 else 1e-5, rtol=1e-3 if int8 else 1e-5)
            assert batched.argmax(-1).tolist() == alone.argmax(-1).tolist()


def test_int8_refuses_widths_the_kernel_gets_wrong(tokenizer):
    config = Config()
    config.sample.quantize = "int8"
    torch.manual_seed(4)
    odd = Transformer(ModelConfig(n_layers=1, d_model=40, n_heads=4, context_length=16, vocab_size=tokenizer.vocab_size))
    with pytest.raises(UsageError, match="multiples of 16"):
        Sampler(odd, tokenizer, make_plan(detect_inventory(), config, workload="infer"))
    with pytest.raises(UsageError, match="multiples of 16"):
        Decoder(odd, torch.float32, int8=True)


def test_the_plan_decides_how_a_device_decodes(tokenizer):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    # An AMX CPU trains in bf16, but sampling there is fp32: prefill and steps alike.
    amx = make_plan(load_inventory(INVENTORIES / "no-gpu.json"), Config(), workload="infer")
    assert amx.dtype == "bf16" and amx.decoding(cpu) == Decoding()
    int8_config = Config()
    int8_config.sample.quantize = "int8"
    int8 = make_plan(load_inventory(INVENTORIES / "no-gpu.json"), int8_config, workload="infer")
    assert int8.decoding(cpu) == Decoding(int8=True)
    cuda_plan = make_plan(load_inventory(INVENTORIES / "one-8gb-gpu.json"), Config(), workload="infer")
    assert cuda_plan.decode_weights == "bf16"
    assert cuda_plan.decoding(gpu) == Decoding(prefill_autocast=torch.bfloat16, dtype=torch.bfloat16)
    # A CUDA plan says nothing about a model left on the CPU, and a sampler follows what the plan says.
    assert cuda_plan.decoding(cpu) == Decoding()
    torch.manual_seed(4)
    model = Transformer(ModelConfig(n_layers=1, d_model=40, n_heads=4, context_length=16, vocab_size=tokenizer.vocab_size))
    assert Sampler(model, tokenizer, cuda_plan).decoding == Decoding()
    assert Sampler(model, tokenizer).decoding == Decoding()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_plan_decodes_like_the_model(tiny_checkpoint, tokenizer):
    loaded = load_checkpoint(tiny_checkpoint, "cuda")
    config = loaded.config
    config.device.device = "cuda"
    plan = make_plan(detect_inventory(), config, workload="infer")
    sampler = Sampler(loaded.model, tokenizer, plan)
    ids = torch.tensor([encode_prompt(tokenizer, MIXED)[:40]], device="cuda")
    with torch.inference_mode():
        with plan.autocast():
            cache = prefilled(loaded.model, [ids[0, :10].tolist()], sampler.decoding.dtype)
            full, _ = loaded.model(ids)
        for t in range(10, 40):
            step = sampler.decoder.step(ids[:, t], cache)
            torch.testing.assert_close(step, full[:, t].float(), atol=0.15, rtol=0.05)
    settings = SamplingSettings(max_new_tokens=100, temperature=0.8)
    result = sampler.generate(ids[0].tolist(), settings, make_generator(0, "cuda"))
    streamed = "".join(c.text for c in sampler.stream(ids[0].tolist(), settings, make_generator(0, "cuda")))
    assert result.new_tokens > 0 and result.text == streamed

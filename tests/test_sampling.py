import dataclasses
import io
import random

import pytest
import torch

from hetlm.config import ModelConfig, SampleConfig, load_config
from hetlm.errors import ConfigError, UsageError
from hetlm.model import Transformer
from hetlm.reporting import Reporter
from hetlm.sampling import (
    IncrementalDetokenizer,
    Sampler,
    StopStringFilter,
    Uniforms,
    _SampleState,
    encode_prompt,
    make_generator,
    sample_next,
)
from hetlm.sampling_settings import SamplingError, SamplingSettings
from hetlm.store import load_checkpoint

MIXED = "def naïve(x):\n    return '中文字符' + \"😀🎉\"  # ok ✓\n"


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint).model


@pytest.fixture(scope="module")
def random_model(tokenizer):
    """Untrained: its samples are random pieces, byte-fallback pieces included."""
    torch.manual_seed(1)
    config = ModelConfig(n_layers=2, d_model=48, n_heads=6, n_kv_heads=3, context_length=32, vocab_size=tokenizer.vocab_size)
    return Transformer(config).eval()


def greedy(max_new_tokens, **kw):
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True, **kw)


@pytest.mark.parametrize("which", ["trained", "random_model"])
def test_greedy_with_cache_equals_without(which, request, tokenizer):
    model = request.getfixturevalue(which)
    sampler = Sampler(model, tokenizer)
    ctx = model.config.context_length
    for text in ("def main(", MIXED):
        prompt = encode_prompt(tokenizer, text)
        # Past the context length, so the window slides several times.
        cached = sampler.generate(prompt, greedy(3 * ctx), make_generator(0))
        plain = sampler.generate(prompt, greedy(3 * ctx, use_cache=False), make_generator(0))
        assert cached.completions[0].token_ids == plain.completions[0].token_ids
        assert len(cached.completions[0].token_ids) == 3 * ctx
        assert cached.slides >= 4 and cached.slides == plain.slides


def test_seeded_sampling_is_reproducible(trained, tokenizer):
    sampler = Sampler(trained, tokenizer)
    prompt = encode_prompt(tokenizer, "import ")
    settings = SamplingSettings(max_new_tokens=80, temperature=1.0, top_k=50, top_p=0.95, ignore_eos=True)
    first = sampler.generate(prompt, settings, make_generator(7))
    again = sampler.generate(prompt, settings, make_generator(7))
    other = sampler.generate(prompt, settings, make_generator(8))
    assert first.completions[0].token_ids == again.completions[0].token_ids
    assert first.text == again.text
    assert first.completions[0].token_ids != other.completions[0].token_ids


def test_top_k_one_and_tiny_top_p_equal_greedy(trained, tokenizer):
    sampler = Sampler(trained, tokenizer)
    prompt = encode_prompt(tokenizer, "class ")
    expected = sampler.generate(prompt, greedy(60), make_generator(0)).completions[0].token_ids
    for filters in ({"top_k": 1}, {"top_p": 1e-6}):
        settings = SamplingSettings(max_new_tokens=60, temperature=1.5, ignore_eos=True, **filters)
        assert sampler.generate(prompt, settings, make_generator(3)).completions[0].token_ids == expected


def test_top_k_and_top_p_keep_only_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    generator = make_generator(0)

    uniforms = Uniforms(generator)

    def draw(**rule):
        return sample_next(logits, [SamplingSettings(temperature=1.0, **rule)] * len(logits), [uniforms] * len(logits))

    assert set(draw(top_k=2).tolist()) == {0, 1}
    # 0.5 alone is under 0.7, so the second token stays; 0.5 + 0.3 reaches 0.7, so the rest go.
    drawn = draw(top_p=0.7)
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05
    unfiltered = draw()
    assert set(unfiltered.tolist()) == {0, 1, 2, 3}
    assert [abs((unfiltered == i).float().mean().item() - p) < 0.04 for i, p in enumerate((0.5, 0.3, 0.15, 0.05))] == [True] * 4


def test_each_row_samples_by_its_own_settings_and_generator():
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    rules = [SamplingSettings(temperature=0), SamplingSettings(temperature=1.0, top_k=1),
             SamplingSettings(temperature=0.9, top_p=0.5), SamplingSettings(temperature=1.2, top_k=20, top_p=0.9)]
    together = sample_next(logits, rules, [Uniforms(make_generator(b)) for b in range(4)])
    alone = [sample_next(logits[b : b + 1], rules[b : b + 1], [Uniforms(make_generator(b))]) for b in range(4)]
    assert together.tolist() == torch.cat(alone).tolist()
    assert together[:2].tolist() == logits[:2].argmax(dim=-1).tolist()
    # A row's draw uses its generator only: the others' draws (or their absence) leave it alone.
    assert sample_next(logits[3:], rules[3:], [Uniforms(make_generator(3))]).item() == together[3].item()


@pytest.mark.parametrize("rule", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-5},
                                  {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1e-300, "top_p": 1e-300},
                                  {"temperature": 1e300}])
def test_extreme_temperatures_and_top_p_cannot_overflow(rule):
    logits = torch.tensor([[3.0, 1.0, -2.0, 50.0, 49.9], [0.0, 0.0, 0.0, 0.0, 0.0]]) * 1000
    settings = SamplingSettings(**rule)
    drawn = sample_next(logits, [settings] * 2, [Uniforms(make_generator(0)), Uniforms(make_generator(1))])
    assert 0 <= drawn.min() and drawn.max() < 5
    if settings.temperature < 1 or settings.top_p < 1:
        # Tiny temperatures and tiny top_p leave the likeliest token (ties: one of them).
        assert drawn[0].item() == 3


def test_seeds_do_not_alias():
    def stream(seed):
        return torch.rand(4, generator=make_generator(seed)).tolist()

    seeds = [0, 1, 1 + 2**32, 1 + 2**63, -1, 2**64 - 1, 2**63 - 1, -(2**63)]
    assert len({tuple(stream(s)) for s in seeds}) == len(seeds)
    assert stream(12345) == stream(12345)


def test_stop_strings_end_the_text_before_them(trained, tokenizer):
    sampler = Sampler(trained, tokenizer)
    prompt = encode_prompt(tokenizer, "def ")
    full = sampler.generate(prompt, greedy(60), make_generator(0)).text
    stop = full[12:15]
    assert stop and full.find(stop) >= 0
    result = sampler.generate(prompt, greedy(60, stop=("\x00never", stop)), make_generator(0))
    assert result.text == full[: full.find(stop)]
    assert result.completions[0].finish_reason == "stop"
    streamed = "".join(c.text for c in sampler.stream(prompt, greedy(60, stop=(stop,)), make_generator(0)))
    assert streamed == result.text


def test_stop_string_filter_holds_back_possible_starts():
    stops = StopStringFilter(["</end>", "xyz"])
    assert stops.feed("abc</") == ("abc", False)
    assert stops.feed("en") == ("", False)
    assert stops.feed("x") == ("</en", False)
    assert stops.feed("a") == ("xa", False)
    assert stops.feed("--xy") == ("--", False)
    assert stops.feed("zzz") == ("", True)


def test_detokenizer_pieces_join_to_the_full_decode(tokenizer):
    rng = random.Random(0)
    byte_ids = [tokenizer.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    text_ids = tokenizer.encode(MIXED + "Ünïcödé ✓ 日本語 🚀👍🏽 done\n")
    assert set(text_ids) & set(byte_ids), "the test text must need byte-fallback pieces"
    for trial in range(400):
        if trial % 2:
            ids = text_ids[rng.randrange(len(text_ids)):]
        else:
            specials = [tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id] * 20
            pool = byte_ids + specials + list(range(tokenizer.vocab_size))
            ids = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        context = encode_prompt(tokenizer, rng.choice(["", "x = ", "中"]))
        detok = IncrementalDetokenizer(tokenizer, context)
        pieces = [detok.add(i) for i in ids] + [detok.flush()]
        expected = tokenizer.decode(context + ids)[len(tokenizer.decode(context)):]
        assert "".join(pieces) == expected


def test_streaming_equals_the_whole_text_with_cjk_and_emoji(random_model, trained, tokenizer):
    for model in (random_model, trained):
        sampler = Sampler(model, tokenizer)
        prompt = encode_prompt(tokenizer, "中文 😀 ")
        for seed in range(4):
            settings = SamplingSettings(max_new_tokens=70, temperature=1.3, ignore_eos=True)
            generation = sampler.stream(prompt, settings, make_generator(seed))
            streamed = "".join(chunk.text for chunk in generation)
            ids = generation.result.completions[0].token_ids
            assert streamed == generation.result.text
            assert streamed == tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]


def test_streamed_text_of_valid_utf8_has_no_broken_characters(tokenizer, trained):
    # Feeding a real text's ids through the sampler's detokenizer, as a model emitting them would.
    ids = tokenizer.encode("日本語 🚀👍🏽 emoji and 中文字符")
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_id])
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.flush() == "日本語 🚀👍🏽 emoji and 中文字符"
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some ids were held back until their character was complete


def test_batch_sampling(trained, tokenizer):
    sampler = Sampler(trained, tokenizer)
    prompt = encode_prompt(tokenizer, "for ")
    single = sampler.generate(prompt, greedy(30), make_generator(0)).completions[0].token_ids
    batch = sampler.generate(prompt, greedy(30, num_samples=3), make_generator(0))
    assert [c.token_ids for c in batch.completions] == [single] * 3
    generation = sampler.stream(prompt, SamplingSettings(max_new_tokens=30, temperature=1.0, num_samples=3),
                                make_generator(1))
    texts = ["", "", ""]
    for chunk in generation:
        texts[chunk.index] += chunk.text
    assert texts == [c.text for c in generation.result.completions]
    assert len(set(texts)) > 1
    assert generation.result.new_tokens <= 90
    # Sample i has its own generator, drawn from the given one: the first of three is the text of one alone.
    one = sampler.generate(prompt, SamplingSettings(max_new_tokens=30, temperature=1.0), make_generator(1))
    assert one.text == texts[0]


def test_long_prompt_is_cut_from_the_left_with_a_warning(trained, tokenizer):
    class Warnings(Reporter):
        def __init__(self):
            self.seen = []

        def warning(self, message):
            self.seen.append(message)

    sampler = Sampler(trained, tokenizer)
    ctx = trained.config.context_length
    prompt = encode_prompt(tokenizer, MIXED * 10)
    assert len(prompt) > ctx
    reporter = Warnings()
    result = sampler.generate(prompt, greedy(10), make_generator(0), reporter)
    assert result.prompt_truncated == len(prompt) - ctx and result.prompt_tokens == ctx
    assert reporter.seen and "cut" in reporter.seen[0]
    cut = sampler.generate(prompt[-ctx:], greedy(10), make_generator(0))
    assert result.completions[0].token_ids == cut.completions[0].token_ids


def test_eos_ends_a_sample_and_is_not_part_of_it(tokenizer, trained):
    state = _SampleState(tokenizer, [tokenizer.bos_id], ())
    ids = tokenizer.encode("x = 1")
    chunks = [state.add(0, i, tokenizer.eos_id, last=False) for i in ids]
    end = state.add(0, tokenizer.eos_id, tokenizer.eos_id, last=False)
    assert end.finish_reason == "eos" and end.token_ids == []
    assert "".join(c.text for c in chunks) + end.text == "x = 1"
    assert state.completion(0).token_ids == ids


# Each sampling rule, stated once: (field, a value that breaks it, the message wherever the value comes from).
BROKEN_RULES = [
    ("max_new_tokens", 0, "max_new_tokens must be at least 1, got 0"),
    ("temperature", -1.5, "temperature must be a finite number >= 0 (0 = greedy), got -1.5"),
    ("temperature", float("nan"), "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ("temperature", float("inf"), "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    ("top_k", -1, "top_k must be >= 0 (0 = off), got -1"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("num_samples", 0, "num_samples must be at least 1, got 0"),
    ("stop", ("",), "stop must not contain an empty string"),
]


@pytest.mark.parametrize(("name", "value", "message"), BROKEN_RULES)
def test_settings_are_checked_when_built(name, value, message):
    with pytest.raises(SamplingError) as caught:
        SamplingSettings(**{name: value})
    assert (caught.value.name, str(caught.value)) == (name, message)
    assert caught.value.message("sample." + name) == "sample." + message
    if name in {f.name for f in dataclasses.fields(SampleConfig)}:
        # The config's sample section obeys the same rules, under its own key.
        with pytest.raises(ConfigError) as config_error:
            load_config(None, [f"sample.{name}={value}"])
        assert str(config_error.value) == "sample." + message


def test_settings_from_the_config():
    settings = SamplingSettings.from_config(SampleConfig(temperature=0.5, top_k=9), top_k=None, stop=["a"])
    assert (settings.temperature, settings.top_k, settings.stop) == (0.5, 9, ("a",))
    assert SamplingSettings(stop=["x"]).stop == ("x",)


def test_bad_prompts_are_refused(trained, tokenizer):
    sampler = Sampler(trained, tokenizer)
    with pytest.raises(UsageError):
        sampler.generate([], greedy(5), make_generator(0))
    with pytest.raises(UsageError):
        sampler.generate([1, tokenizer.vocab_size], greedy(5), make_generator(0))


def test_cli_generate_streams_text_and_reports_stats(cli, tiny_checkpoint, tokenizer, trained, tmp_path, monkeypatch):
    # One thread: the planner's one per core crawls when other processes keep the cores busy.
    args = ("generate", tiny_checkpoint, "--max-new-tokens", "40", "--temperature", "0", "--set", "device.threads=1")
    streamed = cli(*args, "--prompt", "def 中文 😀")
    assert streamed.code == 0, streamed.err
    expected = Sampler(trained, tokenizer).generate(encode_prompt(tokenizer, "def 中文 😀"), SamplingSettings(
        max_new_tokens=40, temperature=0), make_generator(0)).text
    assert streamed.out == expected + "\n"
    assert "tok/s" in streamed.err and "time to first token" in streamed.err
    assert cli(*args, "--prompt", "def 中文 😀", "--no-stream").out == streamed.out
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("def 中文 😀", encoding="utf-8")
    assert cli(*args, "--prompt-file", prompt_file).out == streamed.out
    monkeypatch.setattr("sys.stdin", io.StringIO("def 中文 😀"))
    assert cli(*args, "-").out == streamed.out


def test_cli_generate_seed_stop_and_samples(cli, tiny_checkpoint):
    args = ("generate", tiny_checkpoint, "-p", "import ", "-n", "30", "--temperature", "1.0", "--set", "device.threads=1")
    first, again = cli(*args, "--seed", "5"), cli(*args, "--seed", "5")
    assert first.code == 0 and first.out == again.out
    stop = first.out[5:8]
    stopped = cli(*args, "--seed", "5", "--stop", stop, "--stop", "\x01")
    assert stopped.out == first.out[: first.out.find(stop)] + "\n"
    batch = cli(*args, "--num-samples", "3")
    assert batch.code == 0
    assert [line for line in batch.out.splitlines() if line.startswith("=== sample")] == [
        f"=== sample {i}/3 ===" for i in (1, 2, 3)]
    quantized = cli(*args, "--seed", "5", "--quantize", "int8")
    assert quantized.code == 0 and quantized.out.strip() and "int8 weights" in quantized.err
    assert "int8" not in first.err


def test_cli_generate_bad_input(cli, tiny_checkpoint, tmp_path):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    def rule(name, value):
        return next(message for n, v, message in BROKEN_RULES if (n, v) == (name, value))

    cases = [
        ((not_a_run,), None), ((tmp_path / "missing",), None),
        ((tiny_checkpoint, "--temperature", "-1.5"), rule("temperature", -1.5)),
        ((tiny_checkpoint, "--top-p", "0"), rule("top_p", 0.0)), ((tiny_checkpoint, "--top-p", "1.5"), rule("top_p", 1.5)),
        ((tiny_checkpoint, "--top-k", "-1"), rule("top_k", -1)),
        ((tiny_checkpoint, "--max-new-tokens", "0"), rule("max_new_tokens", 0)),
        ((tiny_checkpoint, "--num-samples", "0"), rule("num_samples", 0)), ((tiny_checkpoint, "--stop", ""), rule("stop", ("",))),
        ((tiny_checkpoint, "--prompt", "a", "--prompt-file", tmp_path / "p.txt"), None),
        ((tiny_checkpoint, "--prompt-file", tmp_path / "missing.txt"), None), ((tiny_checkpoint, "stray"), None),
        ((tiny_checkpoint, "--set", "model.d_model=8"), None),
        ((tiny_checkpoint, "--set", "sample.top_p=2"), "sample.top_p must be in (0, 1], got 2.0"),
        ((tiny_checkpoint, "--quantize", "int4"), None),
    ]
    for args, message in cases:
        result = cli("generate", *args)
        assert result.code == 2, (args, result.err)
        assert "error" in result.err and "Traceback" not in result.err
        # A sampling value is refused with the message its rule has everywhere (the server's 400 included).
        assert message is None or f"error: {message}\n" in result.err, (args, result.err)
        assert result.out == ""

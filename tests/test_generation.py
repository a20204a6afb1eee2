"""Constrained, KV-cached, batched generation (anygpt.infer.generation / constraints / settings).

The model is a tiny random LLaMA whose special-token output rows are re-drawn per seed
(``excite_specials``), so that it opens, closes and abandons spans all the time: the hardest
possible customer for the constraints.
"""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from anygpt.formats import Conversation, Media, Text, Turn
from anygpt.infer import generation as gen_mod
from anygpt.infer.generation import ConsoleStreamer, ContextError, Streamer, pick_dtype, sample_from, sample_tokens
from anygpt.infer.settings import GenerationConfig, SamplingSettings, apply_setting_overrides, default_settings
from anygpt.infer.testing import build_tiny_model_dir, excite_specials


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from anygpt.infer.loading import load_lm

    root = tmp_path_factory.mktemp("gen")
    loaded = load_lm(build_tiny_model_dir(root), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the CI box is shared
    yield loaded
    torch.set_num_threads(threads)


def _prompts(lm, texts=("hello world", "draw a red bus", "a")):
    fmt = lm.generator.format
    return [fmt.prompt(Conversation([Turn("user", [Text(t)])])) for t in texts]


def _small_modes(limit: int = 24):
    return {k: replace(v, max_tokens=min(v.max_tokens, limit)) for k, v in default_settings().items()}


def check_well_formed(layout, ids, stop):
    """Independent of the parser: walk the ids and check every span rule; returns spans seen."""
    start_of = {layout.id(m.start): m for m in layout.modalities.values()}
    eom = layout.role_id("assistant_end")
    assert stop == "eom", stop
    assert eom not in ids.tolist(), "<eom> inside the answer"
    spans = []
    i, n = 0, len(ids)
    while i < n:
        t = int(ids[i])
        assert t < layout.total
        if t in start_of:
            m = start_of[t]
            j = i + 1
            while j < n and m.offset <= ids[j] < m.stop:
                book = (int(ids[j]) - m.offset) // m.codebook_size if m.num_codebooks > 1 else 0
                assert book == (j - i - 1) % m.num_codebooks, f"{m.name} id out of codebook cycle"
                j += 1
            body = j - i - 1
            assert j < n and int(ids[j]) == layout.id(m.end), f"{m.name} span not closed"
            assert body > 0 and body % m.num_codebooks == 0, f"{m.name} span ends mid-frame ({body})"
            if m.span_length is not None:
                assert body == m.span_length * m.num_codebooks
            spans.append((m.name, body))
            i = j + 1
            continue
        assert layout.modality_of_id(t) is None, "modality id outside a span"
        assert t not in {layout.id(m.end) for m in layout.modalities.values()}, "stray end marker"
        assert t not in {layout.role_id(r) for r in ("user", "assistant", "user_end")}, "role token in answer"
        i += 1
    return spans


def test_constrained_generation_is_always_well_formed(lm):
    """Many seeds of an erratic random model: every answer parses without issues."""
    layout, g = lm.layout, lm.generator
    prompts = _prompts(lm)
    modes = _small_modes(24)
    seen = {"image": 0, "speech": 0, "music": 0}
    for seed in range(16):
        excite_specials(lm.model, layout, seed)
        cfg = GenerationConfig(modes=modes, max_new_tokens=(48, 80, 120)[seed % 3], seed=seed)
        for r in g.generate(prompts, cfg):
            assert r.issues == [], r.issues
            for name, body in check_well_formed(layout, r.ids, r.stop):
                seen[name] += 1
                assert body <= max(modes[name].max_tokens, 32)
            for p in r.parts:
                if isinstance(p, Media) and p.modality == "image":
                    assert p.codes.shape == (1, 32)
                if isinstance(p, Media) and p.modality == "music":
                    assert p.codes.shape[0] == 4
    assert all(v > 0 for v in seen.values()), seen  # the test really exercised every span kind


@pytest.mark.parametrize("modality", ["image", "speech", "music"])
def test_required_modality_gives_exactly_one_span(lm, modality):
    layout, g = lm.layout, lm.generator
    for seed in range(4):
        excite_specials(lm.model, layout, 100 + seed)
        cfg = GenerationConfig(modes=_small_modes(40), max_new_tokens=60, seed=seed, outputs=(modality,),
                               require=modality)
        r = g.generate_one(_prompts(lm)[0], cfg)
        assert r.issues == [] and r.stop == "eom"
        assert len(r.parts) == 1 and isinstance(r.parts[0], Media) and r.parts[0].modality == modality


def test_text_only_answers_have_no_spans_or_markers(lm):
    excite_specials(lm.model, lm.layout, 7)
    cfg = GenerationConfig(max_new_tokens=40, seed=0, outputs=("text",))
    for r in lm.generator.generate(_prompts(lm), cfg):
        assert r.issues == [] and r.stop in ("eom", "budget")
        assert all(isinstance(p, Text) for p in r.parts)


def test_budget_cut_still_closes_spans(lm):
    """Tiny budgets: spans are cut short at a frame boundary and closed, the answer ends with <eom>."""
    layout, g = lm.layout, lm.generator
    for seed in range(8):
        excite_specials(lm.model, layout, 200 + seed)
        for budget in (2, 7, 9, 36):
            r = g.generate_one(_prompts(lm)[1], GenerationConfig(max_new_tokens=budget, seed=seed))
            assert len(r.ids) + 1 <= budget
            check_well_formed(layout, r.ids, r.stop)
    with pytest.raises(ContextError, match="image answer needs 35"):
        g.generate_one(_prompts(lm)[0], GenerationConfig(max_new_tokens=20, require="image", outputs=("image",)))


def test_kv_cache_matches_uncached_greedy(lm):
    layout, g = lm.layout, lm.generator
    prompts = _prompts(lm)
    for seed, constrained in ((3, True), (4, False)):
        excite_specials(lm.model, layout, seed)
        cfg = GenerationConfig(modes=_small_modes(16), max_new_tokens=40, constrained=constrained).with_greedy()
        cached = g.generate(prompts, cfg, use_cache=True)
        uncached = g.generate(prompts, cfg, use_cache=False)
        for a, b in zip(cached, uncached):
            assert a.ids.tolist() == b.ids.tolist() and a.stop == b.stop


def test_batch_rows_match_single_generation(lm):
    """Left padding + per-row positions: a row of a batch generates what it would alone."""
    excite_specials(lm.model, lm.layout, 11)
    prompts = _prompts(lm)
    cfg = GenerationConfig(modes=_small_modes(16), max_new_tokens=30).with_greedy()
    batch = lm.generator.generate(prompts, cfg)
    for p, r in zip(prompts, batch):
        assert lm.generator.generate_one(p, cfg).ids.tolist() == r.ids.tolist()


def test_sampling_is_seeded(lm):
    excite_specials(lm.model, lm.layout, 12)
    p = _prompts(lm)[:2]
    a = lm.generator.generate(p, GenerationConfig(max_new_tokens=30, seed=5))
    b = lm.generator.generate(p, GenerationConfig(max_new_tokens=30, seed=5))
    assert [x.ids.tolist() for x in a] == [x.ids.tolist() for x in b]
    assert lm.generator.last_seed == 5


def test_settings_switch_at_span_start(lm, monkeypatch):
    """Each step samples with the settings of the mode the row is in (text / inside a span)."""
    layout, g = lm.layout, lm.generator
    modes = {"text": SamplingSettings(temperature=0.5, max_tokens=64),
             "image": SamplingSettings(temperature=1.5), "speech": SamplingSettings(temperature=1.25, max_tokens=8),
             "music": SamplingSettings(temperature=0.75, top_k=5, max_tokens=8)}
    calls = []
    real = gen_mod.sample_tokens

    def spy(logits, temperature, top_k, top_p, generator=None):
        calls.append((float(temperature[0]), int(top_k[0])))
        return real(logits, temperature, top_k, top_p, generator)

    monkeypatch.setattr(gen_mod, "sample_tokens", spy)
    checked = set()
    for seed in range(6):
        excite_specials(lm.model, layout, 300 + seed)
        calls.clear()
        r = g.generate_one(_prompts(lm)[0], GenerationConfig(modes=modes, max_new_tokens=60, seed=seed))
        starts = {layout.id(m.start): m.name for m in layout.modalities.values()}
        ends = {layout.id(m.end) for m in layout.modalities.values()}
        mode = "text"
        for step, tid in enumerate(r.ids.tolist()):
            assert calls[step][0] == modes[mode].temperature, (step, mode)
            if mode == "music":
                assert calls[step][1] == 5
            checked.add(mode)
            if tid in starts:
                mode = starts[tid]
            elif tid in ends:
                mode = "text"
    assert len(checked) >= 3, checked


def test_unconstrained_malformed_output_is_reported_not_raised(lm):
    layout, g = lm.layout, lm.generator
    found = []
    for seed in range(12):
        excite_specials(lm.model, layout, 400 + seed)
        cfg = GenerationConfig(modes=_small_modes(16), max_new_tokens=40, seed=seed, constrained=False)
        for r in g.generate(_prompts(lm), cfg):
            found += r.issues
            assert len(r.ids) <= 40
            assert r.stop in ("eom", "budget", "eos", *layout.roles.values())
    assert found, "an erratic unconstrained model should produce at least one malformed span"


def test_streamed_text_equals_parsed_text(lm):
    class Collect(Streamer):
        def __init__(self, *a):
            super().__init__(*a)
            self.pieces = []
            self.current = ""

        def on_text(self, row, text):
            self.current += text

        def _cut(self, *_a, **_k):
            if self.current:
                self.pieces.append(self.current)
            self.current = ""

        on_span_start = on_marker = on_end = _cut

    for seed in range(4):
        excite_specials(lm.model, lm.layout, 500 + seed)
        s = Collect(lm.tokenizer, lm.layout)
        r = lm.generator.generate_one(_prompts(lm)[0], GenerationConfig(max_new_tokens=60, seed=seed), streamer=s)
        assert s.pieces == [p.text for p in r.parts if isinstance(p, Text)]
    out = io.StringIO()
    lm.generator.generate_one(_prompts(lm)[0], GenerationConfig(max_new_tokens=20, seed=1),
                              streamer=ConsoleStreamer(lm.tokenizer, lm.layout, out))
    assert out.getvalue().endswith("\n")


def test_sample_tokens_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    zero = torch.zeros(2)
    ones = torch.ones(2)
    assert sample_tokens(logits, zero, torch.zeros(2, dtype=torch.long), ones, g).tolist() == [1, 0]
    for _ in range(20):  # top-k 1 and a tiny top-p are argmax whatever the temperature
        assert sample_tokens(logits, ones * 5, torch.ones(2, dtype=torch.long), ones, g).tolist() == [1, 0]
        assert sample_tokens(logits, ones * 5, torch.zeros(2, dtype=torch.long), ones * 1e-3, g).tolist() == [1, 0]
        # top-k 2: only the two best ids of each row
        got = sample_tokens(logits, ones * 5, torch.full((2,), 2, dtype=torch.long), ones, g).tolist()
        assert got[0] in (1, 3) and got[1] in (0, 3)
    masked = logits.clone()
    masked[0, 1] = float("-inf")
    assert sample_tokens(masked, zero, torch.zeros(2, dtype=torch.long), ones, g).tolist() == [3, 0]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = gen_mod.apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_setting_overrides():
    modes = apply_setting_overrides(default_settings(), ["speech.temperature=0.5", "all.top_p=0.8"])
    assert modes["speech"].temperature == 0.5 and all(m.top_p == 0.8 for m in modes.values())
    for bad in ("speech.temp=1", "voice.top_p=1", "top_p=1", "music.top_k=x", "text.top_p=2"):
        with pytest.raises(ValueError):
            apply_setting_overrides(default_settings(), [bad])


def test_settings_come_from_the_plugins():
    """Modes are text + the registered modalities; span defaults are each plugin's ``sampling``,
    which for the built-ins are today's values (AnyGPT's release settings)."""
    from anygpt import modalities as registry
    from anygpt.infer.settings import MODES

    modes = default_settings()
    assert MODES == tuple(modes) == ("text", *registry.names())
    for name, plugin in registry.registered().items():
        assert modes[name] == SamplingSettings(**plugin.sampling)
    assert modes["text"] == SamplingSettings(temperature=0.7, top_p=0.9, max_tokens=512)
    assert modes["image"] == SamplingSettings(temperature=1.0, top_p=1.0, max_tokens=32)
    assert modes["speech"] == SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.05, max_tokens=1500)
    assert modes["music"] == SamplingSettings(temperature=1.0, top_p=1.0, top_k=200, repetition_penalty=1.15,
                                              max_tokens=2000)


def test_media_flags_come_from_the_plugins():
    """Today's flag names are kept; each is generated from a plugin attribute."""
    import argparse

    from anygpt.infer.cli import _limits, _render_options, add_generate_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_generate_parser(sub)
    args = sub.choices["generate"].parse_args(
        ["--model", "m", "--max-speech-seconds", "3", "--max-music-seconds", "4", "--max-voice-seconds", "5",
         "--image-steps", "2", "--image-guidance", "1.5", "x"])
    assert _limits(args) == {"speech": 3.0, "music": 4.0, "voice": 5.0}
    assert _render_options(args) == {"image": {"steps": 2, "guidance": 1.5}}
    args.seed = 7
    assert _render_options(args)["image"]["seed"] == 7  # --seed reaches the renderer's seed option


def test_dtype_choice(monkeypatch):
    assert pick_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(torch.device("cuda"), "fp32") == torch.float32
    with pytest.raises(ValueError):
        pick_dtype(torch.device("cpu"), "int8")


def test_released_checkpoint_layout_and_roles(tmp_path):
    """A released-style checkpoint (AnyGPT added tokens, [MMGPT]/<eos>, no vocab_layout.json) loads and
    generates; its answers stop on its own <eos>."""
    from anygpt.infer.loading import load_lm

    d = build_tiny_model_dir(tmp_path, release_style=True)
    assert not (Path(d) / "vocab_layout.json").exists()
    lm = load_lm(d, device="cpu")
    assert lm.released_format and lm.layout.roles["assistant"] == "[MMGPT]"
    assert lm.layout.roles["assistant_end"] == "<eos>"
    prompt = lm.generator.format.prompt(Conversation([Turn("user", [Text("hello")])]))
    assert lm.layout.role_id("assistant") in prompt.tolist()[-3:]
    for seed in range(3):
        excite_specials(lm.model, lm.layout, seed)
        r = lm.generator.generate_one(prompt, GenerationConfig(max_new_tokens=40, seed=seed))
        check_well_formed(lm.layout, r.ids, r.stop)


def test_bench_infer_smoke():
    """``anygpt bench infer`` parts run and report their ratios (tiny sizes; the numbers are the bench's job)."""
    from anygpt.infer.bench import bench_lm, bench_sampler, bench_soundstorm

    lm = bench_lm(model="tiny", context=64, new_tokens=4, free_tokens=8, repeats=1, device="cpu")
    assert lm["kv_cache_speedup"] > 0 and lm["constraint_overhead_ratio"] > 0 and lm["context"] == 64
    ss = bench_soundstorm(size="tiny", seconds=0.2, repeats=1, device="cpu")
    assert ss["frames"] == 10 and ss["ar_forward_passes"] == 70 and ss["soundstorm_speedup"] > 0
    draws = bench_sampler(batch=4, vocab=100, allowed=10, repeats=1, device="cpu")
    assert draws["speedup"] > 0 and draws["vocab"] == 100


def test_sample_from_follows_the_probabilities_and_never_draws_a_zero():
    """The inverse-CDF draw: frequencies match the row's probabilities (rows need not sum to 1), an id
    of probability 0 is never drawn (not at either end of the row), and a seed repeats the draws."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]]).repeat(20000, 1)
    draws = sample_from(probs, torch.Generator().manual_seed(0))
    assert torch.equal(draws, sample_from(probs, torch.Generator().manual_seed(0)))
    first, second = draws[0::2], draws[1::2]
    assert set(first.tolist()) == {1, 3, 4} and set(second.tolist()) == {5}
    freq = torch.bincount(first, minlength=6).double() / first.numel()
    assert torch.allclose(freq[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.015)

"""``anygpt bench infer``: what the inference design choices buy, measured on this machine.

1. KV-cached vs uncached generation at a 1k-token context (tokens/s ratio): why the loop keeps the
   cache (uncached, every step re-reads the whole context).
2. Constrained vs unconstrained generation (tokens/s, overhead per token): what the constraint state
   machine costs (a cached mask lookup per row and a ``masked_fill`` per step).
3. SoundStorm decoding of 10 s of speech (RVQ layers 2-8 from layer 1) vs autoregressive decoding of
   the same 7 x 500 codes by a same-size causal transformer with a KV cache (time ratio): why speech
   is rendered by a parallel decoder.
4. Drawing one id per row from ``[64, V]`` probabilities at the AnyGPT-layout vocabulary size:
   ``torch.multinomial`` vs the inverse-CDF draw the generator uses (:func:`sample_from`), time
   ratio: why sampling is not ``multinomial`` (on CPU it cost more than a tiny model's decode step).

Models are random (speed does not depend on weights); every number is the best of ``repeats``
interleaved runs, because on a shared machine the noise between back-to-back runs is larger than
small differences.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from anygpt.decoders.soundstorm import DEFAULT_STEPS, SoundStorm, SoundStormConfig
from anygpt.infer.generation import Generator, cache_argument, new_cache, pick_device, sample_from
from anygpt.infer.settings import GenerationConfig
from anygpt.model import build_model
from anygpt.text_tokenizer import prepare_tokenizer, train_tiny_tokenizer

# SoundStorm sizes for part 3: "tiny" is the test config (the CPU default); "small" takes minutes on a CPU; "release" is
# AnyGPT's released decoder (dim 1024, 12 layers), the honest comparison on a GPU.
SOUNDSTORM_SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": dict(dim=256, depth=4, heads=4, dim_head=64, ff_mult=4, conv_kernel_size=31),
    "release": dict(dim=1024, depth=12, heads=8, dim_head=128, ff_mult=4, conv_kernel_size=31),
}


def _best(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _tiny_lm(root: Path, model: str, device: torch.device):
    words = "the a red bus cat sings loud music speech picture quiet river green blue".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(200)]
    train_tiny_tokenizer(texts, root / "tok", vocab_size=320)
    tok, layout = prepare_tokenizer(root / "tok")
    lm = build_model(model, layout, tok, seed=0).to(device).eval()
    return Generator(lm, tok, layout), layout


def bench_lm(model: str = "small", context: int = 1024, new_tokens: int = 32, free_tokens: int = 128,
             repeats: int = 3, device: str | None = None) -> dict[str, Any]:
    """Parts 1 and 2 (see the module docstring)."""
    dev = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="anygpt-bench-infer-") as tmp:
        gen, layout = _tiny_lm(Path(tmp), model, dev)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, layout.base_vocab_size, (context,), generator=g).numpy()
        base = GenerationConfig(seed=0).with_greedy()

        def decode_rate(n: int, use_cache: bool, constrained: bool) -> float:
            """Decode tokens/s of one run (prefill excluded: it is the same either way)."""
            cfg = replace(base, max_new_tokens=n, min_new_tokens=n, constrained=constrained)
            gen.generate([prompt], cfg, use_cache=use_cache)
            return gen.last_stats.tokens_per_second

        decode_rate(4, True, True)  # warm-up (allocator, kernels)
        rates: dict[str, float] = {}
        # Runs interleaved, best of each: a load spike on a shared machine then hits both sides alike.
        for _ in range(repeats):
            for key, args in (("cached", (new_tokens, True, False)), ("uncached", (new_tokens, False, False)),
                              ("free", (free_tokens, True, False)), ("constrained", (free_tokens, True, True))):
                rates[key] = max(rates.get(key, 0.0), decode_rate(*args))
        params = sum(p.numel() for p in gen.model.parameters())
    return {
        "model": model, "params": params, "device": dev.type, "vocab": layout.total, "context": context,
        "new_tokens": new_tokens, "cached_tokens_per_s": rates["cached"], "uncached_tokens_per_s": rates["uncached"],
        "kv_cache_speedup": rates["cached"] / rates["uncached"],
        "free_tokens": free_tokens, "unconstrained_tokens_per_s": rates["free"],
        "constrained_tokens_per_s": rates["constrained"],
        "constraint_overhead_ms_per_token": (1 / rates["constrained"] - 1 / rates["free"]) * 1e3,
        "constraint_overhead_ratio": rates["free"] / rates["constrained"],
    }


def bench_soundstorm(size: str = "small", seconds: float = 10.0, repeats: int = 2,
                     device: str | None = None) -> dict[str, Any]:
    """Part 3: SoundStorm vs autoregressive decoding of RVQ layers 2-8 for ``seconds`` of speech.

    The autoregressive baseline is a LLaMA-style decoder of the same width, depth and heads whose
    vocabulary holds the 1024 semantic + 7 x 1024 acoustic codes; it reads the semantic ids as a
    prompt and generates the 7 acoustic codes of each frame in turn (7 x T steps, KV-cached, greedy),
    as an AudioLM-style fine stage would.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SOUNDSTORM_SIZES:
        raise ValueError(f"unknown SoundStorm size {size!r}; use one of {sorted(SOUNDSTORM_SIZES)}")
    dev = pick_device(device)
    torch.manual_seed(0)
    cfg = SoundStormConfig.tiny(**SOUNDSTORM_SIZES[size]) if size != "release" else SoundStormConfig.anygpt_release()
    ss = SoundStorm(cfg).to(dev).eval()
    frames = int(round(seconds * 50))
    semantic = torch.randint(0, cfg.semantic_vocab_size, (1, frames), device=dev)
    ar_cfg = LlamaConfig(vocab_size=cfg.semantic_vocab_size + cfg.num_acoustic * cfg.codebook_size,
                         hidden_size=cfg.dim, intermediate_size=cfg.dim * cfg.ff_mult, num_hidden_layers=cfg.depth,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, head_dim=cfg.dim_head,
                         max_position_embeddings=frames * (cfg.num_acoustic + 1) + 8)
    ar = LlamaForCausalLM(ar_cfg).to(dev).eval()
    n_ar = frames * cfg.num_acoustic

    @torch.inference_mode()
    def autoregressive() -> None:
        cache = {cache_argument(ar): new_cache(ar)}  # filled in place by every call
        out = ar(input_ids=semantic, use_cache=True, logits_to_keep=1, **cache)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(n_ar - 1):
            out = ar(input_ids=nxt, use_cache=True, **cache)
            nxt = out.logits[:, -1:].argmax(-1)

    def parallel() -> None:
        ss.generate(semantic, seed=0)

    parallel()  # warm-up
    t_ss = _best(parallel, repeats)
    t_ar = _best(autoregressive, 1 if dev.type == "cpu" else repeats)
    return {
        "size": size, "device": dev.type, "seconds_of_speech": seconds, "frames": frames,
        "soundstorm_params": sum(p.numel() for p in ss.parameters()),
        "ar_params": sum(p.numel() for p in ar.parameters()),
        "soundstorm_forward_passes": sum(ss._step_schedule(DEFAULT_STEPS)),
        "ar_forward_passes": n_ar,
        "soundstorm_s": t_ss, "autoregressive_s": t_ar, "soundstorm_speedup": t_ar / t_ss,
    }


def bench_sampler(batch: int = 64, vocab: int = 18020, allowed: int = 1024, repeats: int = 20,
                  device: str | None = None) -> dict[str, Any]:
    """Part 4: one draw per row of ``[batch, vocab]`` probabilities (``allowed`` ids nonzero per row,
    as when a span's range is the only one open): ``torch.multinomial`` vs :func:`sample_from`."""
    dev = pick_device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.full((batch, vocab), float("-inf"), device=dev)
    logits[:, :allowed] = torch.randn((batch, allowed), generator=g, device=dev)
    probs = logits.softmax(dim=-1)
    t_multinomial = _best(lambda: torch.multinomial(probs, 1, generator=g), repeats)
    t_cdf = _best(lambda: sample_from(probs, g), repeats)
    return {"batch": batch, "vocab": vocab, "allowed": allowed, "multinomial_ms": t_multinomial * 1e3,
            "inverse_cdf_ms": t_cdf * 1e3, "speedup": t_multinomial / t_cdf, "device": dev.type}


def bench_infer(model: str = "small", context: int = 1024, soundstorm_size: str | None = None,
                repeats: int = 4, device: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Run all four parts; returns a JSON-ready dict and prints a table when ``verbose``.

    Args:
        model: LM config for parts 1-2 (``tiny`` / ``small``).
        context: prompt length for part 1.
        soundstorm_size: ``tiny`` / ``small`` / ``release`` (default: release on CUDA, tiny on CPU,
            where the autoregressive baseline of ``small`` alone takes minutes).
        repeats: timing repeats (best of).
        device: ``auto`` / ``cpu`` / ``cuda``.
    """
    size = soundstorm_size or ("release" if pick_device(device).type == "cuda" else "tiny")
    lm = bench_lm(model=model, context=context, repeats=repeats, device=device)
    ss = bench_soundstorm(size=size, repeats=max(1, repeats - 1), device=device)
    sampler = bench_sampler(device=device)
    result = {"lm": lm, "soundstorm": ss, "sampler": sampler}
    if verbose:
        print(f"bench infer ({lm['model']} LM, {lm['params'] / 1e6:.1f}M params, vocab {lm['vocab']}, {lm['device']})")
        print(f"  decoding at {lm['context']}-token context, {lm['new_tokens']} new tokens (prefill excluded)")
        print(f"    KV-cached              {lm['cached_tokens_per_s']:9.1f} tokens/s")
        print(f"    uncached               {lm['uncached_tokens_per_s']:9.1f} tokens/s   "
              f"ratio cached/uncached {lm['kv_cache_speedup']:.1f}x")
        print(f"  constraints, {lm['free_tokens']} tokens after a {lm['context']}-token prompt")
        print(f"    unconstrained          {lm['unconstrained_tokens_per_s']:9.1f} tokens/s")
        print(f"    constrained            {lm['constrained_tokens_per_s']:9.1f} tokens/s   "
              f"overhead {lm['constraint_overhead_ms_per_token']:+.2f} ms/token "
              f"(ratio {lm['constraint_overhead_ratio']:.2f})")
        print(f"  speech layers 2-8 for {ss['seconds_of_speech']:g} s ({ss['frames']} frames), {ss['size']} size, "
              f"{ss['soundstorm_params'] / 1e6:.1f}M vs {ss['ar_params'] / 1e6:.1f}M params")
        print(f"    SoundStorm             {ss['soundstorm_s']:9.2f} s   ({ss['soundstorm_forward_passes']} forward passes)")
        print(f"    autoregressive         {ss['autoregressive_s']:9.2f} s   ({ss['ar_forward_passes']} forward passes)   "
              f"ratio {ss['soundstorm_speedup']:.1f}x")
        print(f"  one draw per row of [{sampler['batch']}, {sampler['vocab']}] probabilities "
              f"({sampler['allowed']} ids allowed)")
        print(f"    torch.multinomial      {sampler['multinomial_ms']:9.2f} ms")
        print(f"    inverse CDF            {sampler['inverse_cdf_ms']:9.2f} ms   ratio {sampler['speedup']:.1f}x")
    return json.loads(json.dumps(result, default=float))

"""``anygpt bench gpu`` (also ``python -m anygpt.gpu_check``): one script that measures the CUDA path on one GPU.

What it runs, sized for under 8 minutes on one H100/H200-class GPU (``--dry-run``: the same code at tiny
sizes, on a CPU when there is no GPU; CI runs it so the script cannot rot):

1. **training**, once per attention path (``mask4d``, ``flex``, ``flash_varlen``; :mod:`anygpt.attention`):
   the trainer on one GPU in bf16, a ~0.9 B LLaMA built from scratch (``model.name=1b``, no download),
   packed rows of 4096 tokens of synthetic speech/image/music pairs.  Tokens/s (non-padding), step time,
   peak memory and MFU = 6 * N * tokens/s / the GPU's dense bf16 peak (N = all parameters; attention
   FLOPs are not counted, so MFU is a lower bound).  Each path runs in its own process: fresh memory
   statistics, compile caches and process group, and a path that fails or hangs cannot take the others
   with it.  Engine: our DeepSpeed engine and training step (``Trainer.train_step``: ZeRO-3, one rank, so
   its process group carries no traffic) when DeepSpeed is installed; otherwise the same model, loss and
   attention code with torch's fused AdamW and no process group at all.  The output says which.
2. **codecs**: real-size SpeechTokenizer and Encodec (released architectures, random weights: speed does
   not depend on weight values) encode batches of 1, 8 and 32 clips of 10 s: the real-time factor per batch.
3. **generation**: KV-cached decoding with the same 1b model (bf16): prompt 1024, 128 new tokens, batch 1 and 8.

Offline GPU nodes bring their own CUDA PyTorch and transformers.  This module imports only the standard
library until it has checked what is missing; ``--wheels DIR`` installs the missing packages from a folder
of wheels (``pip install --no-index --find-links DIR``) under a constraints file that pins the node's
torch, transformers and triton, so nothing replaces them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

# Dense (non-sparse) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets; the datasheets' larger
# "with sparsity" figures are 2x these.  Matched against torch.cuda.get_device_name() in this order
# (more specific names first).  Unknown GPU: pass --peak-tflops.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"\bGB200\b|\bB200\b", 2250.0),
    (r"\bH200 NVL\b", 835.0),
    (r"\bGH200\b|\bH200\b", 989.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100\b|\bH800\b", 989.0),   # SXM
    (r"\bA100\b|\bA800\b", 312.0),   # SXM and PCIe
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),             # not A10G (AWS), whose peak NVIDIA does not publish
    (r"\bRTX 4090\b", 165.0),
    (r"\bRTX A6000\b", 155.0),
]

# import name -> pip name.  REQUIRED: the model, data and codec code this script runs; checked before
# anything heavy is imported.  torch itself must come with the node.
REQUIRED = {"numpy": "numpy", "yaml": "pyyaml", "transformers": "transformers", "tokenizers": "tokenizers",
            "sentencepiece": "sentencepiece", "google.protobuf": "protobuf", "safetensors": "safetensors",
            "webdataset": "webdataset", "braceexpand": "braceexpand", "tqdm": "tqdm", "PIL": "pillow",
            "soundfile": "soundfile", "soxr": "soxr"}
# What each optional package enables (missing: that part falls back or is skipped, and says so).
OPTIONAL = {"deepspeed": ("deepspeed", "training runs on torch AdamW instead of the DeepSpeed engine"),
            "accelerate": ("accelerate", "training runs on torch AdamW (ZeRO-3 construction needs accelerate)"),
            "flash_attn": ("flash-attn", "the flash_varlen attention path is skipped")}
PINNED = ("torch", "transformers", "triton", "pytorch-triton")  # never replaced by an install from --wheels
PATH_NAMES = ("mask4d", "flex", "flash_varlen")  # anygpt.attention.PATHS (that module needs torch)


@dataclass(frozen=True)
class Sizes:
    model: str
    seq_len: int
    micro_batch: int
    warmup: int
    steps: int
    pairs: int
    clip_seconds: float
    codec_batches: tuple[int, ...]
    prompt: int
    new_tokens: int
    gen_batches: tuple[int, ...]
    budget_s: float  # the whole check; each training path gets a share of what is left

    @property
    def frames(self) -> tuple[int, int]:
        # Speech/music pairs from 0.5 s up to a music clip of half a row (4 ids per frame).
        return 25, max(26, self.seq_len // 8)


FULL = Sizes("1b", 4096, 4, 3, 10, 192, 10.0, (1, 8, 32), 1024, 128, (1, 8), 450.0)
DRY = Sizes("tiny", 256, 2, 1, 2, 48, 1.0, (1, 2), 32, 8, (1, 2), 300.0)
RESERVED_S = {"full": 90.0, "dry": 20.0}  # kept back from the training paths for codecs and generation


def peak_bf16_tflops(device_name: str) -> float | None:
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def mfu(params: int, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: 6 * N * tokens/s over the peak (forward 2N + backward 4N per token)."""
    return 6.0 * params * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None


# ---------------------------------------------------------------------------- packages
def missing(modules: dict) -> list[str]:
    """Import names of ``modules`` that cannot be found (without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package that is itself missing
            found = False
        if not found:
            out.append(name)
    return out


def pins() -> list[str]:
    """``name==version`` for every installed package of :data:`PINNED`."""
    out = []
    for name in PINNED:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def pip_command(packages: list[str], wheels: str | Path, constraints: str | Path) -> list[str]:
    """Install ``packages`` from the wheel folder only, under the constraints that pin the node's torch."""
    return [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
            "-c", str(constraints), *packages]


def ensure_packages(wheels: str | None) -> dict[str, Any]:
    """Check the packages; install missing ones from ``wheels`` if given.  SystemExit if required ones stay missing."""
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("anygpt bench gpu: torch is not installed; install the node's CUDA build of PyTorch first")
    need, opt = missing(REQUIRED), missing(OPTIONAL)
    installed: list[str] = []
    if wheels and (need or opt):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="anygpt-pins-", delete=False) as f:
            f.write("\n".join(pins()) + "\n")
        groups = [[REQUIRED[m] for m in need]] if need else []
        groups += [[OPTIONAL[m][0]] for m in opt]  # one by one: a missing optional wheel must not block the rest
        for packages in groups:
            cmd = pip_command(packages, wheels, f.name)
            print("[gpu check] " + " ".join(cmd), flush=True)
            if subprocess.call(cmd) == 0:
                installed += packages
        os.unlink(f.name)
        importlib.invalidate_caches()
        need, opt = missing(REQUIRED), missing(OPTIONAL)
    if need:
        names = " ".join(REQUIRED[m] for m in need)
        raise SystemExit(f"anygpt bench gpu: missing packages: {names}; install them (pip install -c <pins> {names}) "
                         f"or pass --wheels DIR holding their wheels")
    for m in opt:
        print(f"[gpu check] optional package {OPTIONAL[m][0]} not installed: {OPTIONAL[m][1]}", flush=True)
    return {"installed": installed, "missing_optional": [OPTIONAL[m][0] for m in opt], "pinned": pins()}


# ---------------------------------------------------------------------------- training (one path per process)
def _train_config(sizes: Sizes, path: str, workdir: Path, corpus: dict, checkpointing: bool) -> Any:
    from anygpt.config import load_train_config

    return load_train_config(None, base={
        "run": {"dir": str(workdir / f"run-{path}"), "max_steps": sizes.warmup + sizes.steps + 2,
                "save_every": 10**9, "log_every": 10**9, "progress": False, "tensorboard": False},
        "model": {"name": sizes.model, "tokenizer": corpus["tokenizer"], "attention": path,
                  "activation_checkpointing": checkpointing},
        "data": {"sources": [{"name": "pairs", "shards": corpus["pairs"]}], "seq_len": sizes.seq_len},
        "optim": {"micro_batch_size": sizes.micro_batch, "warmup_steps": 1, "lr": 1e-4, "min_lr": 1e-5}})


class TorchRun:
    """The trainer's model, loss and attention code with torch's AdamW on one device, no process group
    (what runs when DeepSpeed is absent): one micro-batch per step, gradient clipping as configured."""

    def __init__(self, cfg: Any, device: Any):
        import torch

        from anygpt.attention import LOADER_ATTENTION
        from anygpt.data import TASK_NAMES, build_train_loader
        from anygpt.text_tokenizer import prepare_tokenizer
        from anygpt.train.engine import Runtime, build_model, build_optimizer, count_params, resolve_model_source
        from anygpt.train.losses import TokenLoss

        self.cfg, self.device, self.path = cfg, device, cfg.model.attention
        tok, layout = prepare_tokenizer(cfg.model.tokenizer)
        rt = Runtime(0, 1, 0, device, "none")
        ds = {"zero_optimization": {"stage": 0}}  # no ZeRO: engine.build_model builds the plain model
        with torch.device(device):  # initialise the weights where they will live
            self.model, _ = build_model(cfg, resolve_model_source(cfg), tok, layout, ds, rt, self.path)
        self.model.train()
        self.optimizer = build_optimizer(cfg, self.model, ds, rt)  # fused AdamW on CUDA
        self.loader = build_train_loader(cfg, tok, layout, attention=LOADER_ATTENTION[self.path])
        self.loss_fn = TokenLoss(layout, TASK_NAMES, device)
        self.params = count_params(self.model)[1]

    def step(self) -> dict:
        import torch

        from anygpt.attention import attention_inputs
        from anygpt.train.losses import lm_loss

        batch = next(self.loader)
        loss = lm_loss(self.model, self.model, attention_inputs(batch, self.path, self.device), batch, self.loss_fn)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "tokens": int((batch["segment_ids"] > 0).sum())}


def train_part(path: str, engine: str, sizes: Sizes, workdir: Path, corpus: dict, checkpointing: bool) -> dict:
    """Train ``sizes.warmup + sizes.steps`` steps through ``path`` in this process; the measured numbers."""
    import torch

    from anygpt.attention import attention_inputs, mask_nbytes

    cuda = torch.cuda.is_available()
    cfg = _train_config(sizes, path, workdir, corpus, checkpointing)
    t0 = time.perf_counter()
    if engine == "deepspeed":
        from anygpt.train.loop import Trainer

        trainer = Trainer(cfg).setup()
        step, loader, model = trainer.train_step, trainer.loader, trainer.bundle.model
        params, device, backend = trainer.bundle.total_params, trainer.rt.device, trainer.rt.backend
    else:
        run = TorchRun(cfg, torch.device("cuda" if cuda else "cpu"))
        step, loader, model, params, device, backend = run.step, run.loader, run.model, run.params, run.device, None
    setup_s = time.perf_counter() - t0
    mask_bytes = mask_nbytes(attention_inputs(next(loader), path, device))

    def timed() -> tuple[float, dict]:
        start = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()  # the step's own clock may stop before the GPU has finished
        return time.perf_counter() - start, out

    first_s = timed()[0]  # compilation (flex), allocator, cuDNN/cuBLAS selection
    for _ in range(sizes.warmup - 1):
        timed()
    times, tokens, losses = [], 0, []
    for _ in range(sizes.steps):
        dt, out = timed()
        times.append(dt)
        tokens += int(out["tokens"])
        losses.append(float(out["loss"]))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    result = {"path": path, "status": "ok", "engine": engine, "process_group": backend,
              "implementation": base.config._attn_implementation, "params": int(params),
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "activation_checkpointing": checkpointing, "setup_s": setup_s, "first_step_s": first_s,
              "steps": sizes.steps, "step_s": sorted(times)[len(times) // 2], "tokens_per_step": tokens / sizes.steps,
              "tokens_per_s": tokens / sum(times), "losses": losses, "mask_bytes": mask_bytes}
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if not all(math.isfinite(x) for x in losses):
        result["status"] = "ok, but a loss was not finite"
    if engine == "deepspeed":
        trainer.loader.close()
        trainer.logger.close()
    return result


def _spawn_train(path: str, opts: argparse.Namespace, engine: str, workdir: Path, corpus: dict,
                 timeout: float) -> dict:
    out = workdir / f"train-{path}.json"
    cmd = [sys.executable, "-m", "anygpt.gpu_check", "--part", "train", "--attention", path, "--engine", engine,
           "--workdir", str(workdir), "--corpus", json.dumps(corpus), "--out", str(out)]
    cmd += ["--dry-run"] if opts.dry_run else []
    cmd += ["--steps", str(opts.steps)] if opts.steps else []
    cmd += ["--checkpointing"] if opts.checkpointing else []
    env = dict(os.environ)
    # The child imports this very anygpt, installed or run from a checkout.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a world of one, whatever launched us
        env.pop(var, None)
    try:
        rc = subprocess.run(cmd, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return {"path": path, "status": f"timed out after {timeout:.0f} s"}
    if out.is_file():
        return json.loads(out.read_text())
    return {"path": path, "status": f"failed (exit status {rc}; its output is above)"}


def _run_part(opts: argparse.Namespace) -> int:
    sizes = _sizes(opts)
    corpus = json.loads(opts.corpus)
    try:
        result = train_part(opts.attention, opts.engine, sizes, Path(opts.workdir), corpus, opts.checkpointing)
    except Exception as e:  # noqa: BLE001 - reported as this path's status; the other paths go on
        first = str(e).splitlines()[0] if str(e) else ""
        result = {"path": opts.attention, "status": f"failed: {type(e).__name__}: {first}"[:400]}
        traceback.print_exc()
    Path(opts.out).write_text(json.dumps(result, default=float))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------- codecs and generation
def codec_part(sizes: Sizes, device: str, full: bool, repeats: int = 2) -> list[dict]:
    """Encode batches of clips with SpeechTokenizer and Encodec (the released architectures with random
    weights, or the tiny ones in a dry run): real-time factor = encode seconds per second of audio."""
    import numpy as np

    from anygpt.modalities import build_codec, codec_class

    rows = []
    rng = np.random.default_rng(0)
    for modality in ("speech", "music"):
        codec = (codec_class(modality).official(device=device) if full
                 else build_codec(modality, "tiny", device=device))
        n = int(sizes.clip_seconds * codec.sample_rate)
        for b in sizes.codec_batches:
            wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for _ in range(b)]
            codes = codec.encode(wavs)  # warm-up (kernel selection, LSTM weight packing); returns host arrays
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                codec.encode(wavs)
                best = min(best, time.perf_counter() - t0)
            rows.append({"codec": modality, "size": "real" if full else "tiny", "batch": b,
                         "params_m": round(sum(p.numel() for p in codec.parameters()) / 1e6, 1),
                         "clip_s": sizes.clip_seconds, "codes": list(codes[0].shape), "encode_s": best,
                         "encode_rtf": best / (b * sizes.clip_seconds),
                         "encode_x_real_time": b * sizes.clip_seconds / best})
        del codec
    return rows


def generation_part(sizes: Sizes, device: str, tokenizer_dir: str) -> list[dict]:
    """KV-cached greedy decoding (unconstrained, fixed length) through the project's Generator."""
    import torch

    from anygpt.infer.generation import Generator, pick_dtype
    from anygpt.model import build_model, quiet_transformers
    from anygpt.text_tokenizer import prepare_tokenizer

    dev = torch.device(device)
    tok, layout = prepare_tokenizer(tokenizer_dir)
    with torch.device(dev):
        model = build_model(sizes.model, layout, tok, dtype=pick_dtype(dev), seed=0)
    gen = Generator(model.eval(), tok, layout)
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the generator's cache keyword is being renamed upstream
        rows = _generate(gen, sizes, layout)
    params = sum(p.numel() for p in model.parameters())
    for r in rows:
        r.update(model=sizes.model, params=params, dtype=str(pick_dtype(dev)).replace("torch.", ""))
    return rows


def _generate(gen: Any, sizes: Sizes, layout: Any) -> list[dict]:
    import torch

    from anygpt.infer.settings import GenerationConfig

    dev = gen.device
    g = torch.Generator().manual_seed(0)
    base = replace(GenerationConfig(seed=0).with_greedy(), constrained=False)

    def fixed(n: int) -> Any:  # exactly n new tokens: the same work on every run
        return replace(base, max_new_tokens=n, min_new_tokens=n)

    def synced(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def prefill(ids: torch.Tensor) -> None:  # what the generator's first call does: the prompt into the cache
        with torch.inference_mode():
            gen.model(input_ids=ids, use_cache=True, logits_to_keep=1)

    gen.generate([torch.randint(3, layout.base_vocab_size, (sizes.prompt,), generator=g).numpy()], fixed(4))
    rows = []
    for b in sizes.gen_batches:
        ids = torch.randint(3, layout.base_vocab_size, (b, sizes.prompt), generator=g)
        # The generator's own clock stops before the GPU finishes the prefill; time it apart, synchronised.
        prefill_s = min(synced(lambda: prefill(ids.to(dev))) for _ in range(2))
        total_s = synced(lambda: gen.generate(list(ids.numpy()), fixed(sizes.new_tokens)))
        steps = gen.last_stats.steps
        decode_s = max(total_s - prefill_s, 1e-9)
        rows.append({"batch": b, "prompt_tokens": sizes.prompt, "new_tokens": sizes.new_tokens, "prefill_s": prefill_s,
                     "decode_s": decode_s, "decode_tokens_per_s": b * sizes.new_tokens / decode_s,
                     "ms_per_step": 1e3 * decode_s / max(steps, 1)})
    return rows


# ---------------------------------------------------------------------------- the check
def _sizes(opts: argparse.Namespace) -> Sizes:
    sizes = DRY if opts.dry_run else FULL
    return replace(sizes, steps=opts.steps) if opts.steps else sizes


def _engine(requested: str) -> str:
    have = not missing({"deepspeed": 0, "accelerate": 0})
    if requested == "deepspeed" and not have:
        raise SystemExit("anygpt bench gpu: --engine deepspeed needs the deepspeed and accelerate packages")
    return requested if requested != "auto" else ("deepspeed" if have else "torch")


def _paths(spec: str) -> list[str]:
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATH_NAMES]
    if unknown or not paths:
        raise SystemExit(f"anygpt bench gpu: --paths: unknown path {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {','.join(PATH_NAMES)}")
    return paths


def gpu_check(opts: argparse.Namespace) -> dict[str, Any]:
    """Run the whole check (see the module docstring); print a report and return it as a dict."""
    t_start = time.time()
    paths = _paths(opts.paths)
    packages = ensure_packages(opts.wheels)
    import torch

    from anygpt.attention import unavailable
    from anygpt.train.bench import synthetic_corpus

    cuda = torch.cuda.is_available()
    if not cuda and not opts.dry_run:
        raise SystemExit("anygpt bench gpu: no CUDA GPU visible (CUDA_VISIBLE_DEVICES? the node's torch build?); "
                         "--dry-run runs the same code at tiny sizes on a CPU")
    device = "cuda" if cuda else "cpu"
    sizes, engine = _sizes(opts), _engine(opts.engine)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = opts.peak_tflops or (peak_bf16_tflops(name) if cuda else None)
    engine_text = ("DeepSpeed engine + Trainer.train_step (ZeRO-3, one rank)" if engine == "deepspeed"
                   else "torch AdamW on the trainer's model/loss/attention code (DeepSpeed not used), no process group")
    print(f"[gpu check] {name}; bf16 peak {f'{peak:g} TFLOP/s (dense)' if peak else 'unknown (--peak-tflops)'}; "
          f"torch {torch.__version__}, transformers {metadata.version('transformers')}; engine: {engine_text}", flush=True)
    print(f"[gpu check] {'dry run, ' if opts.dry_run else ''}model {sizes.model}, packed rows {sizes.micro_batch}x"
          f"{sizes.seq_len}, {sizes.warmup} warm-up + {sizes.steps} timed steps per path", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="anygpt-gpu-check-"))
    try:
        corpus = synthetic_corpus(workdir / "data", pairs=sizes.pairs, conversations=0, eval_pairs=0,
                                  frames=sizes.frames)
        deadline = t_start + sizes.budget_s - RESERVED_S["dry" if opts.dry_run else "full"]
        train_rows = []
        runnable = [p for p in paths if unavailable(p, device, training=True) is None]
        for path in paths:
            reason = unavailable(path, device, training=True)
            if reason:
                row = {"path": path, "status": f"skipped: {reason}"}
            else:
                left = runnable[runnable.index(path):]
                timeout = max(30.0, (deadline - time.time()) / len(left))
                print(f"[gpu check] training through {path} (at most {timeout:.0f} s) ...", flush=True)
                row = _spawn_train(path, opts, engine, workdir, corpus, timeout)
                if "tokens_per_s" in row:
                    row["mfu"] = mfu(row["params"], row["tokens_per_s"], peak)
            train_rows.append(row)
            print(f"[gpu check] {_train_line(row)}", flush=True)
        print("[gpu check] codecs: encoding batches of clips ...", flush=True)
        codecs = codec_part(sizes, device, full=not opts.dry_run)
        print("[gpu check] KV-cached generation ...", flush=True)
        generation = generation_part(sizes, device, corpus["tokenizer"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"device": name, "cuda": cuda, "peak_bf16_tflops": peak, "engine": engine, "dry_run": bool(opts.dry_run),
              "torch": torch.__version__, "sizes": {**asdict(sizes), "frames": list(sizes.frames)},
              "packages": packages, "train": train_rows, "codecs": codecs, "generation": generation,
              "seconds": time.time() - t_start}
    print(report(result))
    return result


def _train_line(r: dict) -> str:
    if "tokens_per_s" not in r:
        return f"{r['path']:<13} {r['status']}"
    mem = f"{r['peak_allocated_gib']:6.1f} GiB" if "peak_allocated_gib" in r else f"{'-':>10}"
    util = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else f"{'-':>6}"
    return (f"{r['path']:<13} {r['tokens_per_s']:>11,.0f} {r['step_s']:>8.3f}s {mem} {util} "
            f"{r['mask_bytes']:>14,}  {r['implementation']}, first step {r['first_step_s']:.1f} s, "
            f"loss {r['losses'][0]:.2f} -> {r['losses'][-1]:.2f}{'' if r['status'] == 'ok' else '; ' + r['status']}")


def report(result: dict) -> str:
    lines = [f"\nanygpt bench gpu: {result['device']} ({result['engine']} engine"
             f"{', dry run' if result['dry_run'] else ''}, {result['seconds']:.0f} s)",
             f"{'path':<13} {'tokens/s':>11} {'step':>9} {'peak mem':>10} {'MFU':>6} {'mask bytes':>14}"]
    lines += [_train_line(r) for r in result["train"]]
    lines.append("codec encode       batch   clips   encode s  real-time factor (compute s per audio s)")
    for r in result["codecs"]:
        lines.append(f"{r['codec']:<7} {r['size']:<4} {r['params_m']:>5.1f}M {r['batch']:>5} {r['clip_s']:>6g} s "
                     f"{r['encode_s']:>9.3f}  {r['encode_rtf']:.4f} ({r['encode_x_real_time']:,.0f}x real time)")
    lines.append("generation (KV cache)  batch  prefill   decode tokens/s  ms/step")
    for r in result["generation"]:
        lines.append(f"{r['model']:<22} {r['batch']:>5}  {r['prefill_s']:>6.3f}s  {r['decode_tokens_per_s']:>15,.1f}  "
                     f"{r['ms_per_step']:>7.1f}")
    return "\n".join(lines)


def add_gpu_arguments(p: argparse.ArgumentParser) -> None:
    """The check's options (shared by ``anygpt bench gpu`` and ``python -m anygpt.gpu_check``)."""
    p.add_argument("--dry-run", action="store_true",
                   help="gpu: the same code at tiny sizes (a tiny LLaMA, rows of 256, tiny codecs), on a CPU "
                        "when there is no GPU: checks the script end to end in about a minute")
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="gpu: install missing packages from this folder of wheels (pip --no-index), never "
                        "replacing the node's torch/transformers/triton")
    p.add_argument("--paths", default=",".join(PATH_NAMES), help="gpu: attention paths to train, comma-separated")
    p.add_argument("--engine", default="auto", choices=("auto", "deepspeed", "torch"),
                   help="gpu: auto = the DeepSpeed engine when installed, else torch AdamW on the same model code")
    p.add_argument("--steps", type=int, default=None, help="gpu: timed steps per path (default 10; dry run 2)")
    p.add_argument("--checkpointing", action="store_true", help="gpu: train with activation checkpointing")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="gpu: dense bf16 peak of this GPU in TFLOP/s for MFU (default: from the device name)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m anygpt.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gpu_arguments(p)
    p.add_argument("--json", default=None, help="write the results here")
    # Internal: one training path in a fresh process (started by the check itself).
    p.add_argument("--part", default=None, choices=("train",), help=argparse.SUPPRESS)
    for flag in ("--attention", "--workdir", "--corpus", "--out"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.part == "train":
        return _run_part(opts)
    result = gpu_check(opts)
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
        print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

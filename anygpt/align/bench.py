"""``anygpt bench align``: one GRPO step split into generation / reward / update, and what gathering the
parameters once per rollout buys over generating through the ZeRO-3-partitioned module.

Runs ``nproc`` CPU ranks (``torchrun``, gloo, ZeRO-3) on a tiny random model with speech prompts and
the ``asr`` reward on a tiny random Whisper (so the reward's share includes SoundStorm, the codec
decoder and an ASR forward, as with a real one).  Each rank then generates the same answers twice,
from the same seed:

- *gathered once* (what the trainer does): :meth:`GenerationPolicy.sync` all-gathers every parameter
  once into an unpartitioned replica, which then generates without collectives;
- *partitioned*: the constrained generator runs on the engine's ZeRO-3 module, whose every forward
  call (one per generated token) all-gathers every layer.  Both ranks ask for the same answers, so
  they make the same number of forward calls and the collectives line up.

Both give the same ids (checked: ``identical_answers``); the ratio of their times is
``gather_once_speedup``.  Times are the slowest rank's, best of ``repeats``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEXTS = ["hello world", "the cat sits on a warm mat", "a red bus drives down the street", "green trees",
         "she sings a happy song", "the river is quiet at night", "one two three four five", "calm piano music"]


def _config(root: Path, steps: int, group_size: int, max_tokens: int) -> dict[str, Any]:
    return {"run": {"dir": str(root / "run"), "max_steps": steps + 1, "save_every": 10**6, "log_every": 10**6,
                    "seed": 0, "progress": False, "tensorboard": False},
            "model": {"name": str(root / "model" / "model"), "codecs": "tiny"},
            "optim": {"lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "micro_batch_size": group_size,
                      "deepspeed": "ds_configs/zero3.json"},
            "align": {"method": "grpo", "prompts": {"file": str(root / "prompts.jsonl")}, "prompts_per_step": 2,
                      "group_size": group_size, "max_new_tokens": max_tokens + 8,
                      "sampling": [f"speech.max_tokens={max_tokens}"], "guards": {"enabled": False},
                      "rewards": [{"name": "asr", "options": {"model": str(root / "whisper"), "soundstorm": "tiny"}}]}}


def _worker(root: Path, steps: int, repeats: int, group_size: int, max_tokens: int) -> None:
    """One rank: a warm-up step, ``steps`` timed steps, then the two ways of generating."""
    import torch

    from anygpt.align.config import load_align_config
    from anygpt.align.loop import AlignTrainer
    from anygpt.infer.generation import Generator

    cfg = load_align_config(None, base=_config(root, steps, group_size, max_tokens))
    trainer = AlignTrainer(cfg).setup()
    trainer.grpo_step(1)  # warm-up: first-call allocations, DeepSpeed's lazy set-up
    rows = [trainer.grpo_step(s) for s in range(2, steps + 2)]

    prompts = [p for p in trainer.prompts for _ in range(2)]  # the same on every rank: equal forward calls
    configs = trainer._gen_configs(prompts, seed=1234)
    # The partitioned module's LM head is a placeholder outside forward; the constraint masks are sized
    # from the replica (same architecture), then the generator is pointed at the partitioned module.
    partitioned = Generator(trainer.policy.model, trainer.tokenizer, trainer.layout)
    partitioned.model = trainer.engine.module.eval()
    timings: dict[str, float] = {"sync_s": float("inf"), "replica_generate_s": float("inf"),
                                 "partitioned_generate_s": float("inf")}
    same = True
    tokens = 0
    for _ in range(repeats):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        trainer.policy.sync(trainer.engine.module)
        t1 = time.perf_counter()
        fast = trainer.policy.generate([p.ids for p in prompts], configs)
        t2 = time.perf_counter()
        torch.distributed.barrier()
        t3 = time.perf_counter()
        slow = partitioned.generate([p.ids for p in prompts], configs)
        t4 = time.perf_counter()
        timings["sync_s"] = min(timings["sync_s"], t1 - t0)
        timings["replica_generate_s"] = min(timings["replica_generate_s"], t2 - t1)
        timings["partitioned_generate_s"] = min(timings["partitioned_generate_s"], t4 - t3)
        same = same and all(a.ids.tolist() == b.ids.tolist() for a, b in zip(fast, slow))
        tokens = sum(len(r.ids) for r in fast)
    slowest = torch.tensor([timings["sync_s"], timings["replica_generate_s"], timings["partitioned_generate_s"]],
                           dtype=torch.float64)
    torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    sync_s, replica_s, partitioned_s = slowest.tolist()
    if trainer.rt.is_main:
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("time_generation", "time_reward", "time_update",
                                                                 "time_step")}
        result = {
            "world_size": trainer.rt.world_size, "params": trainer.bundle.total_params, "steps": steps,
            "samples_per_rank": cfg.align.prompts_per_step * group_size,
            "response_tokens": sum(r["response_tokens"] for r in rows) / len(rows),
            "step_s": mean["time_step"], "generation_s": mean["time_generation"], "reward_s": mean["time_reward"],
            "update_s": mean["time_update"],
            # Each part is timed on its slowest rank, so the parts add up to a little more than the step:
            # the shares are of their sum.
            "split": {k: mean[f"time_{k}"] / sum(mean[f"time_{j}"] for j in ("generation", "reward", "update"))
                      for k in ("generation", "reward", "update")},
            "rollout": {"answers_per_rank": len(prompts), "tokens_per_rank": tokens, "sync_s": sync_s,
                        "replica_generate_s": replica_s, "gathered_once_s": sync_s + replica_s,
                        "partitioned_s": partitioned_s, "gather_once_speedup": partitioned_s / (sync_s + replica_s),
                        "identical_answers": bool(same)},
        }
        (root / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    trainer.logger.close()


def bench_align(nproc: int = 2, steps: int = 2, repeats: int = 2, group_size: int = 4, max_tokens: int = 48,
                workdir: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Build the tiny model, prompts and Whisper, run :func:`_worker` on ``nproc`` ranks; its result.

    Returns times in seconds: ``step_s`` and its parts ``generation_s``, ``reward_s``, ``update_s``
    (each the slowest rank's), ``split`` (each part's share of the three) and ``rollout`` (gathered
    once vs partitioned).
    """
    from anygpt.align.testing import tiny_whisper_dir
    from anygpt.infer.testing import build_tiny_model_dir

    tmp = tempfile.TemporaryDirectory(prefix="anygpt-bench-align-") if workdir is None else None
    root = Path(workdir or tmp.name)
    try:
        build_tiny_model_dir(root / "model")
        tiny_whisper_dir(root / "whisper")
        (root / "prompts.jsonl").write_text("".join(json.dumps({"modality": "speech", "text": t}) + "\n"
                                                    for t in TEXTS), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               "anygpt.align.bench", str(root), str(steps), str(repeats), str(group_size), str(max_tokens)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench align: the ranks failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        result = json.loads((root / "result.json").read_text(encoding="utf-8"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    if verbose:
        r, g = result, result["rollout"]
        print(f"one GRPO step on {r['world_size']} CPU ranks (ZeRO-3, tiny model {r['params'] / 1e6:.1f}M params, "
              f"{r['samples_per_rank']} samples/rank, ~{r['response_tokens']:.0f} tokens each, asr reward on a "
              f"tiny Whisper): {r['step_s']:.2f}s; slowest rank per part: generation {r['generation_s']:.2f}s "
              f"({100 * r['split']['generation']:.0f}%) + reward {r['reward_s']:.2f}s "
              f"({100 * r['split']['reward']:.0f}%) + update {r['update_s']:.2f}s ({100 * r['split']['update']:.0f}%)")
        print(f"rollout of {g['answers_per_rank']} answers/rank ({g['tokens_per_rank']} tokens): gathered once "
              f"{g['gathered_once_s']:.2f}s (sync {g['sync_s']:.2f}s) vs through the partitioned module "
              f"{g['partitioned_s']:.2f}s: speedup {g['gather_once_speedup']:.1f}x "
              f"(identical answers: {g['identical_answers']})")
    return result


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), *(int(a) for a in sys.argv[2:6]))

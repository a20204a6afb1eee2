"""The alignment loop: one visible ``while`` over steps on the training engine (DPO or GRPO).

Every rank runs :class:`AlignTrainer`.  What it reuses from training, unchanged: the process group
and DeepSpeed engine (:func:`anygpt.train.engine.init_runtime`, :func:`~anygpt.train.engine.build_engine`:
ZeRO-3 by default, bf16 on GPU / fp32 on CPU, AdamW, warmup + cosine, optional LoRA), complete-only
checkpoints with RNG state and exact resume (:class:`anygpt.train.checkpoint.CheckpointManager`), the
run's tokenizer and layout read back (:func:`anygpt.train.preflight.run_tokenizer`), ``metrics.jsonl``
/ TensorBoard (:class:`anygpt.train.metrics.RunLogger`) and fault injection for the kill tests
(:mod:`anygpt.train.faults`).  Checkpoints hold what export needs, so ``anygpt export --checkpoint
RUN_DIR`` works on an alignment run as on a training one.

Why every rank runs the same number of forward/backward passes: ZeRO-3 all-gathers parameters inside
each forward and reduce-scatters gradients inside each backward, so a rank that ran one pass fewer
would leave the others waiting forever.  Each rank therefore handles a fixed number of sequences per
step (``align.prompts_per_step`` x ``align.group_size`` for GRPO, x 2 for DPO) in fixed micro-batches;
a group whose reward failed still runs, with zero weight.  Generation has no such constraint: it runs
on an unpartitioned replica (:class:`~anygpt.align.rollout.GenerationPolicy`) after one gather.

Reference policy (DPO, and GRPO with ``align.grpo.kl_beta > 0``): with LoRA, the base model with the
adapters disabled (no extra memory); otherwise a frozen copy of the starting model on every rank.
Its log-probabilities are computed (no grad) before the update.

Determinism: a step's prompts follow from ``(run.seed, step, rank)`` and its sampling seed too, so a
resumed run (RNG, engine and SpeechAlign round cache restored from the checkpoint) repeats the
uninterrupted run's steps exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anygpt.align.config import AlignConfig
from anygpt.align.losses import dpo_loss, group_advantages, grpo_loss, sequence_logprobs, token_weights
from anygpt.align.rewards import RewardContext, Sample, build_rewards, check_rewards
from anygpt.align.rollout import (GenerationPolicy, PreferencePair, Prompt, first_span, generated_response,
                                  load_pairs, load_prompts, make_batch, response_ids, token_logprobs)
from anygpt.config import ConfigError, save_config, to_dict
from anygpt.train.checkpoint import run_files
from anygpt.formats import Media, SequenceFormat
from anygpt.infer.settings import GenerationConfig, apply_setting_overrides
from anygpt.infer.tasks import Task, task_config

__all__ = ["AlignTrainer", "align", "preflight", "AlignPlan"]


@dataclass
class AlignPlan:
    ds_config: dict
    source: Any  # engine.ModelSource
    resume_from: Path | None
    world_size: int
    cuda: bool


def _engine_cfg(cfg: AlignConfig) -> AlignConfig:
    """The config the engine builder sees: its schedule spans every optimizer update of the run."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_steps=cfg.run.max_steps * cfg.updates_per_step))


def preflight(cfg: AlignConfig, world_size: int, resume: str | None = None, cuda: bool | None = None) -> AlignPlan:
    """Everything checkable before any rank starts: DeepSpeed JSON, model, resume point, tokenizer and
    layout, prompt/pair files, every reward's options (a missing ASR directory is one line here)."""
    from anygpt.train.dsconfig import resolve_ds_config
    from anygpt.train.engine import check_lora_targets, resolve_model_source
    from anygpt.train.preflight import resolve_resume, run_tokenizer

    if cuda is None:
        cuda = torch.cuda.is_available()
    ds = resolve_ds_config(cfg, world_size, cuda)
    source = resolve_model_source(cfg)
    check_lora_targets(cfg, source)
    if cfg.model.codecs is not None and cfg.model.codecs != "tiny" and not Path(cfg.model.codecs).is_dir():
        raise ConfigError(f"model.codecs: {cfg.model.codecs} is not a directory")
    ckpt = resolve_resume(cfg, resume, world_size)
    _, layout = run_tokenizer(cfg, source, ckpt) if cfg.model.codecs != "tiny" else _tokenizer_only(cfg, source, ckpt)
    a = cfg.align
    if a.dpo.pairs and not Path(a.dpo.pairs).is_file():
        raise ConfigError(f"align.dpo.pairs: {a.dpo.pairs} not found")
    if a.prompts.file and not Path(a.prompts.file).is_file():
        raise ConfigError(f"align.prompts.file: {a.prompts.file} not found")
    if a.prompts.shards:
        from anygpt.data.shards import ShardError, expand_shards

        try:
            expand_shards(list(a.prompts.shards))
        except ShardError as e:
            raise ConfigError(f"align.prompts.shards: {e}") from None
    try:
        apply_setting_overrides(GenerationConfig().modes, a.sampling)
    except ValueError as e:
        raise ConfigError(f"align.sampling: {e}") from None
    check_rewards(a.rewards, RewardContext(layout, Path(cfg.model.name), cfg.model.codecs))
    return AlignPlan(ds, source, ckpt, world_size, cuda)


def _tokenizer_only(cfg: AlignConfig, source: Any, ckpt: Path | None) -> tuple[Any, Any]:
    """``model.codecs: tiny`` (tests): the tokenizer and layout without a codecs directory's cards."""
    from anygpt.train.preflight import run_tokenizer

    return run_tokenizer(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, codecs=None)), source, ckpt)


class AlignTrainer:
    """Build everything from a validated :class:`AlignConfig`, then :meth:`fit`."""

    def __init__(self, cfg: AlignConfig, resume: str | None = None):
        self.cfg, self.resume = cfg, resume
        self.step = 0
        self.round_cache: dict[str, Any] = {}
        self.interval: list[dict] = []
        self.last_row: dict = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> "AlignTrainer":
        from anygpt.infer.mediaio import MediaIO
        from anygpt.train.checkpoint import CheckpointManager
        from anygpt.train.dsconfig import resolve_precision
        from anygpt.train.engine import DTYPES, barrier, build_engine, init_runtime, world_from_env
        from anygpt.train.faults import Faults
        from anygpt.train.metrics import RunLogger

        cfg, a = self.cfg, self.cfg.align
        self.plan = plan = preflight(cfg, world_from_env()[1], self.resume, torch.cuda.is_available())
        self.rt = rt = init_runtime()
        self.faults = Faults.from_env(rt.rank)
        self.run_dir = Path(cfg.run.dir)
        self.t_start = time.time()
        from anygpt.train.preflight import run_tokenizer

        self.tokenizer, self.layout = (run_tokenizer(cfg, plan.source, plan.resume_from) if cfg.model.codecs != "tiny"
                                       else _tokenizer_only(cfg, plan.source, plan.resume_from))
        self.fmt = SequenceFormat(self.tokenizer, self.layout)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.precision = resolve_precision(cfg, rt.cuda)
        dtype = DTYPES[self.precision]
        lora = cfg.model.lora if cfg.model.lora.enabled else None
        # Before the engine: under an active ZeRO-3 config transformers would partition these too.
        self.policy = GenerationPolicy(cfg.model.name, self.tokenizer, self.layout, rt.device, dtype, lora)
        self.reference = None
        if self.needs_reference and lora is None:
            from transformers import AutoModelForCausalLM

            self.reference = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=dtype, local_files_only=True)
            self.reference = self.reference.to(rt.device).eval().requires_grad_(False)
        media = None
        if cfg.model.codecs:
            media = MediaIO(self.layout, cfg.model.codecs if cfg.model.codecs == "tiny" else Path(cfg.model.codecs),
                            None, rt.device)
        # Every rank reads the same prompts or pairs; only the first names what it skipped (one line
        # per bad item, not one per rank).  Errors still stop every rank.
        quiet = contextlib.nullcontext() if rt.is_main else contextlib.redirect_stderr(io.StringIO())
        with quiet:
            if a.method == "dpo" and a.dpo.pairs:
                self.pairs = load_pairs(a.dpo.pairs, self.fmt, self.layout, media)
                self.prompts: list[Prompt] = []
            else:
                self.pairs = []
                self.prompts = load_prompts(a.prompts, self.fmt, self.layout, cfg.run.seed)
            if a.method == "dpo" and not self.cfg.ranked_pairs:
                self.prompts = [p for p in self.prompts if p.gold is not None]
        # What the silenced ranks skipped must not differ unseen (node-local copies of the files):
        # ranks drawing from pools of different sizes would also train on different items.
        sizes = self._gather(len(self.pairs) or len(self.prompts))
        if len(set(sizes)) > 1:
            raise ConfigError(f"align: the ranks read different {'pairs' if self.pairs else 'prompts'} (counts by "
                              f"rank: {sizes}); give every node the same files")
        self.reward = None
        if a.method == "grpo" or self.cfg.ranked_pairs:
            context = RewardContext(self.layout, Path(cfg.model.name), cfg.model.codecs, rt.device, cfg.run.seed)
            self.reward = build_rewards(a.rewards, a.guards, context)
            self.reward.check_modalities(sorted({p.modality for p in self.prompts}))
        # Last: while the engine's ZeRO-3 config is alive, transformers would build every model (the
        # rewards' codecs and ASR models, the replica, the reference) partitioned, so they come first.
        self.bundle = build_engine(_engine_cfg(cfg), plan.source, self.tokenizer, self.layout, plan.ds_config, rt)
        self.engine = self.bundle.engine
        self.sampling = GenerationConfig(max_new_tokens=a.max_new_tokens)
        self.sampling.modes = apply_setting_overrides(self.sampling.modes, a.sampling)
        self.ckpts = CheckpointManager(self.run_dir, cfg.run.keep_last, rt.rank, rt.world_size, barrier)
        if plan.resume_from is not None:
            meta, state = self.ckpts.load(self.engine, plan.resume_from)
            self.step = int(meta["step"])
            self.round_cache = state.get("round_cache") or {}
            if "answers" in self.round_cache:  # written before align.dpo.chosen: rejected answers only
                self.round_cache = {"round": self.round_cache["round"],
                                    "steps": {s: {"rejected": x} for s, x in self.round_cache["answers"].items()}}
        else:
            seed = cfg.run.seed + 1000 * rt.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        self.logger = RunLogger(self.run_dir, rt.is_main, start_step=self.step, resumed=plan.resume_from is not None,
                                tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
                                wandb_project=cfg.run.wandb_project, config=to_dict(cfg), say=self.say)
        self.say(self.describe())
        return self

    @property
    def needs_reference(self) -> bool:
        a = self.cfg.align
        return a.method == "dpo" or a.grpo.kl_beta > 0

    def describe(self) -> str:
        from anygpt.train.dsconfig import zero_stage

        cfg, rt, b, a = self.cfg, self.rt, self.bundle, self.cfg.align
        pool = f"{len(self.pairs)} pairs" if self.pairs else f"{len(self.prompts)} prompts"
        rewards = "+".join(f"{r.weight:g}*{r.name}" for r in a.rewards)
        if a.method == "grpo":
            what = f"GRPO, {a.prompts_per_step} prompts x {a.group_size} samples per rank, rewards {rewards}"
        else:
            what = f"DPO (beta {a.dpo.beta}), {a.prompts_per_step} pairs per rank"
            if self.cfg.ranked_pairs:
                what += f", best vs worst of {a.group_size} samples by rewards {rewards} in {a.dpo.rounds} round(s)"
            elif not self.pairs:
                what += f", SpeechAlign-style in {a.dpo.rounds} round(s)"
        ref = ("none" if not self.needs_reference else
               "base with adapters disabled" if cfg.model.lora.enabled else "frozen copy")
        where = f"resumed at step {self.step}" if self.plan.resume_from else "fresh start"
        return (f"anygpt align: {rt.world_size} rank(s) ({rt.backend}, {rt.device.type}, {self.precision}, "
                f"ZeRO-{zero_stage(self.plan.ds_config)}); model {cfg.model.name}: {b.total_params / 1e6:.2f}M params, "
                f"{b.trainable_params / 1e6:.2f}M trainable{' (LoRA)' if cfg.model.lora.enabled else ''}; {what}; "
                f"{pool}; reference {ref}; {where}; run dir {self.run_dir}")

    def say(self, line: str) -> None:
        if self.rt.is_main:
            print(line, flush=True)

    # ------------------------------------------------------------------ helpers
    def _items(self, pool_size: int, step: int) -> list[int]:
        """This rank's pool indices at ``step``: a seeded permutation per pass over the pool."""
        p, w, r = self.cfg.align.prompts_per_step, self.rt.world_size, self.rt.rank
        out = []
        for j in range(p):
            g = ((step - 1) * w + r) * p + j
            epoch, i = divmod(g, pool_size)
            key = (pool_size, epoch)
            if key not in self._perms:
                self._perms = {key: np.random.default_rng([self.cfg.run.seed, epoch]).permutation(pool_size)}
            out.append(int(self._perms[key][i]))
        return out

    def _seed(self, step: int) -> int:
        return (self.cfg.run.seed * 1_000_003 + step * 7919 + self.rt.rank * 104_729) % 2**62

    def _gen_configs(self, prompts: list[Prompt], seed: int) -> list[GenerationConfig]:
        base = dataclasses.replace(self.sampling, seed=seed)
        return [task_config(Task("text", p.modality, "<align>"), base) for p in prompts]

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.rt.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def _gather(self, obj: Any) -> list[Any]:
        if self.rt.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.rt.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def _micro_batches(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> list[list[int]]:
        mb = self.cfg.optim.micro_batch_size
        return [list(range(s, min(s + mb, len(rows)))) for s in range(0, len(rows), mb)]

    def _reference_logprobs(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return token_logprobs(self.reference, self.reference, batch)[0]
            with self.engine.module.disable_adapter():  # LoRA: the base model is the reference
                return token_logprobs(self.engine, self.engine.module, batch)[0]

    def _rollout(self, prompts: list[Prompt], seed: int) -> tuple[list[Any], float]:
        """Gather the policy's parameters once, then generate every answer on the replica."""
        t0 = time.perf_counter()
        self.policy.sync(self.engine.module)
        results = self.policy.generate([p.ids for p in prompts], self._gen_configs(prompts, seed))
        return results, time.perf_counter() - t0

    def _update(self, n_updates: int, rows: list[tuple[np.ndarray, np.ndarray]], loss_of: Any) -> dict[str, float]:
        """``n_updates`` optimizer updates over ``rows`` in fixed micro-batches (same count on every rank).

        ``loss_of(micro_batch_index, batch, logp, token_rows, update) -> (loss, stats)`` gives the
        micro-batch's share of the step's loss (already normalised over the whole step and all ranks).
        """
        world = self.rt.world_size
        sums: Counter = Counter()
        self.engine.train()
        for u in range(n_updates):
            for k, idx in enumerate(self._micro_batches(rows)):
                batch = make_batch([rows[i] for i in idx], self.pad_id, self.rt.device)
                logp, token_rows = token_logprobs(self.engine, self.engine.module, batch)
                loss, stats = loss_of(k, batch, logp, token_rows, u)
                # DeepSpeed averages gradients over ranks; the loss is already a sum over ranks' shares.
                self.engine.backward(loss * world, scale_wrt_gas=False)
                self.engine.step()
                if u == 0:
                    sums["loss"] += float(loss.detach())
                    for key, v in stats.items():
                        sums[key] += float(v)
        return dict(sums)

    # ------------------------------------------------------------------ GRPO
    def grpo_step(self, step: int) -> dict[str, Any]:
        a, g = self.cfg.align, self.cfg.align.group_size
        t_step, lr = time.perf_counter(), float(self.engine.get_lr()[0])
        picked = [self.prompts[i] for i in self._items(len(self.prompts), step)]
        rows_prompts = [p for p in picked for _ in range(g)]
        results, t_gen = self._rollout(rows_prompts, self._seed(step))
        t0 = time.perf_counter()
        samples = [Sample(p.modality, p.text, first_span(r, p.modality), r.stop, len(r.issues))
                   for p, r in zip(rows_prompts, results)]
        scored = self.reward(samples)
        t_reward = time.perf_counter() - t0
        t0 = time.perf_counter()
        rewards = torch.tensor([s["reward"] for s in scored], dtype=torch.float64).view(len(picked), g)
        failed = ~torch.isfinite(rewards)
        skipped = failed.any(dim=1)  # a group with a failed reward teaches nothing reliable: skipped
        adv = group_advantages(torch.where(failed, torch.zeros_like(rewards), rewards), a.grpo.scale_rewards)
        adv[skipped] = 0.0
        responses = [generated_response(r, self.layout) for r in results]
        lengths = [len(x) for x in responses]
        live = (~skipped).repeat_interleave(g).tolist()
        totals = self._all_reduce(torch.tensor([sum(l for l, ok in zip(lengths, live) if ok), sum(live)],
                                               dtype=torch.float64, device=self.rt.device)).tolist()
        weights = token_weights(lengths, a.grpo.normalisation, int(totals[0]), int(totals[1]))
        weights = [w if ok else 0.0 for w, ok in zip(weights, live)]
        rows = [(p.ids, x) for p, x in zip(rows_prompts, responses)]
        seq_adv = adv.reshape(-1).tolist()
        batches = self._micro_batches(rows)
        needs_old = a.updates_per_rollout > 1
        old, ref = {}, {}
        if needs_old or a.grpo.kl_beta > 0:
            self.engine.eval()
            for k, idx in enumerate(batches):
                batch = make_batch([rows[i] for i in idx], self.pad_id, self.rt.device)
                if needs_old:
                    with torch.no_grad():
                        old[k] = token_logprobs(self.engine, self.engine.module, batch)[0]
                if a.grpo.kl_beta > 0:
                    ref[k] = self._reference_logprobs(batch)

        def loss_of(k, batch, logp, token_rows, update):
            idx = batches[k]
            per_tok_adv = torch.tensor([seq_adv[idx[r]] for r in token_rows.tolist()], dtype=logp.dtype,
                                       device=logp.device)
            per_tok_w = torch.tensor([weights[idx[r]] for r in token_rows.tolist()], dtype=logp.dtype,
                                     device=logp.device)
            old_logp = old[k] if needs_old else logp.detach()
            return grpo_loss(logp, old_logp, per_tok_adv, per_tok_w, a.grpo.clip_eps, a.grpo.kl_beta, ref.get(k))

        sums = self._update(a.updates_per_rollout, rows, loss_of)
        t_update = time.perf_counter() - t0
        local = {"rewards": [float(s["reward"]) for s in scored], "parts": [s["parts"] for s in scored],
                 "guards": [s["guard"] for s in scored], "skipped_groups": int(skipped.sum()),
                 "failed": int(failed.sum()), "lengths": lengths, "sums": sums,
                 "time_generation": t_gen, "time_reward": t_reward, "time_update": t_update,
                 "time_step": time.perf_counter() - t_step}
        return self._row(step, local, lr)

    # ------------------------------------------------------------------ DPO
    def _round_of(self, step: int) -> tuple[int, int, int]:
        """(round, its first step, its last step) of SpeechAlign-style DPO."""
        per = math.ceil(self.cfg.run.max_steps / self.cfg.align.dpo.rounds)
        r = (step - 1) // per
        return r, r * per + 1, min((r + 1) * per, self.cfg.run.max_steps)

    def _round(self, step: int) -> tuple[dict[str, Any], float, float]:
        """This step's sampled answers: generated for the whole round at its first step by the current
        policy (kept in the checkpoint, so a resumed run trains on the same pairs).

        Returns ``(entry, generation seconds, reward seconds)`` (zero seconds on the round's later
        steps); ``entry["rejected"]`` holds one answer per prompt and, when ranked,
        ``entry["chosen"]``, ``entry["live"]`` (the prompt's samples differ in reward) and the scored
        samples (``rewards``, ``parts``, ``guards``) for the metrics."""
        r, first, last = self._round_of(step)
        if self.round_cache.get("round") == r:
            return self.round_cache["steps"][step], 0.0, 0.0
        a, ranked = self.cfg.align, self.cfg.ranked_pairs
        g = a.group_size if ranked else 1
        steps = list(range(first, last + 1))
        prompts = [self.prompts[i] for s in steps for i in self._items(len(self.prompts), s)]
        rows = [p for p in prompts for _ in range(g)]
        results, t_gen = self._rollout(rows, self._seed(first))
        answers = [generated_response(x, self.layout) for x in results]
        t0 = time.perf_counter()
        if ranked:
            scored = self.reward([Sample(p.modality, p.text, first_span(x, p.modality), x.stop, len(x.issues))
                                  for p, x in zip(rows, results)])
            rewards = np.array([s["reward"] for s in scored], dtype=np.float64).reshape(len(prompts), g)
        t_reward = time.perf_counter() - t0
        per, entries = a.prompts_per_step, {}
        for i, s in enumerate(steps):
            block = range(i * per, (i + 1) * per)  # this step's prompts
            if not ranked:
                entries[s] = {"rejected": [answers[j] for j in block]}
                continue
            entry: dict[str, Any] = {"chosen": [], "rejected": [], "live": [], "failed": 0}
            for j in block:
                r_j, first_row = rewards[j], j * g
                ok = bool(np.isfinite(r_j).all())
                entry["chosen"].append(answers[first_row + (int(np.argmax(r_j)) if ok else 0)])
                entry["rejected"].append(answers[first_row + (int(np.argmin(r_j)) if ok else 0)])
                entry["live"].append(ok and bool(r_j.max() > r_j.min()))  # equal rewards teach nothing
                entry["failed"] += int((~np.isfinite(r_j)).sum())
            group = scored[block[0] * g:(block[-1] + 1) * g]
            entry.update(rewards=[float(x["reward"]) for x in group], parts=[x["parts"] for x in group],
                         guards=[x["guard"] for x in group])
            entries[s] = entry
        self.round_cache = {"round": r, "steps": entries}
        what = (f"{g} answers per prompt ({len(answers)} per rank), ranked by the rewards," if ranked
                else f"{len(answers)} rejected answers per rank")
        self.say(f"round {r + 1}/{a.dpo.rounds}: sampled {what} with the current policy for steps {first}-{last} "
                 f"({t_gen:.1f}s)")
        return entries[step], t_gen, t_reward

    def dpo_step(self, step: int) -> dict[str, Any]:
        a = self.cfg.align
        t_step, lr = time.perf_counter(), float(self.engine.get_lr()[0])
        t_gen = t_reward = 0.0
        entry: dict[str, Any] = {}
        if self.pairs:
            pairs = [self.pairs[i] for i in self._items(len(self.pairs), step)]
        else:
            picked = [self.prompts[i] for i in self._items(len(self.prompts), step)]
            entry, t_gen, t_reward = self._round(step)
            chosen = (entry["chosen"] if "chosen" in entry else
                      [response_ids(self.fmt, [Media(p.modality, p.gold)]) for p in picked])
            pairs = [PreferencePair(p.ids, c, rj, p.key) for p, c, rj in zip(picked, chosen, entry["rejected"])]
        live = entry.get("live", [True] * len(pairs))
        t0 = time.perf_counter()
        rows = [(p.prompt, x) for p in pairs for x in (p.chosen, p.rejected)]
        batches = self._micro_batches(rows)
        self.engine.eval()
        ref = {k: self._reference_logprobs(make_batch([rows[i] for i in idx], self.pad_id, self.rt.device))
               for k, idx in enumerate(batches)}
        # Every pair runs (same passes on every rank); a skipped one has weight 0, and the loss is the
        # mean over the live pairs of all ranks.
        n_live = max(int(self._all_reduce(torch.tensor(float(sum(live)), dtype=torch.float64,
                                                       device=self.rt.device)).item()), 1)
        pair_w = torch.tensor([1.0 if ok else 0.0 for ok in live], dtype=torch.float64)

        def loss_of(k, batch, logp, token_rows, update):
            n = len(batches[k])
            pi = sequence_logprobs(logp, token_rows, n)
            rf = sequence_logprobs(ref[k], token_rows, n)
            counts = torch.bincount(token_rows, minlength=n)
            losses, st = dpo_loss(pi[0::2], pi[1::2], rf[0::2], rf[1::2], a.dpo.beta, a.dpo.label_smoothing,
                                  a.dpo.sft_weight, counts[0::2])
            w = pair_w[[i // 2 for i in batches[k][0::2]]].to(losses.dtype).to(losses.device)
            stats = {key: (v * w).sum() / n_live for key, v in st.items()}
            return (losses * w).sum() / n_live, stats

        sums = self._update(1, rows, loss_of)
        local = {"sums": sums, "lengths": [len(x) for _, x in rows], "time_generation": t_gen, "time_reward": t_reward,
                 "time_update": time.perf_counter() - t0, "time_step": time.perf_counter() - t_step}
        if "rewards" in entry:
            local.update({k: entry[k] for k in ("rewards", "parts", "guards", "failed")},
                         skipped_groups=len(live) - sum(live))
        return self._row(step, local, lr)

    # ------------------------------------------------------------------ metrics
    def _row(self, step: int, local: dict[str, Any], lr: float) -> dict[str, Any]:
        """One step's metrics over all ranks (every rank calls; rank 0 keeps the result); ``lr``: the
        rate the step's updates started with."""
        parts = self._gather(local)
        grad_norm = self.engine.get_global_grad_norm()
        sums: Counter = Counter()
        for p in parts:
            sums.update(p["sums"])
        row: dict[str, Any] = {"step": step, "loss": sums.pop("loss", 0.0), "lr": lr,
                               "grad_norm": float(grad_norm) if grad_norm is not None else None,
                               "applied": bool(self.engine.was_step_applied())}
        row.update({k: v for k, v in sums.items()})  # kl, clipped, ratio (GRPO); dpo stats
        if "clipped" in row:
            row["clip_fraction"] = row.pop("clipped")
        lengths = [l for p in parts for l in p["lengths"]]
        row["response_tokens"] = float(np.mean(lengths)) if lengths else 0.0
        if "rewards" in local:
            rewards = np.array([r for p in parts for r in p["rewards"]], dtype=np.float64)
            ok = np.isfinite(rewards)
            row["reward"] = float(rewards[ok].mean()) if ok.any() else None
            row["reward_std"] = float(rewards[ok].std()) if ok.any() else None
            names = sorted({k for p in parts for d in p["parts"] for k in d})
            row["reward_parts"] = {k: float(np.nanmean([d[k] for p in parts for d in p["parts"] if k in d]))
                                   for k in names}
            guards = Counter(g for p in parts for g in p["guards"] if g)
            row["guard_failures"] = dict(guards)
            row["guard_rate"] = sum(guards.values()) / max(len(rewards), 1)
            row["skipped_groups"] = sum(p["skipped_groups"] for p in parts)
            row["reward_failures"] = sum(p["failed"] for p in parts)
            row["samples"] = int(len(rewards))
        for key in ("time_generation", "time_reward", "time_update", "time_step"):
            row[key] = max(p[key] for p in parts)  # the slowest rank sets the pace
        row["elapsed_s"] = time.time() - self.t_start
        return row

    def log(self) -> None:
        """Average the interval's steps into one ``metrics.jsonl`` row and one log line (rank 0)."""
        rows, self.interval = self.interval, []
        if not rows or not self.rt.is_main:
            return
        row = dict(rows[-1])
        for key, v in rows[-1].items():
            if key in ("step", "lr", "applied", "elapsed_s") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            row[key] = float(np.mean(vals)) if key not in ("skipped_groups", "reward_failures", "samples") else sum(vals)
        if "reward_parts" in row:
            row["reward_parts"] = {k: float(np.mean([r["reward_parts"][k] for r in rows if k in r["reward_parts"]]))
                                   for k in rows[-1]["reward_parts"]}
            guards: Counter = Counter()
            for r in rows:
                guards.update(r["guard_failures"])
            row["guard_failures"] = dict(guards)
        self.logger.log_train(row)
        self.last_row = row
        if "reward" in row:
            parts = " ".join(f"{k} {v:.3f}" for k, v in row["reward_parts"].items() if "/" not in k)
            extra = (f"reward {row['reward']:.4f} ({parts}) | kl {row.get('kl', 0):.4f} | "
                     f"guards {row['guard_rate']:.2f} | skipped groups {row['skipped_groups']}")
        else:
            extra = f"accuracy {row.get('accuracy', 0):.3f} | margin {row.get('margin', 0):.3f}"
        self.say(f"step {row['step']}/{self.cfg.run.max_steps} | loss {row['loss']:.4f} | {extra} | "
                 f"lr {row['lr']:.2e} | gen {row['time_generation']:.1f}s reward {row['time_reward']:.1f}s "
                 f"update {row['time_update']:.1f}s")

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        from anygpt.train.dsconfig import zero_stage

        lora = self.cfg.model.lora
        return {"precision": self.precision, "zero_stage": zero_stage(self.plan.ds_config),
                "lora": to_dict(lora) if lora.enabled else None, "model": self.cfg.model.name,
                "codecs": self.cfg.model.codecs if self.cfg.model.codecs != "tiny" else None,
                "max_steps": self.cfg.run.max_steps, "method": self.cfg.align.method, "tokens": 0,
                "nonfinite_streak": 0, "skipped_steps": 0}

    def save(self) -> Path:
        static = run_files(self.cfg, self.layout, self.tokenizer, self.bundle.model)
        ckpt = self.ckpts.save(self.engine, self.step, {"round_cache": self.round_cache}, self.trainer_state(), static,
                               fault=self.faults)
        self.say(f"saved checkpoint {ckpt}")
        self.plot()
        return ckpt

    def plot(self) -> None:
        if not self.rt.is_main:
            return
        from anygpt.align.plot import plot_alignment

        try:
            plot_alignment(self.run_dir)
        except Exception as e:  # a plot must never stop a run
            self.say(f"warning: reward plot failed: {(str(e).splitlines() or [type(e).__name__])[0]}")

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict:
        """Align to ``run.max_steps``; returns a summary (last metrics row, checkpoint)."""
        from anygpt.train.checkpoint import latest_checkpoint

        cfg = self.cfg.run
        ckpt = None
        step_fn = self.grpo_step if self.cfg.align.method == "grpo" else self.dpo_step
        try:
            while self.step < cfg.max_steps:
                row = step_fn(self.step + 1)
                self.step = row["step"]
                self.interval.append(row)
                final = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or final:
                    self.log()
                if self.step % cfg.save_every == 0 or final:
                    ckpt = self.save()
                self.faults.maybe("kill_after_step", self.step)
            self.plot()
        finally:
            self.logger.close()
        ckpt = ckpt or latest_checkpoint(self.ckpts.root)
        self.say(f"done: step {self.step}; checkpoint {ckpt}; metrics {self.run_dir / 'metrics.jsonl'}; reward curve "
                 f"{self.run_dir / 'reward.png'}; export: anygpt export --checkpoint {self.run_dir} --out DIR")
        return {"run_dir": str(self.run_dir), "step": self.step, "checkpoint": str(ckpt), "last": self.last_row}


def align(cfg: AlignConfig, resume: str | None = None) -> dict:
    """Run a whole alignment (every rank calls this); see :class:`AlignTrainer`."""
    return AlignTrainer(cfg, resume).setup().fit()

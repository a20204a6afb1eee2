"""The training loop: one visible ``while`` over optimizer steps, with eval, checkpoints and logging.

Every rank runs :class:`Trainer`; rank 0 alone prints, writes metrics and run-level files.  A step
is ``optim.grad_accum`` micro-batches through ``engine.backward``/``engine.step``; DeepSpeed applies
the update on the last one (clipping at ``optim.grad_clip``, the warmup+cosine schedule advancing only
when an update is applied).

Non-finite loss: the micro-batch's loss is made NaN on purpose before ``backward``, so the gradient
norm is NaN on every rank and DeepSpeed's ZeRO optimizer drops the whole update (and the schedule
does not advance): the step is skipped everywhere at once without extra synchronisation.  The step's
sample keys are gathered and logged; ``run.max_nonfinite`` skipped steps in a row stop the run.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anygpt.attention import LOADER_ATTENTION, attention_inputs
from anygpt.config import TrainConfig, save_config, to_dict
from anygpt.data.examples import task_names
from anygpt.eval.loss import heldout_loss
from anygpt.train.checkpoint import run_files
from anygpt.train.losses import lm_loss


class TrainingStopped(ValueError):
    """The run cannot go on (non-finite streak); the message says why and what to do."""


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Trainer:
    """Build everything from a validated config, then :meth:`fit`.

    Args:
        cfg: the validated :class:`~anygpt.config.TrainConfig`.
        resume: ``None`` (fresh; refuses a run dir that already holds checkpoints), ``"auto"`` (newest
            complete checkpoint of ``run.dir`` if there is one) or a run/checkpoint directory.
    """

    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.resume = resume
        self.step = 0
        self.tokens = 0
        self.streak = 0
        self.skipped = 0
        self.last_row: dict = {}
        self.last_eval: dict = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        from anygpt.data import build_eval_loader, build_train_loader
        from anygpt.train.checkpoint import CheckpointManager
        from anygpt.train.engine import barrier, build_engine, init_runtime, world_from_env
        from anygpt.train.faults import Faults
        from anygpt.train.losses import TokenLoss
        from anygpt.train.metrics import Progress, RunLogger
        from anygpt.train.preflight import preflight, run_tokenizer

        cfg = self.cfg
        # Checks first: a bad config fails on every rank before a process group or model exists.
        self.plan = plan = preflight(cfg, world_from_env()[1], self.resume, torch.cuda.is_available())
        self.rt = rt = init_runtime()
        self.faults = Faults.from_env(rt.rank)
        self.run_dir = Path(cfg.run.dir)
        self.progress = Progress(rt.is_main, cfg.run.max_steps, 0, show_bar=False)  # until the real one
        self.tokenizer, self.layout = run_tokenizer(cfg, plan.source, plan.resume_from)
        if rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.attention = plan.attention
        self.bundle = build_engine(cfg, plan.source, self.tokenizer, self.layout, plan.ds_config, rt, plan.attention)
        self.engine = self.bundle.engine
        # Only mask4d needs the L x L mask; the other paths get segment ids and build what they need.
        mode = LOADER_ATTENTION[plan.attention]
        self.loader = build_train_loader(cfg, self.tokenizer, self.layout, rt.rank, rt.world_size, attention=mode)
        self.eval_loader = (build_eval_loader(cfg, self.tokenizer, self.layout, rt.rank, rt.world_size,
                                              attention=mode) if cfg.data.eval_shards else None)
        self.loss_fn = TokenLoss(self.layout, task_names(), rt.device)
        self.ckpts = CheckpointManager(self.run_dir, cfg.run.keep_last, rt.rank, rt.world_size, barrier)
        if plan.resume_from is not None:
            meta, loader_state = self.ckpts.load(self.engine, plan.resume_from)
            self.loader.load_state_dict(loader_state)
            self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
            self.streak, self.skipped = int(meta["nonfinite_streak"]), int(meta["skipped_steps"])
        else:
            seed = cfg.run.seed + 1000 * rt.rank  # distinct dropout streams per rank, reproducible
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        self.logger = RunLogger(self.run_dir, rt.is_main, start_step=self.step, resumed=plan.resume_from is not None,
                                tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
                                wandb_project=cfg.run.wandb_project, config=to_dict(cfg), say=self.say)
        # The bar redraws in place on a terminal; in a log file (SLURM, CI) the log lines carry tok/s and ETA.
        self.progress = Progress(rt.is_main, cfg.run.max_steps, self.step,
                                 show_bar=cfg.run.progress and sys.stderr.isatty())
        self._reset_interval()
        self.say(self.describe())
        return self

    def describe(self) -> str:
        cfg, rt, b = self.cfg, self.rt, self.bundle
        o = cfg.optim
        from anygpt.train.dsconfig import resolve_precision, zero_stage

        where = (f"resumed from {self.plan.resume_from} at step {self.step}" if self.plan.resume_from
                 else "fresh start")
        return (f"anygpt train: {rt.world_size} rank(s) ({rt.backend}, {rt.device.type}, "
                f"{resolve_precision(cfg, rt.cuda)}, ZeRO-{zero_stage(self.plan.ds_config)}, attention "
                f"{self.attention}); model {cfg.model.name}: "
                f"{b.total_params / 1e6:.2f}M params, {b.trainable_params / 1e6:.2f}M trainable"
                f"{' (LoRA)' if cfg.model.lora.enabled else ''}; vocab {self.layout.total}; global batch "
                f"{o.micro_batch_size}x{o.grad_accum}x{rt.world_size} rows of {cfg.data.seq_len}; {where}; "
                f"run dir {self.run_dir}")

    def say(self, line: str) -> None:
        """A rank-0 log line (kept above the progress bar)."""
        self.progress.write(line)

    # ------------------------------------------------------------------ steps
    def _inputs(self, batch: dict) -> dict[str, Any]:
        return attention_inputs(batch, self.attention, self.rt.device)

    @staticmethod
    def _input_tokens(batch: dict) -> int:
        if batch.get("segment_ids") is not None:
            return int((batch["segment_ids"] > 0).sum())
        return int(batch["input_ids"].numel())

    def _reset_interval(self) -> None:
        self.iv_stats = self.loss_fn.zeros()
        self.iv_loss = self.iv_count = self.iv_tokens = 0.0
        self.iv_time = 0.0
        self.iv_steps = 0
        self.iv_lr = None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.rt.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def _forward_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Forward one micro-batch with the LM head only at target positions; (loss, stats, bad rows)."""
        return lm_loss(self.engine, self.engine.module, self._inputs(batch), batch, self.loss_fn)

    def train_step(self) -> dict:
        """One optimizer step (``grad_accum`` micro-batches); returns the global step stats."""
        engine, step_no = self.engine, self.step + 1
        lr = float(engine.get_lr()[0])
        t0 = time.perf_counter()
        # loss sum, loss tokens, input tokens, non-finite micro-batches (summed over ranks below)
        local = torch.zeros(4, dtype=torch.float64, device=self.rt.device)
        step_stats = self.loss_fn.zeros()
        bad_keys: list[str] = []
        for _ in range(self.cfg.optim.grad_accum):
            batch = next(self.loader)
            loss, stats, bad_rows = self._forward_loss(batch)
            if self.faults.active("nan_loss", step_no):
                loss, bad_rows = loss * float("nan"), list(range(batch["input_ids"].shape[0]))
            if torch.isfinite(loss):
                step_stats += stats
            else:
                local[3] += 1
                bad_keys += [k for i in (bad_rows or range(len(batch["keys"]))) for k in batch["keys"][i]]
                loss = loss * float("nan")  # NaN gradients on every rank -> ZeRO skips the update
            local[2] += self._input_tokens(batch)
            engine.backward(loss)
            engine.step()
        m = len(self.loss_fn.modalities)
        local[0] += step_stats[0, :m].sum()
        local[1] += step_stats[1, :m].sum()
        self._all_reduce(local)
        self.step = step_no
        dt = time.perf_counter() - t0
        loss_sum, loss_count, tokens, nonfinite = local.tolist()
        self.tokens += int(tokens)
        applied = engine.was_step_applied()
        result = {"step": step_no, "lr": lr, "tokens": int(tokens), "time": dt,
                  "loss": loss_sum / max(loss_count, 1.0), "applied": applied}
        if nonfinite > 0 or not applied:
            if nonfinite > 0 and applied:
                raise RuntimeError("DeepSpeed applied an update with a non-finite loss (ZeRO stage without skip?)")
            self._skip(step_no, bad_keys, "non-finite loss" if nonfinite > 0 else "non-finite gradient norm")
            result["loss"] = float("nan")
            return result
        self.streak = 0
        self.iv_stats += step_stats
        self.iv_loss += loss_sum
        self.iv_count += loss_count
        self.iv_tokens += tokens
        self.iv_time += dt
        self.iv_steps += 1
        self.iv_lr = lr  # the rate this step's update used
        return result

    def _skip(self, step_no: int, bad_keys: list[str], reason: str) -> None:
        gathered: list = [None] * self.rt.world_size
        if self.rt.world_size > 1:
            torch.distributed.all_gather_object(gathered, bad_keys)
        else:
            gathered = [bad_keys]
        keys = [k for part in gathered for k in (part or [])]
        self.streak += 1
        self.skipped += 1
        shown = ", ".join(keys[:20]) + (f" (+{len(keys) - 20} more)" if len(keys) > 20 else "")
        self.say(f"step {step_no}: {reason}; update skipped ({self.streak} in a row); samples: {shown or '?'}")
        self.logger.log_train({"step": step_no, "loss": None, "skipped": True, "reason": reason,
                               "nonfinite_keys": keys, "skipped_steps": self.skipped})
        if self.streak >= self.cfg.run.max_nonfinite:
            last = self.ckpts.root / "latest"
            hint = f"; last complete checkpoint: {self.ckpts.root / last.read_text().strip()}" if last.is_file() else ""
            raise TrainingStopped(
                f"stopped at step {step_no}: {self.streak} steps in a row had a non-finite loss "
                f"(run.max_nonfinite={self.cfg.run.max_nonfinite}); last samples: {shown or '?'}; "
                f"lower optim.lr or inspect those samples{hint}")

    def log_interval(self) -> dict:
        """All-reduce the interval's breakdown, write one metrics row and one log line (rank 0)."""
        stats = self._all_reduce(self.iv_stats.clone())
        by_mod, by_task = self.loss_fn.summarize(stats)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        tps = self.iv_tokens / self.iv_time if self.iv_time > 0 else 0.0
        row = {"step": self.step, "loss": self.iv_loss / max(self.iv_count, 1.0),
               "lr": self.iv_lr,
               "grad_norm": grad_norm, "tokens_per_s": tps, "tokens": self.tokens,
               "loss_tokens": int(self.iv_count), "loss_by_modality": by_mod, "loss_by_task": by_task,
               "skipped_steps": self.skipped, "elapsed_s": time.time() - self.t_start}
        self.logger.log_train(row)
        remaining = (self.cfg.run.max_steps - self.step) * (self.iv_time / max(self.iv_steps, 1))
        mods = " ".join(f"{k} {v:.3f}" for k, v in by_mod.items())
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "-"
        self.say(f"step {self.step}/{self.cfg.run.max_steps} | loss {row['loss']:.4f} | {mods} | "
                 f"lr {row['lr']:.3e} | grad norm {gn} | {tps:,.0f} tok/s | eta {_fmt_duration(remaining)}")
        self.last_row = row
        self._reset_interval()
        return row

    def evaluate(self) -> dict:
        """Loss on the held-out shards, overall and per modality and task (every rank takes part):
        :func:`~anygpt.eval.loss.heldout_loss`, the same numbers ``anygpt eval`` gives for the export."""
        result = heldout_loss(self.engine, self.eval_loader, self.layout, self.rt.device,
                              head_owner=self.engine.module, inputs=self._inputs,
                              max_batches=self.cfg.run.eval_max_batches, all_reduce=self._all_reduce)
        row = {"step": self.step, **result}
        self.logger.log_eval(row)
        tasks = " ".join(f"{k} {v:.3f}" for k, v in row["loss_by_task"].items())
        self.say(f"eval step {self.step} | loss {row['loss']:.4f} | {tasks}")
        self.last_eval = row
        return row

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        from anygpt.train.dsconfig import resolve_precision, zero_stage

        lora = self.cfg.model.lora
        return {"tokens": self.tokens, "nonfinite_streak": self.streak, "skipped_steps": self.skipped,
                "precision": resolve_precision(self.cfg, self.rt.cuda), "zero_stage": zero_stage(self.plan.ds_config),
                "lora": to_dict(lora) if lora.enabled else None, "model": self.cfg.model.name,
                "codecs": self.cfg.model.codecs, "max_steps": self.cfg.run.max_steps}

    def save(self) -> Path:
        static = run_files(self.cfg, self.layout, self.tokenizer, self.bundle.model)
        ckpt = self.ckpts.save(self.engine, self.step, self.loader.state_dict(), self.trainer_state(), static,
                               fault=self.faults)
        self.say(f"saved checkpoint {ckpt}")
        self.plot()
        return ckpt

    def plot(self) -> None:
        if not self.rt.is_main:
            return
        from anygpt.train.plot import plot_run

        try:
            plot_run(self.run_dir)
        except Exception as e:  # a plot must never stop training
            self.say(f"warning: loss plot failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict:
        """Train to ``run.max_steps``; returns a summary (last metrics row, last eval, checkpoint)."""
        cfg = self.cfg.run
        self.t_start = time.time()
        ckpt = None
        evaluated_at = self.step if self.step >= cfg.max_steps else -1  # a finished run resumed: nothing to do
        try:
            while self.step < cfg.max_steps:
                result = self.train_step()
                self.progress.update(1, loss=f"{result['loss']:.3f}",
                                     tok_s=f"{result['tokens'] / max(result['time'], 1e-9):,.0f}")
                final = self.step == cfg.max_steps
                if self.iv_steps and (self.step % cfg.log_every == 0 or final):
                    self.log_interval()
                if self.eval_loader is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                    evaluated_at = self.step
                if self.step % cfg.save_every == 0 or final:
                    ckpt = self.save()
                self.faults.maybe("kill_after_step", self.step)
            if self.eval_loader is not None and evaluated_at != self.step:
                self.evaluate()
            self.plot()
        finally:
            self.progress.close()
            self.logger.close()
            self.loader.close()
        from anygpt.train.checkpoint import latest_checkpoint

        ckpt = ckpt or latest_checkpoint(self.ckpts.root)
        self.say(f"done: step {self.step}, {self.tokens:,} tokens; checkpoint {ckpt}; metrics "
                 f"{self.run_dir / 'metrics.jsonl'}; loss curve {self.run_dir / 'loss.png'}")
        return {"run_dir": str(self.run_dir), "step": self.step, "tokens": self.tokens, "checkpoint": str(ckpt),
                "last": self.last_row, "eval": self.last_eval}


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Run a whole training (every rank calls this); see :class:`Trainer`."""
    return Trainer(cfg, resume).setup().fit()

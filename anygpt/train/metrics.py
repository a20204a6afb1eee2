"""Watching a run: ``metrics.jsonl`` / ``eval.jsonl``, TensorBoard, optional W&B, the progress bar.

Everything here is rank-0 only (the trainer builds a disabled logger on other ranks).

``RUN_DIR/metrics.jsonl``: one JSON object per logged training step::

    {"step": 20, "loss": 3.41, "lr": 0.00029, "grad_norm": 1.2, "tokens_per_s": 12345.0,
     "tokens": 409600, "loss_tokens": 40000, "loss_by_modality": {"text": 3.1, "image": 4.2},
     "loss_by_task": {"image2text": 3.0, "text2image": 4.3}, "skipped_steps": 0, "elapsed_s": 12.5}

``loss`` is the token-weighted mean over all ranks and the steps since the previous line.  A step
skipped for a non-finite loss adds ``{"step": N, "loss": null, "skipped": true, "nonfinite_keys": [...]}``.
``RUN_DIR/eval.jsonl``: ``{"step", "loss", "loss_by_modality", "loss_by_task", "tokens"}`` per evaluation.
On resume, lines after the resumed step (written by the interrupted run) are dropped, so the files
always describe one timeline.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
TB_DIR = "tb"


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN/Infinity
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def truncate_after(path: Path, step: int) -> None:
    """Keep only rows with ``step <= step`` (drops what an interrupted run logged past its checkpoint)."""
    if path.is_file():
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _flatten(row: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            out[f"{prefix}{k}"] = float(v)
    return out


class RunLogger:
    """Writes metrics rows to JSONL, TensorBoard and (when enabled and installed) W&B."""

    def __init__(self, run_dir: str | Path, enabled: bool, *, start_step: int = 0, resumed: bool = False,
                 tensorboard: bool = True, wandb: bool = False, wandb_project: str = "anygpt",
                 config: dict | None = None, say=print):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed:
            truncate_after(self.run_dir / METRICS, start_step)
            truncate_after(self.run_dir / EVAL, start_step)
        else:
            for name in (METRICS, EVAL):
                (self.run_dir / name).unlink(missing_ok=True)
        self.metrics = open(self.run_dir / METRICS, "a", encoding="utf-8")
        self.evals = open(self.run_dir / EVAL, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=start_step + 1 if resumed else None)
            except ImportError:
                say("warning: tensorboard is not installed; no event files (pip install tensorboard)")
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                say("warning: run.wandb is true but wandb is not installed; logging to JSONL/TensorBoard only")
            else:
                id_file = self.run_dir / "wandb_id"
                run_id = id_file.read_text().strip() if id_file.is_file() else wb.util.generate_id()
                id_file.write_text(run_id)
                self.wandb = wb.init(project=wandb_project, id=run_id, resume="allow", dir=str(self.run_dir),
                                     config=config, name=self.run_dir.name)

    def _write(self, fh, row: dict, prefix: str) -> None:
        if not self.enabled:
            return
        row = _finite(row)
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        scalars = _flatten(row)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=row["step"])

    def log_train(self, row: dict) -> None:
        self._write(getattr(self, "metrics", None), row, "train")

    def log_eval(self, row: dict) -> None:
        self._write(getattr(self, "evals", None), row, "eval")

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        self.evals.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """A tqdm bar over optimizer steps (rank 0) whose ``write`` keeps log lines above the bar."""

    def __init__(self, enabled: bool, total: int, initial: int, show_bar: bool = True):
        self.bar = None
        self.enabled = enabled
        if enabled and show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.1, desc="train")

    def update(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

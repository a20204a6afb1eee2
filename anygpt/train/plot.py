"""Loss curves of a run as a PNG (``anygpt plot RUN_DIR``; also written at every save and at the end)."""
from __future__ import annotations

from pathlib import Path

from anygpt.train.metrics import EVAL, METRICS, read_jsonl

PNG = "loss.png"


class PlotError(ValueError):
    pass


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train loss (total and per modality), eval losses per task, and the learning rate.

    Returns the PNG path (``RUN_DIR/loss.png`` unless ``out``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in read_jsonl(run_dir / METRICS) if r.get("loss") is not None]
    if not rows:
        raise PlotError(f"{run_dir}: no logged steps in {METRICS}")
    evals = [r for r in read_jsonl(run_dir / EVAL) if r.get("loss") is not None]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="train", color="black", linewidth=1.5)
    modalities = sorted({m for r in rows for m in r.get("loss_by_modality", {})})
    for m in modalities:
        pts = [(r["step"], r["loss_by_modality"][m]) for r in rows if m in r.get("loss_by_modality", {})]
        ax.plot(*zip(*pts), label=f"train {m} tokens", linewidth=0.8, alpha=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval", color="red")
        for task in sorted({t for r in evals for t in r.get("loss_by_task", {})}):
            pts = [(r["step"], r["loss_by_task"][task]) for r in evals if task in r.get("loss_by_task", {})]
            ax.plot(*zip(*pts), "x--", label=f"eval {task}", linewidth=0.8)
    skipped = [r["step"] for r in read_jsonl(run_dir / METRICS) if r.get("skipped")]
    for s in skipped:
        ax.axvline(s, color="orange", alpha=0.4, linewidth=0.8)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{run_dir.name}: {steps[-1]} steps" + (f", {len(skipped)} skipped" if skipped else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    lr = [(r["step"], r["lr"]) for r in rows if r.get("lr") is not None]
    if lr:
        ax_lr.plot(*zip(*lr), color="tab:blue")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run_dir / PNG
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

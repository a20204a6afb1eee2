"""The reward curve of an alignment run as a PNG (``RUN_DIR/reward.png``; written at every save and at the end)."""
from __future__ import annotations

from pathlib import Path

from anygpt.train.metrics import METRICS, read_jsonl

PNG = "reward.png"


def plot_alignment(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the reward (mean, +- one std over the step's samples) and its parts, and the loss and KL
    (GRPO) or the implicit-reward accuracy and margin (DPO).  Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in read_jsonl(run_dir / METRICS) if r.get("loss") is not None]
    if not rows:
        raise ValueError(f"{run_dir}: no logged steps in {METRICS}")
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    if any(r.get("reward") is not None for r in rows):
        pts = [(r["step"], r["reward"], r.get("reward_std") or 0.0) for r in rows if r.get("reward") is not None]
        s, m, sd = zip(*pts)
        top.plot(s, m, color="black", linewidth=1.5, label="reward")
        top.fill_between(s, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color="grey", alpha=0.2)
        for name in sorted({k for r in rows for k in r.get("reward_parts", {}) if "/" not in k}):
            part = [(r["step"], r["reward_parts"][name]) for r in rows if name in r.get("reward_parts", {})]
            top.plot(*zip(*part), linewidth=0.9, label=name)
        top.set_ylabel("reward")
    else:
        for key in ("accuracy", "margin"):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                top.plot(*zip(*pts), label=key)
        top.set_ylabel("DPO implicit reward")
    top.set_title(f"{run_dir.name}: {steps[-1]} steps")
    top.grid(alpha=0.3)
    top.legend(fontsize=7)
    bottom.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    if any(r.get("kl") for r in rows):
        ax = bottom.twinx()
        ax.plot(steps, [r.get("kl", 0.0) for r in rows], color="tab:red", linewidth=0.8, label="kl")
        ax.set_ylabel("kl")
    bottom.set_ylabel("loss")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run_dir / PNG
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

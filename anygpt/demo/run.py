"""``anygpt demo --out DIR``: the whole pipeline on an embedded default, on a laptop, in minutes.

Steps (each one is the real component a user runs on real data, at tiny size):

1. corpus      synthetic speech (espeak-ng), images (Pillow), music (NumPy), conversations; some
               attribute combinations held out of training entirely (:mod:`anygpt.demo.corpus`);
2. tokenizer   a tiny SentencePiece model trained on the corpus text, with the layout's tokens;
3. codecs      tiny codecs whose codebooks are fitted by k-means on the training media (``codec fit``);
4. shards      ``data_pipeline`` preprocessing of every manifest into WebDataset shards;
5. stage 1     DeepSpeed ZeRO-3 pretraining on both directions of every pair (2 CPU ranks);
6. stage 2     instruction tuning on conversations (+ pairs), from the stage-1 export;
7. export      Hugging Face model dir with tokenizer, layout, cards and the fitted codecs;
8. soundstorm  a tiny SoundStorm decoder trained on the speech shards (renders layers 2-8);
9. eval        every direction on held-out items against its chance level (:mod:`anygpt.demo.evaluate`,
               with eval's metrics); ``eval_suite.json`` names its scorer for ``anygpt eval --demo DIR``;
10. align      ``anygpt align`` from the export (``launch/configs/align_demo.yaml``, DeepSpeed ZeRO-3 on
               2 CPU ranks), exported to ``model_aligned/``; text->X scored on the same held-out items
               before and after, over several sampling seeds (``report.json["alignment"]``);
11. report     ``report.json`` / ``report.md``, loss and reward curves, a few rendered outputs.

The demo's modalities are the registered ones its grammar has content for
(:func:`anygpt.demo.grammar.demo_modalities`, registry order); everything per modality -- k-means
clusters of the fitted codec, renderings, file suffixes (the plugins') -- comes from that content or
from the plugin.

Why these sizes: the README's first command should take about ten minutes on 2 cores (7.4 to 11.7
measured, the machine's speed varies); ``--quick`` is the CI version (a smaller corpus, fewer steps)
that checks the report's structure and the easiest directions.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from anygpt import modalities as registry
from anygpt.align.cli import ALIGN_STAGE
from anygpt.config import load_yaml
from anygpt.decoders.train_soundstorm import train_soundstorm
from anygpt.demo.corpus import make_corpus
from anygpt.demo.evaluate import HELD_OUT_ITEMS, SYNTHETIC_SAMPLING, evaluate_synthetic, score_demo, summary_table, write_eval_suite
from anygpt.demo.grammar import demo_modalities, grammar
from anygpt.formats.templates import DEFAULT_SYSTEM_PROMPT, INSTRUCTIONS
from anygpt.infer.loading import load_lm
from anygpt.infer.mediaio import MediaIO, resolve_codecs, resolve_soundstorm
from anygpt.infer.settings import GenerationConfig
from anygpt.infer.tasks import run_tasks
from anygpt.modalities.fit import fit_codec
from anygpt.text_tokenizer import prepare_tokenizer, train_tiny_tokenizer
from anygpt.train.cli import TRAIN_STAGE, Stage
from anygpt.train.export import export_checkpoint
from data_pipeline.options import PreprocessOptions
from data_pipeline.runner import run_preprocess


@dataclass
class DemoSettings:
    """Sizes for one demo run (full or ``quick``)."""

    n_train: int | None = None  # per modality; None = the corpus default (320)
    n_test: int | None = None
    kmeans_iters: int = 10
    # Measured on 2 cores: a step of 2 ranks x 4 rows x 512 tokens takes 0.5-0.8 s (stage 2: 0.65-1 s),
    # most of it in the 18k-row LM head (the layout's modality ranges) even though the trainer runs
    # the head only at target positions; the budget is counted in steps.
    stage1_steps: int = 600
    stage2_steps: int = 120
    soundstorm_steps: int = 150
    seq_len: int = 512
    micro_batch_size: int = 4
    lr: float = 3e-3
    # Stage 1 of AnyGPT puts the loss on the whole sequence; with minutes of CPU the demo spends it on
    # the answers only (instructions are noise to a model this small).  `loss: all` is the default
    # in launch/configs/stage1_pretrain.yaml.
    stage1_loss: str = "assistant"
    model: str = "tiny"
    eval_items: int = HELD_OUT_ITEMS  # held-out items per direction (see anygpt.demo.evaluate)
    # The alignment stage (launch/configs/align_demo.yaml; None: its run.max_steps, 0 skips the stage).
    # Its before/after are text->X scores averaged over this many sampling seeds (their spread is reported),
    # and the gain is also taken seed by seed (same items and seed before and after): one seed's score
    # moves by ~0.025 with the sampling alone, about as much as the stage's gain.
    align_steps: int | None = None
    align_seeds: int = 4
    nproc: int = 2
    # modality -> codec card name for modalities not using their default codec (``--codec mimi``).
    codecs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(n_train=160, n_test=24, stage1_steps=450, stage2_steps=40, soundstorm_steps=20,
                   eval_items=24, align_steps=4, align_seeds=1)


class Step:
    """Times a named step, prints a one-line start/end, records the duration."""

    def __init__(self, timings: dict[str, float], name: str, what: str):
        self.timings, self.name, self.what = timings, name, what

    def __enter__(self) -> "Step":
        print(f"[demo] {self.name}: {self.what} ...", flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.t0, 1)
        if exc[0] is None:
            print(f"[demo] {self.name}: done in {self.timings[self.name]:.1f}s", flush=True)


def corpus_texts(corpus_dir: Path) -> list[str]:
    """Every caption/transcript/turn text in the corpus (to train the tiny tokenizer on)."""
    texts = [DEFAULT_SYSTEM_PROMPT, "This is input:"] + [s for pool in INSTRUCTIONS.values() for s in pool]
    for path in sorted(corpus_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "text" in row:
                texts.append(row["text"])
            for turn in row.get("conversation", []):
                texts += [c["text"] for c in turn.get("content", []) if "text" in c]
    return texts


def manifest_media(manifest: Path, modality: str) -> list[Path]:
    """The media files of a manifest's rows (paths are relative to the manifest)."""
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [manifest.parent / r[modality] for r in rows]


def run_subprocess(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run a step in its own process (DeepSpeed ranks), teeing output to a log; fail loudly."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("[train]", "[eval]", "error")) or "loss" in line[:80]:
                print("   " + line.rstrip()[:160], flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8").splitlines()[-15:]
        raise RuntimeError(f"step failed (exit {rc}): {' '.join(argv[:4])} ...; log {log_path}\n" + "\n".join(tail))


def make_codecs(corpus_dir: Path, codecs_dir: Path, settings: DemoSettings) -> dict[str, Any]:
    """Fit each demo modality's tiny codec on the training media (k-means clusters per codebook from
    the modality's demo content); return codebook usage per modality."""
    from concurrent.futures import ThreadPoolExecutor

    def fit(m: str) -> Any:
        return fit_codec(m, manifest_media(corpus_dir / f"train_{m}.jsonl", m), codecs_dir / m,
                         codec=settings.codecs.get(m), iters=settings.kmeans_iters,
                         max_clusters=grammar(m).codec_clusters)[1]

    # Two at a time: reading and encoding the media is mostly single-threaded Python and NumPy, so a
    # second fit uses the core the first leaves idle (torch's k-means kernels release the GIL).
    usage = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for m, report in zip(demo_modalities(), pool.map(fit, demo_modalities())):
            print("   " + report.summary().replace("\n", "\n   "), flush=True)
            usage[m] = report.to_dict()
    return usage


def make_shards(corpus_dir: Path, codecs_dir: Path, shards_dir: Path) -> dict[str, Any]:
    """Preprocess every manifest with the real data pipeline; return its stats per manifest."""
    codecs = registry.load_codecs(codecs_dir)
    stats = {}
    for split in ("train", "test"):
        for m in (*demo_modalities(), "conversations"):
            manifest = corpus_dir / f"{split}_{m}.jsonl"
            if not manifest.is_file():
                continue
            opts = PreprocessOptions(source="conversations" if m == "conversations" else "manifest",
                                     input=str(manifest), out=str(shards_dir / f"{split}_{m}"),
                                     codecs=str(codecs_dir), shard_size=64, prefix=m, progress=False)
            stats[f"{split}_{m}"] = run_preprocess(opts, codecs=codecs, verbose=False)
            s = stats[f"{split}_{m}"]
            print(f"   {split}_{m}: {s['written']} written, {s['skipped']} skipped", flush=True)
    return stats


def stage_config(out: Path, name: str, model: str, tokenizer: Path | None, codecs_dir: Path,
                 sources: list[dict], eval_shards: str, loss: str, steps: int, settings: DemoSettings,
                 lr: float) -> Path:
    """Write a stage YAML in the same schema as ``launch/configs/*.yaml`` (re-runnable by hand)."""
    cfg = {
        "run": {"dir": str(out / "runs" / name), "max_steps": steps, "save_every": steps, "log_every": 20,
                "eval_every": 0, "eval_max_batches": 8, "seed": 0, "keep_last": 1, "tensorboard": True,
                "progress": False},
        "model": {"name": model, "tokenizer": str(tokenizer) if tokenizer else None, "codecs": str(codecs_dir)},
        "data": {"sources": sources, "eval_shards": eval_shards, "seq_len": settings.seq_len, "loss": loss,
                 "shuffle_buffer": 256, "num_workers": 0},
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": min(20, steps // 5), "weight_decay": 0.0,
                  "betas": [0.9, 0.98], "grad_clip": 1.0, "micro_batch_size": settings.micro_batch_size,
                  "grad_accum": 1, "deepspeed": "ds_configs/zero3.json",
                  "precision": "auto"},
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# anygpt train --config {path} --nproc {settings.nproc}\n# Written by `anygpt demo`.\n"
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_stage(stage: Stage, config: Path, settings: DemoSettings, log: Path) -> None:
    """``anygpt train|align --config CONFIG --nproc N``, logged to ``log``: the stage is checked here
    (the CLI's preflight), then its DeepSpeed ranks start through torchrun directly -- a CLI process in
    between would import torch, transformers and DeepSpeed once more only to check and spawn (~4 s a
    stage on 2 cores)."""
    cmd, env = stage.checked_rank_command(str(config), settings.nproc)
    run_subprocess(cmd, log, env)


ALIGN_CONFIG = "align_demo"  # the shipped launch/configs/align_demo.yaml: the stage's method and sizes


def align_config(out: Path, model_dir: Path, settings: DemoSettings) -> Path:
    """The shipped demo alignment YAML with this demo's paths, written to ``DIR/configs/align.yaml``."""
    cfg = load_yaml(ALIGN_CONFIG)
    steps = settings.align_steps or cfg["run"]["max_steps"]
    cfg["run"].update({"dir": str(out / "runs" / "align"), "max_steps": steps, "save_every": steps})
    cfg["model"]["name"] = str(model_dir)
    a = cfg["align"]
    if "dpo" in a:  # fewer steps than rounds (settings.align_steps): one round per step
        a["dpo"]["rounds"] = min(a["dpo"].get("rounds", 1), steps)
    a["prompts"]["shards"] = [str(out / "shards" / f"train_{m}" / "*.tar") for m in demo_modalities()]
    a["sampling"] = list(SYNTHETIC_SAMPLING)  # rollouts sample as the evaluation does
    for reward in a.get("rewards", []):
        if reward["name"] == "judge":
            reward.setdefault("options", {})["demo"] = str(out)
    path = out / "configs" / "align.yaml"
    header = (f"# anygpt align --config {path} --nproc {settings.nproc}\n"
              f"# Written by `anygpt demo` from launch/configs/{ALIGN_CONFIG}.yaml.\n")
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def text2x_scores(model_dir: Path, out: Path, settings: DemoSettings, seeds: list[int]) -> dict[int, dict[str, float]]:
    """seed -> text->X direction -> score on the demo's held-out items (sampled with that seed)."""
    lm = load_lm(model_dir)
    codecs = registry.load_codecs(model_dir / "codecs")
    return {s: {k: v["score"] for k, v in evaluate_synthetic(lm, codecs, out / "shards", n_items=settings.eval_items,
                                                              seed=s, text2x_only=True).items()}
            for s in seeds}


def summarise_alignment(config: Path, before: dict[int, dict[str, float]], after: dict[int, dict[str, float]],
                        run_dir: Path) -> dict[str, Any]:
    """``report.json["alignment"]``: mean scores over the sampling seeds before and after, the spread
    (std over seeds), the per-seed values, and the run's reward curve."""
    import numpy as np

    def stats(by_seed: dict[int, dict[str, float]]) -> tuple[dict, dict, dict]:
        """(mean, std) over seeds of every direction and of their mean, and each seed's mean."""
        rows = {s: {**v, "mean": float(np.mean(list(v.values())))} for s, v in by_seed.items()}
        names = list(next(iter(rows.values())))
        return ({n: float(np.mean([r[n] for r in rows.values()])) for n in names},
                {n: float(np.std([r[n] for r in rows.values()])) for n in names},
                {s: r["mean"] for s, r in rows.items()})

    (b, b_sd, b_seed), (a, a_sd, a_seed) = stats(before), stats(after)
    # Paired by seed: the same held-out items sampled with the same seed before and after.
    paired = [a_seed[s] - b_seed[s] for s in sorted(before)]
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    method = cfg["align"]["method"]
    rewards = [r["name"] for r in cfg["align"].get("rewards", [])]
    return {"method": method,
            "reward": "+".join(rewards) if method == "grpo" else
            "implicit (DPO: chosen = gold codes, rejected = the model's own sample)",
            "scored_by": "judge (nearest reference rendering, as anygpt eval --demo)",
            "steps": cfg["run"]["max_steps"], "seeds": sorted(before),
            "before": b, "after": a, "gain": {k: a[k] - b[k] for k in b},
            "spread": {"before": b_sd, "after": a_sd},
            "gain_by_seed": {str(s): g for s, g in zip(sorted(before), paired)},
            "gain_spread": float(np.std(paired)),
            # The claim the demo makes: the mean gain exceeds the larger per-seed spread of the two scores.
            "beyond_spread": bool(a["mean"] - b["mean"] > max(b_sd["mean"], a_sd["mean"])),
            "by_seed": {"before": {str(s): v for s, v in before.items()}, "after": {str(s): v for s, v in after.items()}},
            "reward_curve": str(run_dir / "reward.png"), "config": str(config)}


def render_samples(model_dir: Path, corpus_dir: Path, out_dir: Path) -> list[dict]:
    """A few rendered outputs (one per direction and demo modality) from the exported model, through
    the task runner; files take the plugins' output suffixes."""
    lm = load_lm(model_dir)
    codecs = resolve_codecs(None, model_dir)
    # Few denoising steps where a renderer takes them (the tiny unCLIP): the samples show the pipeline works.
    quick = {"steps": 2, "seed": 0}
    render = {m: {k: v for k, v in quick.items() if k in registry.get(m).render_options} for m in lm.layout.modalities}
    media = MediaIO(lm.layout, codecs, resolve_soundstorm(None, model_dir, codecs), lm.device,
                    render_options=render, seed=0)
    first = {m: json.loads((corpus_dir / f"test_{m}.jsonl").read_text(encoding="utf-8").splitlines()[0])
             for m in demo_modalities()}
    tasks = [f"text|{m}|{first[m]['text']}" for m in first]
    tasks += [f"{m}|text|{corpus_dir / first[m][m]}" for m in first]
    results = run_tasks(lm, media, tasks, GenerationConfig(max_new_tokens=512, seed=0).with_greedy(), out_dir,
                        out=io.StringIO(), stream=False)
    return [r.to_dict() for r in results]


def codec_facts(codecs_dir: Path) -> dict[str, dict[str, Any]]:
    """Per modality: which codec the run used and how many LM positions its media cost (per second of
    audio, from the card's frame rate x ``lm_codebooks``; per item for fixed-length spans)."""
    out = {}
    for m, card in registry.directory_cards(codecs_dir).items():
        rate = card.get("frame_rate")
        out[m] = {"codec": card["name"], "frame_rate": rate, "lm_codebooks": int(card["lm_codebooks"]),
                  "lm_positions_per_second": float(rate) * int(card["lm_codebooks"]) if rate else None,
                  "lm_positions_per_item": card.get("tokens_per_item")}
    return out


def write_report(out: Path, report: dict) -> None:
    """``report.json`` (machine-readable) and ``report.md`` (for people), next to each other."""
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    lines = ["# anygpt demo report", "", f"Total time: {report['seconds']:.0f} s on {report['machine']['cpus']} CPU cores.",
             "", "## Held-out scores (every direction, chance level beside it)", "", "```",
             summary_table(report["directions"]), "```", "",
             "Score = mean attribute accuracy on held-out items (half novel attribute combinations, half new "
             "renderings of seen ones); "
             "text→X answers are judged by the nearest reference rendering of every caption.", "",
             "## Codecs (LM positions each costs)", ""]
    for m, c in report["codecs"].items():
        cost = (f"{c['lm_positions_per_second']:g} positions per second" if c["lm_positions_per_second"]
                else f"{c['lm_positions_per_item']} positions per item")
        lines.append(f"- {m}: {c['codec']}, {cost}")
    lines += ["", "## Codebook usage (fitted tiny codecs)", ""]
    for m, u in report["codebooks"].items():
        lines += [f"- {m}: " + ", ".join(f"{c['name']} {c['used']}/{c['size']} used (perplexity {c['perplexity']:.1f})"
                                         for c in u["codebooks"])]
    lines += ["", "## Loss curves", ""] + [f"![{k}]({Path(v).relative_to(out)})" for k, v in report["loss_curves"].items()]
    a = report.get("alignment")
    if a:
        names = list(a["before"])
        lines += ["", f"## Alignment ({a['method']}, {a['steps']} steps; reward: {a['reward']})", "",
                  f"text→X scores on the same held-out items, mean over sampling seeds {a['seeds']} "
                  f"(± std over the seeds), {a['scored_by']}:", "",
                  "| direction | before | after | gain |", "|---|---|---|---|"]
        lines += [f"| {n} | {a['before'][n]:.3f} ± {a['spread']['before'][n]:.3f} | "
                  f"{a['after'][n]:.3f} ± {a['spread']['after'][n]:.3f} | {a['gain'][n]:+.3f} |" for n in names]
        lines += ["", "Mean gain by sampling seed: " + ", ".join(f"seed {k} {v:+.3f}" for k, v in a["gain_by_seed"].items())
                  + f" (std {a['gain_spread']:.3f}); the mean gain is "
                  + ("" if a["beyond_spread"] else "not ") + "larger than the spread of the scores over seeds."]
        lines += ["", f"![alignment]({Path(a['reward_curve']).relative_to(out)})", "",
                  f"Config: `{Path(a['config']).relative_to(out)}`."]
    lines += ["", "## Step timings (s)", ""] + [f"- {k}: {v}" for k, v in report["timings"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, nproc: int = 2,
             settings: DemoSettings | None = None) -> dict:
    """Run the whole pipeline into ``out``; returns the report (also written as report.json/.md).
    ``settings`` replaces the full / ``quick`` sizes (experiments, tests)."""
    out = Path(out).resolve()
    if (out / "report.json").exists() or (out / "runs").exists():
        raise ValueError(f"{out}: holds an earlier demo; choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    settings.nproc = nproc
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    corpus, codecs_dir, shards = out / "corpus", out / "codecs", out / "shards"
    modalities = demo_modalities()

    with Step(timings, "corpus", "synthetic speech (espeak-ng), images (Pillow), music (NumPy), conversations"):
        # One voice: the tiny random speech codec is not voice-invariant (a real SpeechTokenizer is).
        make_corpus(corpus, n_per_modality=settings.n_train, n_test=settings.n_test, seed=seed, quick=quick,
                    speech_variety="none", progress=False)
    with Step(timings, "tokenizer", "tiny SentencePiece tokenizer + layout tokens"):
        train_tiny_tokenizer(corpus_texts(corpus), out / "tokenizer_raw", vocab_size=600)
        prepare_tokenizer(out / "tokenizer_raw", out / "tokenizer", modalities=modalities)
    with Step(timings, "codecs", "fit tiny codec codebooks by k-means on the training media"):
        usage = make_codecs(corpus, codecs_dir, settings)
    with Step(timings, "shards", "data_pipeline: manifests -> WebDataset shards"):
        shard_stats = make_shards(corpus, codecs_dir, shards)

    pairs = [{"name": m, "shards": str(shards / f"train_{m}" / "*.tar"), "weight": 1.0, "kind": "pretrain",
              "x2text_prob": 0.5} for m in modalities]
    eval_shards = str(shards / "test_*" / "*.tar")
    with Step(timings, "stage1", f"pretraining, DeepSpeed ZeRO-3 on {nproc} CPU ranks, {settings.stage1_steps} steps"):
        cfg1 = stage_config(out, "stage1", settings.model, out / "tokenizer", codecs_dir, pairs, eval_shards,
                            settings.stage1_loss,
                            settings.stage1_steps, settings, settings.lr)
        run_stage(TRAIN_STAGE, cfg1, settings, out / "logs" / "stage1.log")
    with Step(timings, "stage2", f"instruction tuning from stage 1, {settings.stage2_steps} steps"):
        sft = [{"name": "conversations", "shards": str(shards / "train_conversations" / "*.tar"), "weight": 1.0,
                "kind": "sft"}] + [{**p, "weight": 0.5} for p in pairs]
        cfg2 = stage_config(out, "stage2", str(out / "runs" / "stage1"), out / "tokenizer", codecs_dir, sft,
                            eval_shards, "assistant", settings.stage2_steps, settings, settings.lr / 3)
        run_stage(TRAIN_STAGE, cfg2, settings, out / "logs" / "stage2.log")
    model_dir = out / "model"
    with Step(timings, "export", "consolidate ZeRO-3 shards into a Hugging Face model directory"):
        export_checkpoint(out / "runs" / "stage2", model_dir)
    # The acoustic decoder (SoundStorm: RVQ layers 2-8 from the LM's layer 1) serves the modality whose
    # plugin takes an acoustic prompt; it trains on that modality's shards.
    acoustic = [m for m in modalities if registry.get(m).acoustic_prompt]
    if acoustic:
        with Step(timings, "soundstorm", f"{'/'.join(acoustic)} decoder for RVQ layers 2-8, "
                                         f"{settings.soundstorm_steps} steps"):
            train_soundstorm([str(p) for m in acoustic for p in sorted((shards / f"train_{m}").glob("*.tar"))],
                             model_dir / "soundstorm", steps=settings.soundstorm_steps, batch_size=8, lr=1e-3,
                             seed=seed, device="cpu", size="tiny", codecs=codecs_dir, max_frames=200,
                             progress=False)
    with Step(timings, "eval", f"every direction on up to {settings.eval_items} held-out items"):
        write_eval_suite(out)
        lm = load_lm(model_dir)
        directions, table = score_demo(lm, registry.load_codecs(model_dir / "codecs"), out,
                                       n_items=settings.eval_items)
    alignment = None
    if settings.align_steps != 0:
        aligned_dir = out / "model_aligned"
        with Step(timings, "align", f"alignment from the export (launch/configs/{ALIGN_CONFIG}.yaml)"):
            cfg3 = align_config(out, model_dir, settings)
            run_stage(ALIGN_STAGE, cfg3, settings, out / "logs" / "align.log")
            export_checkpoint(out / "runs" / "align", aligned_dir)
            if (model_dir / "soundstorm").is_dir():  # the acoustic decoder is not part of the LM: shared
                shutil.copytree(model_dir / "soundstorm", aligned_dir / "soundstorm")
        seeds = list(range(settings.align_seeds))
        with Step(timings, "align_eval", f"text->X before / after alignment, {len(seeds)} sampling seed(s)"):
            # Seed 0 of "before" is the eval step's text->X (same items, seed and sampling); other seeds anew.
            before = {0: {k: v["score"] for k, v in directions.items() if k.startswith("text2")}}
            before.update(text2x_scores(model_dir, out, settings, seeds[1:]) if seeds[1:] else {})
            after = text2x_scores(aligned_dir, out, settings, seeds)
            alignment = summarise_alignment(cfg3, before, after, out / "runs" / "align")
    with Step(timings, "render", "a few outputs as png / wav"):
        samples = render_samples(model_dir, corpus, out / "samples")

    report = {
        "directions": directions,
        "codebooks": usage,
        "codecs": codec_facts(codecs_dir),
        "shards": {k: {key: v[key] for key in ("inputs", "written", "skipped")} for k, v in shard_stats.items()},
        "loss_curves": {name: str(out / "runs" / name / "loss.png") for name in ("stage1", "stage2")
                        if (out / "runs" / name / "loss.png").exists()},
        "samples": samples,
        "alignment": alignment,
        "timings": timings,
        "seconds": round(time.perf_counter() - t_start, 1),
        "machine": {"cpus": os.cpu_count()},
        "quick": quick,
        "paths": {"corpus": str(corpus), "codecs": str(codecs_dir), "shards": str(shards),
                  "runs": str(out / "runs"), "model": str(model_dir), "samples": str(out / "samples")},
    }
    if alignment:
        report["paths"]["aligned"] = str(out / "model_aligned")
    write_report(out, report)
    print("\n" + table)
    if alignment:
        print(f"\n[demo] alignment ({alignment['method']}, {alignment['steps']} steps): text->X mean "
              f"{alignment['before']['mean']:.3f} -> {alignment['after']['mean']:.3f} "
              f"(std over sampling seeds {alignment['spread']['before']['mean']:.3f} / "
              f"{alignment['spread']['after']['mean']:.3f}; gain by seed "
              + " ".join(f"{g:+.3f}" for g in alignment["gain_by_seed"].values()) + ")")
    print(f"\n[demo] finished in {report['seconds']:.0f}s. Report: {out / 'report.md'} (+ report.json)")
    for name, path in report["paths"].items():
        print(f"[demo] {name:<8} {path}")
    print(f"[demo] talk to the model:  anygpt chat --model {model_dir}")
    print(f"[demo] or in a browser / with an OpenAI client:  anygpt serve --model {model_dir}  "
          f"(then http://127.0.0.1:8000/)")
    return report

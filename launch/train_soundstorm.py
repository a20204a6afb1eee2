# python launch/train_soundstorm.py --shards 'data/shards/speech-{000000..000099}.tar' --out runs/soundstorm --steps 200000 --batch-size 32
"""Train the SoundStorm acoustic decoder (SpeechTokenizer layer 1 -> layers 2-8) on speech shards.

Thin entry point: parses arguments and calls ``anygpt.decoders.train_soundstorm.train_soundstorm``.
``--tiny`` trains the small test-size model (CPU smoke runs); the default is the AnyGPT release size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", nargs="+", required=True, help="tar paths, brace patterns or globs")
    parser.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-frames", type=int, default=500, help="crop length in 50 Hz frames")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--init-from", default=None, help="continue from a saved SoundStorm directory")
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes (tests, CPU smoke runs)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from anygpt.decoders.soundstorm import SoundStormConfig
    from anygpt.decoders.train_soundstorm import train_soundstorm

    try:
        summary = train_soundstorm(
            args.shards, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            max_frames=args.max_frames, seed=args.seed, device=args.device,
            config=SoundStormConfig.tiny() if args.tiny else None, init_from=args.init_from,
            warmup_steps=args.warmup_steps, log_every=args.log_every, save_every=args.save_every,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

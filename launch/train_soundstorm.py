# python launch/train_soundstorm.py --config launch/configs/soundstorm.yaml
"""Train the SoundStorm acoustic decoder (the LM's codebooks -> all of the speech codec's) on speech shards.

Thin entry point; everything lives in :mod:`anygpt.decoders`.  Same as ``anygpt
soundstorm``.  Examples:

    python launch/train_soundstorm.py --config launch/configs/soundstorm.yaml run.dir=runs/soundstorm
    python launch/train_soundstorm.py --config launch/configs/soundstorm.yaml --resume auto
    python launch/train_soundstorm.py --config launch/configs/soundstorm.yaml model.size=tiny run.device=cpu \\
        run.max_steps=200 data.shards='demo/shards/train_speech/*.tar' model.codecs=demo/codecs
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from anygpt.decoders.cli import soundstorm_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(soundstorm_main())

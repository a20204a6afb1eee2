# python launch/generate.py --model HF_DIR [--codecs DIR] [--out DIR] "text|image|a red bus" "speech|text|clip.wav"
"""Base-model tasks ``in|out|content[|voice.wav]``; the same as ``anygpt generate``.

All logic lives in ``anygpt.infer``.
"""
import sys

from anygpt.infer.cli import main

if __name__ == "__main__":
    sys.exit(main(command="generate"))

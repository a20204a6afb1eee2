# python launch/chat.py --model HF_DIR [--codecs DIR] [--soundstorm DIR] [--out DIR] [--script FILE|-]
"""Multimodal chat with an exported (or released AnyGPT) model; the same as ``anygpt chat``.

Type messages, attach files with /<modality> PATH (e.g. /image x.png), choose the answer voice with /voice, /help for
the rest.  All logic lives in ``anygpt.infer``.
"""
import sys

from anygpt.infer.cli import main

if __name__ == "__main__":
    sys.exit(main(command="chat"))

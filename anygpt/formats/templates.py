"""Stage-1 pretraining templates (X->text and text->X) with instruction pools, and the chat defaults.

Stage 1 renders a text-centric pair in one of two directions (DESIGN.md)::

    X->text:  [Human]: {instruction} {<so*> ids <eo*>}<eoh> [AnyGPT]: {text}<eom>
    text->X:  [Human]: {instruction} This is input: {text}<eoh> [AnyGPT]: {<so*> ids <eo*>}<eom>

The instruction is drawn from a pool per modality and direction so the model learns the task from
the wording rather than from one fixed string.  Pools are our own phrasings (>= 30 each), built from
hand-written openers and objects so every combination is a natural sentence.
"""
from __future__ import annotations

import itertools
import random
from typing import Literal

from anygpt.formats.segments import Conversation, Media, Part, Text, Turn

Direction = Literal["x2text", "text2x"]

DEFAULT_SYSTEM_PROMPT = (
    "You are AnyGPT, an assistant that understands and generates text, speech, images and music."
)

_NOUN = {"image": ("image", "picture", "photo"), "speech": ("speech", "recording", "audio clip"),
         "music": ("music", "piece", "track")}

_X2TEXT_OPENERS = {
    "image": ["Describe {the} {noun}.", "Write a caption for {the} {noun}.", "What does {the} {noun} show?",
              "Give a short description of {the} {noun}.", "Summarize what is in {the} {noun}.",
              "Tell me what you see in {the} {noun}.", "Caption {the} {noun} in one sentence.",
              "Explain the content of {the} {noun}.", "Write one line about {the} {noun}.",
              "What is depicted in {the} {noun}?", "Provide a brief caption for {the} {noun}."],
    "speech": ["Transcribe {the} {noun}.", "Write down what is said in {the} {noun}.",
               "What words are spoken in {the} {noun}?", "Convert {the} {noun} to text.",
               "Give me the transcript of {the} {noun}.", "Please transcribe {the} {noun} exactly.",
               "Turn {the} {noun} into written text.", "What does the speaker say in {the} {noun}?",
               "Recognize the words in {the} {noun}.", "Write out {the} {noun} as text.",
               "Produce a transcript for {the} {noun}."],
    "music": ["Describe {the} {noun}.", "Write a caption for {the} {noun}.", "What does {the} {noun} sound like?",
              "Give a short description of {the} {noun}.", "Characterize the style of {the} {noun}.",
              "Tell me about the mood and tempo of {the} {noun}.", "Caption {the} {noun} in one sentence.",
              "Summarize {the} {noun} in words.", "How would you describe {the} {noun}?",
              "Explain what is heard in {the} {noun}.", "Write one line about {the} {noun}."],
}
_TEXT2X_OPENERS = {
    "image": ["Draw {a} {noun} of the following.", "Generate {a} {noun} from this description.",
              "Create {a} {noun} that matches the text.", "Paint {a} {noun} as described.",
              "Make {a} {noun} showing this.", "Render {a} {noun} for the caption below.",
              "Produce {a} {noun} based on the text.", "Illustrate the description as {a} {noun}.",
              "Show me {a} {noun} of this.", "Turn this caption into {a} {noun}.",
              "Sketch {a} {noun} following the description."],
    "speech": ["Read the text aloud as {a} {noun}.", "Say the following as {a} {noun}.",
               "Turn this text into {a} {noun}.", "Speak the sentence below as {a} {noun}.",
               "Generate {a} {noun} of the text.", "Produce {a} {noun} reading this.",
               "Convert the text to {a} {noun}.", "Voice the following words as {a} {noun}.",
               "Pronounce this sentence in {a} {noun}.", "Synthesize {a} {noun} saying this.",
               "Create {a} {noun} that says the text."],
    "music": ["Compose {a} {noun} from this description.", "Generate {a} {noun} matching the caption.",
              "Create {a} {noun} that sounds like this.", "Play {a} {noun} as described.",
              "Make {a} {noun} in the following style.", "Produce {a} {noun} for this caption.",
              "Write {a} {noun} fitting the text.", "Perform {a} {noun} following the description.",
              "Turn this caption into {a} {noun}.", "Synthesize {a} {noun} with these features.",
              "Give me {a} {noun} like this."],
}


def _pool(openers: list[str], modality: str, text2x: bool) -> tuple[str, ...]:
    out = []
    for opener, noun in itertools.product(openers, _NOUN[modality]):
        article = "an" if noun[0] in "aeiou" else "a"
        out.append(opener.format(the="the" if not text2x else "", a=article, noun=noun).replace("  ", " "))
    return tuple(dict.fromkeys(out))  # keep order, drop duplicates


INSTRUCTIONS: dict[tuple[str, Direction], tuple[str, ...]] = {}
for _m in _NOUN:
    INSTRUCTIONS[(_m, "x2text")] = _pool(_X2TEXT_OPENERS[_m], _m, text2x=False)
    INSTRUCTIONS[(_m, "text2x")] = _pool(_TEXT2X_OPENERS[_m], _m, text2x=True)


def instruction_pool(modality: str, direction: Direction) -> tuple[str, ...]:
    try:
        return INSTRUCTIONS[(modality, direction)]
    except KeyError:
        raise ValueError(f"no instruction pool for {modality!r} {direction!r}") from None


def pretrain_pair(modality: str, media: Media, text: str, direction: Direction,
                  rng: random.Random | None = None, instruction: str | None = None) -> Conversation:
    """A stage-1 example: one user turn and one assistant turn in the given direction."""
    rng = rng or random.Random()
    instruction = instruction or rng.choice(instruction_pool(modality, direction))
    if direction == "x2text":
        user: list[Part] = [Text(f"{instruction} "), media]
        answer: list[Part] = [Text(text)]
    elif direction == "text2x":
        user = [Text(f"{instruction} This is input: {text}")]
        answer = [media]
    else:
        raise ValueError(f"direction must be x2text or text2x, not {direction!r}")
    return Conversation([Turn("user", user), Turn("assistant", answer)])

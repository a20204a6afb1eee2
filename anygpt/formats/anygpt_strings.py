"""AnyGPT's token-string format <-> our parts.

People hold data as strings like ``<sosp><🗣️12><🗣️7><eosp>`` (AnyInstruct, AnyGPT's sample files):
each modality of the layout has its span markers and its ``<prefixN>`` tokens, numbered
``N = code + codebook_size·k`` frame-major when it has several codebooks (music: ``<🎶N>``).  We
convert these strings to :class:`Media` parts once (at preprocessing), so nothing downstream
tokenizes modality strings.  Which spans exist comes from the layout, never from a list here.
"""
from __future__ import annotations

import re

import numpy as np

from anygpt.formats.segments import Conversation, Marker, Media, Part, Text, Turn
from anygpt.layout import LayoutError, VocabLayout

_MARKERS = re.compile(r"(<-Ins->|<-Res->)")


class AnyGPTStringError(ValueError):
    pass


def codes_to_string(layout: VocabLayout, modality: str, codes: np.ndarray) -> str:
    """``[K, T]`` codes -> ``<so*><prefixN>...<eo*>`` with AnyGPT's numbering (code + size·k)."""
    m = layout.modality(modality)
    ids = layout.codes_to_ids(modality, codes) - m.offset
    return m.start + "".join(f"<{m.prefix}{int(n)}>" for n in ids) + m.end


def string_to_codes(layout: VocabLayout, span: str) -> tuple[str, np.ndarray]:
    """One ``<so*>...<eo*>`` span -> (modality, ``[K, T]`` codes); errors name the bad token."""
    span = span.strip()
    for m in layout.modalities.values():
        if span.startswith(m.start):
            if not span.endswith(m.end):
                raise AnyGPTStringError(f"{m.name} span does not end with {m.end}")
            body = span[len(m.start) : len(span) - len(m.end)]
            pat = re.compile(rf"<{re.escape(m.prefix)}(\d+)>")
            numbers = [int(x) for x in pat.findall(body)]
            leftover = pat.sub("", body).strip()
            if leftover:
                raise AnyGPTStringError(f"{m.name} span holds unexpected text {leftover[:30]!r}")
            bad = [n for n in numbers if n >= m.size]
            if bad:
                raise AnyGPTStringError(f"{m.name}: token <{m.prefix}{bad[0]}> out of range [0, {m.size})")
            ids = np.asarray(numbers, dtype=np.int64) + m.offset
            try:
                codes, dropped = layout.ids_to_codes(m.name, ids)
            except LayoutError as e:
                raise AnyGPTStringError(str(e)) from None
            if dropped:
                raise AnyGPTStringError(f"{m.name} span ends mid-frame ({dropped} trailing tokens)")
            return m.name, codes
    raise AnyGPTStringError(f"not a modality span: {span[:20]!r}")


def string_to_parts(layout: VocabLayout, message: str) -> list[Part]:
    """A message with embedded spans and chain-of-modality markers -> parts."""
    parts: list[Part] = []
    pos = 0
    for match in _span_pattern(layout).finditer(message):
        parts += _text_parts(message[pos : match.start()])
        modality, codes = string_to_codes(layout, match.group(0))
        parts.append(Media(modality, codes))
        pos = match.end()
    parts += _text_parts(message[pos:])
    return parts


def _span_pattern(layout: VocabLayout) -> re.Pattern[str]:
    """One ``start ... end`` alternative per modality of the layout (shortest match, across lines)."""
    spans = [f"{re.escape(m.start)}.*?{re.escape(m.end)}" for m in layout.modalities.values()]
    return re.compile("|".join(spans) or r"(?!)", re.S)


def _text_parts(text: str) -> list[Part]:
    out: list[Part] = []
    for piece in _MARKERS.split(text):
        if piece in ("<-Ins->", "<-Res->"):
            out.append(Marker(piece))
        elif piece:
            out.append(Text(piece))
    return out


def parts_to_string(layout: VocabLayout, parts: list[Part]) -> str:
    out = []
    for p in parts:
        if isinstance(p, Text):
            out.append(p.text)
        elif isinstance(p, Marker):
            out.append(p.token)
        else:
            out.append(codes_to_string(layout, p.modality, p.codes))
    return "".join(out)


def conversation_from_anygpt(layout: VocabLayout, record: dict) -> Conversation:
    """An AnyInstruct-style ``{"conversation": [[{"role", "message"}...]]}`` record -> Conversation.

    The release nests turns one list deeper in some files; both shapes are accepted.
    """
    turns_in = record.get("conversation")
    if not isinstance(turns_in, list) or not turns_in:
        raise AnyGPTStringError("record has no 'conversation' list")
    if isinstance(turns_in[0], list):
        turns_in = [t for group in turns_in for t in group]
    turns = []
    for k, t in enumerate(turns_in):
        role = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}.get(str(t.get("role", "")).lower())
        if role is None:
            raise AnyGPTStringError(f"turn {k}: unknown role {t.get('role')!r}")
        message = t.get("message", t.get("content"))
        if not isinstance(message, str):
            raise AnyGPTStringError(f"turn {k}: no message text")
        turns.append(Turn(role, string_to_parts(layout, message.strip())))
    return Conversation(turns)


def conversation_to_anygpt(layout: VocabLayout, conv: Conversation) -> dict:
    return {"conversation": [{"role": t.role, "message": parts_to_string(layout, t.parts)} for t in conv.turns]}

"""The segment model: conversations as roles and parts, rendered to ids + loss mask and parsed back.

This is the *one* template definition; training and inference both go through it (AnyGPT's release
trained on one template and served another).  Token order of a rendered conversation::

    <s> [system text] [Human] ":" user parts <eoh> [AnyGPT] ":" assistant parts <eom> [Human] ...

Every text part is tokenized on its own (no text is merged across a special token or a media
span), so ``parse(render(x)) == x`` exactly, and an inference prompt that ends in ``[AnyGPT] ":"``
is tokenized exactly like the training sequence up to that point.  Media parts are code arrays
mapped arithmetically by the :class:`~anygpt.layout.VocabLayout`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, Union

import numpy as np

from anygpt.layout import LayoutError, VocabLayout

ROLE_SEPARATOR = ":"  # rendered right after a role token, as in "[Human]: ..."
Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Media:
    """Codes of one modality span, ``[K, T]`` (K = the layout's codebooks for that modality)."""

    modality: str
    codes: np.ndarray

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Media) and self.modality == other.modality
                and np.array_equal(np.asarray(self.codes), np.asarray(other.codes)))

    def __hash__(self) -> int:  # frozen dataclass with an array field: hash by identity-free summary
        return hash((self.modality, np.asarray(self.codes).tobytes()))


@dataclass(frozen=True)
class Marker:
    """A chain-of-modality marker (``<-Ins->`` transcript, ``<-Res->`` text reply)."""

    token: str


Part = Union[Text, Media, Marker]


@dataclass
class Turn:
    role: Role
    parts: list[Part]

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"unknown role {self.role!r} (user or assistant)")
        # Adjacent text parts are merged: they would be tokenized as one piece anyway on parse.
        merged: list[Part] = []
        for p in self.parts:
            if isinstance(p, Text) and merged and isinstance(merged[-1], Text):
                merged[-1] = Text(merged[-1].text + p.text)
            elif not (isinstance(p, Text) and p.text == ""):
                merged.append(p)
        self.parts = merged


@dataclass
class Conversation:
    turns: list[Turn]
    system: str | None = None


@dataclass(frozen=True)
class FormatIssue:
    """A malformed piece found while parsing ids: where it starts and what is wrong."""

    position: int
    message: str

    def __str__(self) -> str:
        return f"position {self.position}: {self.message}"


@dataclass
class Rendered:
    ids: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # bool [L]: True where the token is a training target

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Parsed:
    conversation: Conversation
    issues: list[FormatIssue] = field(default_factory=list)


def chain_of_modality(transcript: str | None, reply: str, answer: Media | None = None) -> list[Part]:
    """Assistant parts for a chain-of-modality answer: ``<-Ins-> transcript <-Res-> reply [media]``."""
    parts: list[Part] = []
    if transcript is not None:
        parts += [Marker("<-Ins->"), Text(transcript)]
    parts += [Marker("<-Res->"), Text(reply)]
    if answer is not None:
        parts.append(answer)
    return parts


class SequenceFormat:
    """Renders conversations to ids and parses ids back, for one tokenizer + layout.

    Args:
        tokenizer: a Hugging Face tokenizer (text parts only).
        layout: the vocabulary layout (specials and modality ranges).
    """

    def __init__(self, tokenizer: Any, layout: VocabLayout):
        self.tokenizer = tokenizer
        self.layout = layout
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self._sep_ids = self.text_ids(ROLE_SEPARATOR)
        self._id_to_special = {i: t for t, i in layout.specials.items()}
        self._start = {layout.specials[m.start]: m for m in layout.modalities.values()}
        self._end = {layout.specials[m.end]: m for m in layout.modalities.values()}
        self._role_of = {layout.role_id("user"): "user", layout.role_id("assistant"): "assistant"}
        self._turn_end = {"user": layout.role_id("user_end"), "assistant": layout.role_id("assistant_end")}

    # ------------------------------------------------------------------ rendering
    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def part_ids(self, part: Part) -> list[int]:
        if isinstance(part, Text):
            return self.text_ids(part.text)
        if isinstance(part, Marker):
            return [self.layout.id(part.token)]
        if isinstance(part, Media):
            m = self.layout.modality(part.modality)
            body = self.layout.codes_to_ids(part.modality, part.codes)
            if m.span_length is not None and len(body) != m.span_length * m.num_codebooks:
                raise LayoutError(f"{part.modality} span has {len(body)} codes, expected {m.span_length}")
            return [self.layout.id(m.start), *body.tolist(), self.layout.id(m.end)]
        raise TypeError(f"not a part: {part!r}")

    def turn_prefix(self, role: Role) -> list[int]:
        """``[Human] ":"`` / ``[AnyGPT] ":"``: what inference appends before generating a turn."""
        return [self.layout.role_id(role), *self._sep_ids]

    def render(self, conv: Conversation, loss: Literal["all", "assistant"] = "assistant",
               add_bos: bool = True) -> Rendered:
        """Conversation -> ids + loss mask.

        With ``loss="assistant"`` the mask covers exactly the assistant turns' content and their
        ``<eom>`` (not the ``[AnyGPT] ":"`` prefix, which inference supplies in the prompt).  With
        ``loss="all"`` every token after BOS is a target (AnyGPT's stage-1 setting).
        """
        ids: list[int] = []
        mask: list[bool] = []

        def add(new: Sequence[int], target: bool) -> None:
            ids.extend(new)
            mask.extend([target] * len(new))

        everything = loss == "all"
        if loss not in ("all", "assistant"):
            raise ValueError(f"loss must be 'all' or 'assistant', not {loss!r}")
        if add_bos and self.bos_id is not None:
            add([self.bos_id], False)
        if conv.system:
            add(self.text_ids(conv.system), everything)
        for turn in conv.turns:
            target = everything or turn.role == "assistant"
            add(self.turn_prefix(turn.role), everything)
            for part in turn.parts:
                add(self.part_ids(part), target)
            add([self._turn_end[turn.role]], target)
        return Rendered(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))

    def prompt(self, conv: Conversation, add_bos: bool = True) -> np.ndarray:
        """Ids of a conversation followed by ``[AnyGPT] ":"``, ready for generation."""
        r = self.render(conv, loss="assistant", add_bos=add_bos)
        return np.concatenate([r.ids, np.asarray(self.turn_prefix("assistant"), dtype=np.int64)])

    # ------------------------------------------------------------------ parsing
    def parse_parts(self, ids: Sequence[int], start: int = 0) -> tuple[list[Part], list[FormatIssue]]:
        """Ids of turn content (no role tokens) -> parts; malformed spans become issues, never errors.

        ``start`` is the position of ``ids[0]`` in the full sequence, so issues point into it.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        parts: list[Part] = []
        issues: list[FormatIssue] = []
        text_run: list[int] = []

        def flush() -> None:
            if text_run:
                parts.append(Text(self.tokenizer.decode(text_run, skip_special_tokens=False,
                                                        clean_up_tokenization_spaces=False)))
                text_run.clear()

        i = 0
        n = len(ids)
        while i < n:
            tid = int(ids[i])
            if tid in self._start:
                flush()
                m = self._start[tid]
                j = i + 1
                while j < n and m.offset <= ids[j] < m.stop:
                    j += 1
                body = ids[i + 1 : j]
                closed = j < n and int(ids[j]) == self.layout.id(m.end)
                if not closed:
                    what = "sequence ended" if j >= n else f"found id {int(ids[j])}"
                    issues.append(FormatIssue(start + i, f"{m.name} span not closed by {m.end} ({what})"))
                try:
                    codes, dropped = self.layout.ids_to_codes(m.name, body)
                    if dropped:
                        issues.append(FormatIssue(start + i, f"{m.name} span ends mid-frame: {dropped} trailing id(s) dropped"))
                    if m.span_length is not None and codes.shape[1] != m.span_length:
                        issues.append(FormatIssue(start + i, f"{m.name} span has {codes.shape[1]} codes, expected {m.span_length}"))
                    if codes.shape[1]:
                        parts.append(Media(m.name, codes))
                except LayoutError as e:
                    issues.append(FormatIssue(start + i, str(e)))
                i = j + 1 if closed else j
                continue
            if tid in self._end:
                flush()
                issues.append(FormatIssue(start + i, f"{self._end[tid].end} without {self._end[tid].start}"))
            elif tid in self._id_to_special and self._id_to_special[tid] in ("<-Ins->", "<-Res->"):
                flush()
                parts.append(Marker(self._id_to_special[tid]))
            elif tid in self._id_to_special or tid in (self.bos_id, self.eos_id):
                flush()
                issues.append(FormatIssue(start + i, f"unexpected {self._id_to_special.get(tid, tid)} inside a turn"))
            elif self.layout.modality_of_id(tid) is not None:
                flush()
                issues.append(FormatIssue(start + i, f"{self.layout.modality_of_id(tid)} id {tid} outside a span"))
            else:
                text_run.append(tid)
            i += 1
        flush()
        return parts, issues

    def parse(self, ids: Sequence[int]) -> Parsed:
        """Full sequence -> conversation (+ issues).  Inverse of :meth:`render`."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        issues: list[FormatIssue] = []
        pos = 1 if len(ids) and self.bos_id is not None and ids[0] == self.bos_id else 0
        role_pos = [i for i in range(pos, len(ids)) if int(ids[i]) in self._role_of]
        system = None
        first = role_pos[0] if role_pos else len(ids)
        if first > pos:
            system = self.tokenizer.decode(ids[pos:first].tolist(), skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
        turns = []
        for k, rp in enumerate(role_pos):
            role = self._role_of[int(ids[rp])]
            stop = role_pos[k + 1] if k + 1 < len(role_pos) else len(ids)
            body_start = rp + 1
            sep = self._sep_ids
            if ids[body_start : body_start + len(sep)].tolist() == sep:
                body_start += len(sep)
            else:
                issues.append(FormatIssue(rp, f"role token not followed by '{ROLE_SEPARATOR}'"))
            body_end = stop
            if body_end > body_start and int(ids[body_end - 1]) == self._turn_end[role]:
                body_end -= 1
            else:
                issues.append(FormatIssue(stop - 1, f"{role} turn not closed by {self.layout.roles[role + '_end']}"))
            parts, more = self.parse_parts(ids[body_start:body_end], start=body_start)
            issues += more
            turns.append(Turn(role, parts))
        return Parsed(Conversation(turns, system), issues)

"""The vocabulary layout: where every special token and modality code lives in the LM's id space.

The layout is a value object, saved as ``vocab_layout.json`` next to every checkpoint and export.
Modality ids are mapped *arithmetically* (``offset + codebook_size * k + code``) rather than by
looking up added-token strings: it is exact, ~10x faster than tokenizing ``<🎶N>`` strings, and the
layout can be validated once instead of trusted on every lookup.

Our own layout appends, after the base text vocabulary: the role and chain-of-modality tokens, the
span markers of the founding modalities, then their ranges, in registry order
(:mod:`anygpt.modalities`); every modality registered later appends its own two markers and then its
range, so existing ids never move (``tests/test_layout.py`` compares against
``tokenizers/vocab_layout.json``).  Range sizes come from the codec cards (a Mimi run's speech range
is 2048 ids, SpeechTokenizer's 1024), and each range records the codec it was made for.

A layout may hold any subset of the registered modalities: a speech-only model (SpeechGPT-style) has
just the speech range.  Released AnyGPT checkpoints use a different order (4 role tokens, then per
modality ``<prefixN>`` tokens followed by its start/end markers); :func:`VocabLayout.from_tokenizer`
reads the offsets of every modality such a tokenizer holds, so those checkpoints work without
conversion.  Training, inference and preprocessing read the layout saved with a checkpoint
(``vocab_layout.json``) rather than deriving it again.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

LAYOUT_FILE = "vocab_layout.json"
LAYOUT_FORMAT = 1


class LayoutError(ValueError):
    """Out-of-range code or id, or an inconsistent layout."""


@dataclass(frozen=True)
class ModalitySpec:
    """One contiguous id range for a modality.

    Attributes:
        name: the modality's registry name.
        offset: id of code 0 of codebook 0.
        num_codebooks: codebooks the LM sees per frame (the codec card's ``lm_codebooks``).
        codebook_size: codes per codebook.
        start, end: the span markers (``<soim>``/``<eoim>`` ...).
        prefix: AnyGPT's token-string prefix (``👀``, ``🗣️``, ``🎶``) used by its ``<prefixN>`` tokens.
        span_length: fixed number of frames per span, if any (image: 32 codes).
        codec: name of the codec card the range was made for (None: not recorded, e.g. read from a
            release tokenizer whose range matches no card).
    """

    name: str
    offset: int
    num_codebooks: int
    codebook_size: int
    start: str
    end: str
    prefix: str
    span_length: int | None = None
    codec: str | None = None

    @property
    def size(self) -> int:
        return self.num_codebooks * self.codebook_size

    @property
    def stop(self) -> int:
        """One past the last id of the range."""
        return self.offset + self.size

    def contains(self, ids: np.ndarray | int) -> np.ndarray | bool:
        return (np.asarray(ids) >= self.offset) & (np.asarray(ids) < self.stop)


# Role and chain-of-modality tokens come first.  Order matters: it *is* the id assignment.
ROLE_TOKENS = {"user": "[Human]", "assistant": "[AnyGPT]", "user_end": "<eoh>", "assistant_end": "<eom>"}
COM_TOKENS = ("<-Ins->", "<-Res->")  # chain-of-modality markers: transcript, then text reply


def _range_facts(card: Mapping[str, Any]) -> dict[str, Any]:
    """What a codec card fixes about a modality's id range."""
    span = card.get("tokens_per_item")
    return {"num_codebooks": int(card["lm_codebooks"]), "codebook_size": int(card["codebook_size"]),
            "span_length": int(span) if span is not None else None, "codec": str(card["name"])}


@dataclass(frozen=True)
class VocabLayout:
    """Base text vocabulary + special tokens + modality ranges.

    Attributes:
        base_vocab_size: size of the text tokenizer's own vocabulary (LLaMA-2: 32000).
        specials: token string -> id for roles, turn ends, chain-of-modality and span markers.
        roles: role name -> token string (``user``, ``assistant``, ``user_end``, ``assistant_end``);
            AnyGPT's release trained with ``[MMGPT]``/``<eos>``, ours default to ``[AnyGPT]``/``<eom>``.
        modalities: name -> :class:`ModalitySpec`.
        total: the LM's vocabulary size (embedding rows).
    """

    base_vocab_size: int
    specials: Mapping[str, int]
    roles: Mapping[str, str]
    modalities: Mapping[str, ModalitySpec]
    total: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls, base_vocab_size: int, modalities: Sequence[str] | None = None,
                cards: Mapping[str, Mapping[str, Any]] | None = None) -> "VocabLayout":
        """Our layout right after the text vocabulary, for ``modalities`` (default: every registered one).

        Args:
            base_vocab_size: the text tokenizer's own size.
            modalities: which modalities get a range (kept in registry order).
            cards: modality -> codec card sizing its range (a run's codecs directory); the
                modality's default codec card otherwise.
        """
        from anygpt import modalities as registry

        plugins = registry.registered()
        wanted = list(plugins) if modalities is None else list(modalities)
        for m in wanted:
            registry.get(m)  # unknown names fail here, naming the known ones
        order = [p for name, p in plugins.items() if name in wanted]
        cards = dict(cards or {})
        facts = {p.name: _range_facts(cards.get(p.name) or registry.codec_card(p.name)) for p in order}
        next_id = base_vocab_size
        specials: dict[str, int] = {}
        mods: dict[str, ModalitySpec] = {}

        def add_special(tok: str) -> None:
            nonlocal next_id
            specials[tok] = next_id
            next_id += 1

        def add_range(p: Any) -> None:
            nonlocal next_id
            spec = ModalitySpec(p.name, next_id, start=p.start, end=p.end, prefix=p.prefix, **facts[p.name])
            mods[p.name] = spec
            next_id += spec.size

        for tok in [*ROLE_TOKENS.values(), *COM_TOKENS]:
            add_special(tok)
        founding = [p for p in order if p.founding]
        for p in founding:  # layout format 1: all founding markers, then all founding ranges
            add_special(p.start)
            add_special(p.end)
        for p in founding:
            add_range(p)
        for p in order:
            if not p.founding:  # appended later: own markers, then own range
                add_special(p.start)
                add_special(p.end)
                add_range(p)
        return cls(base_vocab_size, specials, dict(ROLE_TOKENS), mods, next_id)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, modalities: Sequence[str] | None = None,
                       cards: Mapping[str, Mapping[str, Any]] | None = None) -> "VocabLayout":
        """Read the layout from a Hugging Face tokenizer that already holds layout tokens.

        Every registered modality whose ``<prefix0>`` token the tokenizer holds gets the range of its
        contiguous ``<prefixN>`` tokens (a release tokenizer, or one of ours); the others are left
        out, never guessed (:meth:`missing` names them).  Every ``<prefixN>`` must sit at
        ``offset + N``, otherwise the arithmetic mapping would silently produce wrong ids, so we
        refuse with the first offender.  A tokenizer with no layout tokens at all is a base text
        tokenizer: the default layout (for ``modalities`` and ``cards``) is built on top of it.
        """
        from anygpt import modalities as registry

        vocab: dict[str, int] = tokenizer.get_vocab()
        present = [p for p in registry.registered().values() if f"<{p.prefix}0>" in vocab]
        if not present:
            return cls.default(len(vocab), modalities, cards)
        firsts = [vocab[f"<{p.prefix}0>"] for p in present]
        # The text vocabulary ends where the first layout token (a role token or a range) begins.
        base = min([vocab[t] for t in (*ROLE_TOKENS.values(), "[MMGPT]", "<eos>") if t in vocab] + firsts)
        # Role tokens: the release used [MMGPT]/<eos>; its SFT script used [AnyGPT]/<eom>.
        roles = {}
        for role, candidates in {
            "user": ("[Human]",),
            "assistant": ("[AnyGPT]", "[MMGPT]"),
            "user_end": ("<eoh>",),
            "assistant_end": ("<eom>", "<eos>"),
        }.items():
            found = [c for c in candidates if c in vocab]
            if not found:
                raise LayoutError(f"tokenizer has AnyGPT modality tokens but no {role} token (one of {candidates})")
            roles[role] = found[0]
        specials = {tok: vocab[tok] for tok in roles.values()}
        for tok in COM_TOKENS:  # optional in released tokenizers
            if tok in vocab:
                specials[tok] = vocab[tok]
        mods = {}
        for p in present:
            offset = vocab[f"<{p.prefix}0>"]
            n_ids = 0
            while (tid := vocab.get(f"<{p.prefix}{n_ids}>")) is not None:
                if tid != offset + n_ids:
                    raise LayoutError(f"modality {p.name!r} is not contiguous: <{p.prefix}{n_ids}> has id {tid}, "
                                      f"expected {offset + n_ids}")
                n_ids += 1
            for marker in (p.start, p.end):
                if marker not in vocab:
                    raise LayoutError(f"tokenizer lacks the {p.name} marker {marker}")
                specials[marker] = vocab[marker]
            facts = _range_facts((cards or {}).get(p.name) or registry.codec_card(p.name))
            if facts["num_codebooks"] * facts["codebook_size"] != n_ids:
                # Not the default codec's size: keep what the tokenizer says, frame-major codebooks
                # as the card counts them when they divide the range, and no codec name (unknown).
                k = facts["num_codebooks"] if n_ids % facts["num_codebooks"] == 0 else 1
                facts = {**facts, "num_codebooks": k, "codebook_size": n_ids // k, "codec": None}
            mods[p.name] = ModalitySpec(p.name, offset, start=p.start, end=p.end, prefix=p.prefix, **facts)
        total = max(len(vocab), max(vocab.values()) + 1)
        return cls(base, specials, roles, mods, total)

    def check_cards(self, cards: Mapping[str, Mapping[str, Any]], where: str = "this layout") -> None:
        """Refuse codecs that do not match the layout's ranges (one line naming both codecs).

        A codecs directory made with another codec (Mimi's 2048 speech ids against a SpeechTokenizer
        model's 1024) would otherwise feed ids into the wrong range or beyond it.
        """
        for name, card in cards.items():
            if name not in self.modalities:
                continue  # a codec the model has no range for is unused, not wrong
            spec, want = self.modalities[name], _range_facts(card)
            same_size = (spec.num_codebooks, spec.codebook_size) == (want["num_codebooks"], want["codebook_size"])
            if not same_size or (spec.codec is not None and spec.codec != want["codec"]):
                raise LayoutError(
                    f"{where}: {name} was trained with codec {spec.codec or '?'} ({spec.num_codebooks} x "
                    f"{spec.codebook_size} ids) but the codecs hold {want['codec']} ({want['num_codebooks']} x "
                    f"{want['codebook_size']}); use the codecs the model was trained with")

    def missing(self) -> list[str]:
        """Registered modalities this layout has no range for (reported, never guessed)."""
        from anygpt import modalities as registry

        return [m for m in registry.names() if m not in self.modalities]

    # ------------------------------------------------------------------ validation / io
    def validate(self) -> None:
        """Ranges and specials must not overlap each other, the text vocabulary, or exceed ``total``."""
        spans = [(m.offset, m.stop, f"modality {m.name}") for m in self.modalities.values()]
        spans += [(i, i + 1, f"special {t}") for t, i in self.specials.items()]
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise LayoutError(f"{an} [{a0},{a1}) overlaps {bn} [{b0},{b1})")
        for lo, hi, name in spans:
            if lo < self.base_vocab_size or hi > self.total:
                raise LayoutError(f"{name} [{lo},{hi}) lies outside [{self.base_vocab_size},{self.total})")
        for role, tok in self.roles.items():
            if tok not in self.specials:
                raise LayoutError(f"role {role} token {tok!r} has no id")
        for m in self.modalities.values():
            for marker in (m.start, m.end):
                if marker not in self.specials:
                    raise LayoutError(f"modality {m.name} marker {marker!r} has no id")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "base_vocab_size": self.base_vocab_size,
            "total": self.total,
            "roles": dict(self.roles),
            "specials": dict(self.specials),
            "modalities": {n: asdict(m) for n, m in self.modalities.items()},
            **({"extra": dict(self.extra)} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VocabLayout":
        if d.get("format") != LAYOUT_FORMAT:
            raise LayoutError(f"unsupported vocab layout format {d.get('format')!r} (expected {LAYOUT_FORMAT})")
        try:
            mods = {n: ModalitySpec(**m) for n, m in d["modalities"].items()}
            return cls(int(d["base_vocab_size"]), dict(d["specials"]), dict(d["roles"]), mods, int(d["total"]),
                       dict(d.get("extra", {})))
        except (KeyError, TypeError) as e:
            raise LayoutError(f"malformed vocab layout: {e}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / LAYOUT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "VocabLayout":
        path = Path(path)
        if path.is_dir():
            path = path / LAYOUT_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise LayoutError(f"{path}: cannot read vocab layout: {e}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ lookups
    def id(self, token: str) -> int:
        """Id of a special token (``[Human]``, ``<soim>`` ...)."""
        try:
            return self.specials[token]
        except KeyError:
            raise LayoutError(f"unknown special token {token!r}") from None

    def role_id(self, role: str) -> int:
        return self.id(self.roles[role])

    def modality(self, name: str) -> ModalitySpec:
        try:
            return self.modalities[name]
        except KeyError:
            raise LayoutError(f"unknown modality {name!r}; layout has {sorted(self.modalities)}") from None

    def modality_of_id(self, token_id: int) -> str | None:
        for m in self.modalities.values():
            if m.offset <= token_id < m.stop:
                return m.name
        return None

    def start_ids(self) -> dict[int, str]:
        """Span start marker id -> modality name."""
        return {self.specials[m.start]: m.name for m in self.modalities.values()}

    # ------------------------------------------------------------------ code <-> id arithmetic
    def codes_to_ids(self, name: str, codes: np.ndarray) -> np.ndarray:
        """``[K, T]`` codes (or ``[T]`` when K == 1) -> flat ids, frame-major for K > 1.

        Frame-major means each frame contributes K consecutive ids in codebook order; code ``c`` of
        codebook ``k`` maps to ``offset + codebook_size * k + c``.  Only the first
        ``num_codebooks`` rows are used (speech shards keep 8 RVQ layers; the LM sees layer 1).
        """
        m = self.modality(name)
        codes = np.asarray(codes)
        if codes.ndim == 1:
            codes = codes[None]
        if codes.ndim != 2 or codes.shape[0] < m.num_codebooks:
            raise LayoutError(f"{name}: codes of shape {codes.shape} need [{m.num_codebooks}, T]")
        codes = codes[: m.num_codebooks].astype(np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= m.codebook_size):
            bad = codes[(codes < 0) | (codes >= m.codebook_size)][0]
            raise LayoutError(f"{name}: code {int(bad)} out of range [0, {m.codebook_size})")
        shift = (np.arange(m.num_codebooks, dtype=np.int64) * m.codebook_size)[:, None]
        return (codes + shift + m.offset).T.reshape(-1)

    def ids_to_codes(self, name: str, ids: np.ndarray, strict: bool = True) -> tuple[np.ndarray, int]:
        """Flat ids -> ``[K, T]`` codes; the inverse of :meth:`codes_to_ids`.

        Returns ``(codes, dropped)``: for K > 1 an incomplete trailing frame is dropped and counted
        (generation can stop mid-frame).  With ``strict`` an id that is not at its expected
        codebook position raises, naming the position.
        """
        m = self.modality(name)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        k = m.num_codebooks
        dropped = len(ids) % k
        if dropped:
            ids = ids[: len(ids) - dropped]
        rel = ids - m.offset
        if rel.size and (rel.min() < 0 or rel.max() >= m.size):
            pos = int(np.flatnonzero((rel < 0) | (rel >= m.size))[0])
            raise LayoutError(f"{name}: id {int(ids[pos])} at position {pos} is outside [{m.offset}, {m.stop})")
        frames = rel.reshape(-1, k)
        book = frames // m.codebook_size
        if strict and k > 1 and np.any(book != np.arange(k)):
            pos = int(np.flatnonzero((book != np.arange(k)).reshape(-1))[0])
            raise LayoutError(
                f"{name}: id {int(ids[pos])} at position {pos} belongs to codebook {int(book.reshape(-1)[pos])}, "
                f"expected {pos % k} (frame-major order)"
            )
        return (frames % m.codebook_size).T.copy(), dropped

    def describe(self) -> dict[str, Any]:
        """A summary for ``anygpt layout``: base size, specials, modality ranges, total."""
        return {
            "base_vocab_size": self.base_vocab_size,
            "specials": dict(sorted(self.specials.items(), key=lambda kv: kv[1])),
            "roles": dict(self.roles),
            "modalities": {
                n: {"offset": m.offset, "size": m.size, "codebooks": m.num_codebooks, "codebook_size": m.codebook_size,
                    "start": m.start, "end": m.end, "last_id": m.stop - 1, "codec": m.codec}
                for n, m in self.modalities.items()
            },
            "total": self.total,
        }

    def added_token_strings(self) -> list[str]:
        """All added-token strings in id order, AnyGPT style (``<👀N>`` ...), for saved HF tokenizers.

        Saving them in the tokenizer keeps an export usable by plain ``transformers`` users who hold
        data as token strings; our own hot paths never tokenize them.
        """
        by_id: dict[int, str] = {i: t for t, i in self.specials.items()}
        for m in self.modalities.values():
            for c in range(m.size):
                by_id[m.offset + c] = f"<{m.prefix}{c}>"
        return [by_id[i] for i in sorted(by_id)]

"""Per-modality sampling settings and the generation budget.

A turn can mix text with spans of any modality, and what makes good sampling differs between them:
text wants a moderate temperature and nucleus sampling, SEED image codes and Encodec music codes
were sampled at temperature 1 in AnyGPT's release (lower temperatures collapse images into flat
colour and music into a drone), music needed top-k and a repetition penalty to stop looping.  So
every row of a batch carries its own :class:`SamplingSettings`, chosen by the generation state and
switched the moment a span's start token is generated (and switched back at its end marker).

The span defaults are each modality plugin's ``sampling`` (the built-in ones follow AnyGPT's released
``config/*_generate_config.json``: temperature 1, top-p 1, music top-k 200 with repetition penalty
1.15, speech repetition penalty 1.05); text, where a chat wants a little less randomness, uses
0.7 / 0.9.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable, Mapping

from anygpt import modalities as registry

TEXT_SETTINGS = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 512}


def mode_names() -> tuple[str, ...]:
    """Sampling modes: ``text`` and every registered modality, in registry order."""
    return ("text", *registry.names())


def __getattr__(name: str) -> Any:
    # ``MODES`` is asked for when used, so a plugin registered after import is a mode too.
    if name == "MODES":
        return mode_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick the next token while in one mode (text, or inside one modality's span).

    Attributes:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
        top_p: nucleus sampling; keep the smallest set of tokens whose probability reaches ``top_p``.
        top_k: keep only the ``top_k`` most likely tokens (0 = off).
        repetition_penalty: HF/CTRL-style penalty (> 1 discourages ids already in the sequence).
        max_tokens: most ids this mode may produce: for text, text tokens in the whole turn; for a
            modality, ids inside one span (a modality with K codebooks counts K ids per frame; a
            fixed-length span, such as an image's 32 codes, is always its length).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def default_settings() -> dict[str, SamplingSettings]:
    """Text's settings and each registered modality's (its plugin's ``sampling``), by mode name."""
    out = {"text": SamplingSettings(**TEXT_SETTINGS)}
    for name, plugin in registry.registered().items():
        try:
            out[name] = SamplingSettings(**plugin.sampling)
        except (TypeError, ValueError) as e:  # a plugin's typo must name the plugin
            raise ValueError(f"modality {name!r}: bad sampling defaults {plugin.sampling}: {e}") from None
    return out


@dataclass
class GenerationConfig:
    """Everything one ``generate`` call needs besides the prompt.

    Attributes:
        modes: mode name (``text`` or a modality) -> settings; modalities missing here use the text
            settings' sampling with no span limit beyond the budget.
        max_new_tokens: hard budget per row (the caller also caps it to the context length).
        constrained: mask ids so that output is always well-formed (see ``constraints``); off, the
            model samples freely and malformed spans are reported by the parser.
        outputs: what the answer may contain: ``None`` = text and every modality; else a subset of
            ``("text", "image", ...)``.  A task asking for one modality sets ``require`` too.
        require: the answer must be exactly one span of this modality (base-model tasks ``text|image``).
        include: modalities the answer must hold at least one span of, text allowed too (the
            OpenAI API's ``modalities: ["text", "audio"]``).
        min_new_tokens: ``<eom>`` (and, unconstrained, every stop token) is masked until this many
            ids were generated (benchmarks; AnyGPT's release used 10).
        seed: sampling seed (None = fresh randomness).
    """

    modes: dict[str, SamplingSettings] = field(default_factory=default_settings)
    max_new_tokens: int = 2048
    constrained: bool = True
    outputs: tuple[str, ...] | None = None
    require: str | None = None
    include: tuple[str, ...] = ()
    min_new_tokens: int = 0
    seed: int | None = None

    def settings(self, mode: str) -> SamplingSettings:
        return self.modes.get(mode) or self.modes.get("text") or SamplingSettings()

    def with_greedy(self) -> "GenerationConfig":
        """A copy whose every mode samples greedily (tests, benchmarks, reproducible runs)."""
        return replace(self, modes={k: replace(v, temperature=0.0) for k, v in self.modes.items()})


def apply_setting_overrides(modes: Mapping[str, SamplingSettings], overrides: Iterable[str]) -> dict[str, SamplingSettings]:
    """Apply ``MODE.FIELD=VALUE`` strings (``speech.temperature=0.8``, ``all.top_p=0.9``) to settings.

    ``all`` applies to every mode.  Unknown modes/fields and bad values raise ``ValueError`` naming
    the offending override, so a typo fails before a model is loaded.
    """
    out = dict(modes)
    names = {f.name: f for f in fields(SamplingSettings)}
    for item in overrides:
        key, sep, value = item.partition("=")
        mode, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"setting {item!r}: expected MODE.FIELD=VALUE, e.g. speech.temperature=0.8")
        if name not in names:
            raise ValueError(f"setting {item!r}: unknown field {name!r}; fields: {', '.join(names)}")
        known = mode_names()
        targets = list(known) if mode == "all" else [mode]
        if mode != "all" and mode not in known:
            raise ValueError(f"setting {item!r}: unknown mode {mode!r}; modes: {', '.join(known)}, all")
        kind = int if name in ("top_k", "max_tokens") else float
        try:
            parsed: Any = kind(value.strip())
        except ValueError:
            raise ValueError(f"setting {item!r}: {value!r} is not a valid {kind.__name__}") from None
        for t in targets:
            try:
                out[t] = replace(out.get(t, SamplingSettings()), **{name: parsed})
            except ValueError as e:
                raise ValueError(f"setting {item!r}: {e}") from None
    return out


def settings_table(modes: Mapping[str, SamplingSettings]) -> list[dict[str, Any]]:
    """Rows for printing (``/settings`` in the chat)."""
    return [{"mode": m, **asdict(s)} for m, s in modes.items()]

"""Sequence formats: one implementation of each, shared by training and inference."""
from anygpt.formats.segments import (
    Conversation,
    FormatIssue,
    Marker,
    Media,
    Parsed,
    Part,
    Rendered,
    SequenceFormat,
    Text,
    Turn,
    chain_of_modality,
)
from anygpt.formats.templates import DEFAULT_SYSTEM_PROMPT, instruction_pool, pretrain_pair

__all__ = [
    "Conversation", "FormatIssue", "Marker", "Media", "Parsed", "Part", "Rendered", "SequenceFormat", "Text",
    "Turn", "chain_of_modality", "DEFAULT_SYSTEM_PROMPT", "instruction_pool", "pretrain_pair",
]

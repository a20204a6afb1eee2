import random

import numpy as np
import pytest

from anygpt.formats import (Conversation, Marker, Media, SequenceFormat, Text, Turn, chain_of_modality,
                            instruction_pool, pretrain_pair)
from anygpt.formats.anygpt_strings import (AnyGPTStringError, codes_to_string, conversation_from_anygpt,
                                           conversation_to_anygpt, string_to_codes, string_to_parts)

RNG = np.random.default_rng(0)


def media(name, t=None):
    k, size, t0 = {"speech": (1, 1024, 25), "image": (1, 8192, 32), "music": (4, 2048, 6)}[name]
    return Media(name, RNG.integers(0, size, (k, t or t0)))


@pytest.fixture(scope="module")
def fmt(tiny_tokenizer, tiny_layout):
    return SequenceFormat(tiny_tokenizer, tiny_layout)


def sample_conversation():
    return Conversation(
        [
            Turn("user", [Text("Describe this picture: "), media("image")]),
            Turn("assistant", [Text("a red circle on the left.")]),
            Turn("user", [media("speech"), Text("and play some music")]),
            Turn("assistant", chain_of_modality("hello world", "here is a tune", media("music"))),
        ],
        system="You are AnyGPT.",
    )


def test_segments_round_trip(fmt):
    conv = sample_conversation()
    rendered = fmt.render(conv)
    parsed = fmt.parse(rendered.ids)
    assert parsed.issues == []
    assert parsed.conversation == conv


@pytest.mark.parametrize("modality", ["speech", "image", "music"])
@pytest.mark.parametrize("direction", ["x2text", "text2x"])
def test_stage1_pairs_round_trip(fmt, modality, direction):
    conv = pretrain_pair(modality, media(modality), "a blue square at the top", direction, random.Random(1))
    parsed = fmt.parse(fmt.render(conv, loss="all").ids)
    assert parsed.issues == [] and parsed.conversation == conv
    user, answer = conv.turns
    if direction == "x2text":
        assert isinstance(user.parts[-1], Media) and answer.parts == [Text("a blue square at the top")]
    else:
        assert user.parts[0].text.endswith("This is input: a blue square at the top")
        assert isinstance(answer.parts[0], Media)


def test_stage1_token_order(fmt, tiny_layout):
    conv = pretrain_pair("image", media("image"), "a red circle", "x2text", instruction="Describe the image.")
    ids = fmt.render(conv, loss="all").ids.tolist()
    lay = tiny_layout
    assert ids[0] == fmt.bos_id and ids[1] == lay.id("[Human]")
    soim = ids.index(lay.id("<soim>"))
    assert ids[soim + 33] == lay.id("<eoim>") and ids[soim + 34] == lay.id("<eoh>")
    assert ids[soim + 35] == lay.id("[AnyGPT]") and ids[-1] == lay.id("<eom>")


def test_loss_mask_covers_exactly_assistant_content(fmt, tiny_layout):
    conv = sample_conversation()
    r = fmt.render(conv, loss="assistant")
    # Rebuild expected mask: tokens of assistant parts plus their <eom>, nothing else.
    expected = [False]  # BOS
    expected += [False] * len(fmt.text_ids(conv.system))
    for turn in conv.turns:
        expected += [False] * len(fmt.turn_prefix(turn.role))
        n = sum(len(fmt.part_ids(p)) for p in turn.parts) + 1
        expected += [turn.role == "assistant"] * n
    assert r.loss_mask.tolist() == expected
    masked = r.ids[r.loss_mask]
    assert (masked == tiny_layout.id("<eom>")).sum() == 2
    assert tiny_layout.id("<eoh>") not in masked and tiny_layout.id("[AnyGPT]") not in masked
    everything = fmt.render(conv, loss="all")
    assert everything.loss_mask[1:].all() and not everything.loss_mask[0]


def test_prompt_is_a_prefix_of_the_training_sequence(fmt):
    conv = sample_conversation()
    full = fmt.render(conv).ids
    prompt = fmt.prompt(Conversation(conv.turns[:3], system=conv.system))
    assert np.array_equal(full[: len(prompt)], prompt)


def test_chain_of_modality_parts(fmt, tiny_layout):
    parts = chain_of_modality("turn on the light", "done", media("speech"))
    assert parts[0] == Marker("<-Ins->") and parts[2] == Marker("<-Res->")
    ids = np.concatenate([fmt.part_ids(p) for p in parts])
    back, issues = fmt.parse_parts(ids)
    assert issues == [] and back == parts


def test_malformed_spans_reported_with_position(fmt, tiny_layout):
    lay = tiny_layout
    img = fmt.part_ids(media("image"))
    # Unclosed span.
    parts, issues = fmt.parse_parts(img[:-1] + fmt.text_ids("hi"), start=100)
    assert len(issues) == 1 and issues[0].position == 100 and "not closed" in issues[0].message
    # Wrong length image.
    parts, issues = fmt.parse_parts(img[:10] + [lay.id("<eoim>")])
    assert any("9 codes, expected 32" in i.message for i in issues)
    # End marker without start and a stray modality id.
    stray = lay.modality("speech").offset + 3
    parts, issues = fmt.parse_parts(fmt.text_ids("x") + [lay.id("<eosp>"), stray])
    assert [i.position for i in issues] == [len(fmt.text_ids("x")), len(fmt.text_ids("x")) + 1]
    # Music off the codebook cycle, and mid-frame end.
    mus = fmt.part_ids(media("music", 2))
    swapped = mus.copy()
    swapped[1], swapped[2] = swapped[2], swapped[1]
    _, issues = fmt.parse_parts(swapped)
    assert issues and "codebook" in issues[0].message
    _, issues = fmt.parse_parts(mus[:-2] + [mus[-1]])
    assert any("mid-frame" in i.message for i in issues)
    # Whole-sequence problems never raise.
    r = fmt.render(sample_conversation()).ids
    for cut in range(0, len(r), 7):
        fmt.parse(np.delete(r, cut))


def test_instruction_pools_are_large_and_distinct():
    for modality in ("speech", "image", "music"):
        for direction in ("x2text", "text2x"):
            pool = instruction_pool(modality, direction)
            assert len(set(pool)) >= 30, (modality, direction)
            assert all("  " not in p and p[0].isupper() for p in pool)


def test_anygpt_strings_round_trip(tiny_layout):
    lay = tiny_layout
    for name in ("speech", "image", "music"):
        m = media(name)
        s = codes_to_string(lay, name, m.codes)
        assert s.startswith(lay.modality(name).start)
        back_name, codes = string_to_codes(lay, s)
        assert back_name == name and np.array_equal(codes, m.codes)
    s = codes_to_string(lay, "music", np.array([[1], [2], [3], [4]]))
    assert s == "<somu><🎶1><🎶2050><🎶4099><🎶6148><eomu>"


def test_anygpt_string_ids_match_tokenizer(tiny_tokenizer, tiny_layout, fmt):
    """Our arithmetic ids equal what the HF tokenizer gives for AnyGPT token strings."""
    m = media("music")
    s = codes_to_string(tiny_layout, "music", m.codes)
    hf = tiny_tokenizer.encode(s, add_special_tokens=False)
    assert hf == fmt.part_ids(m)


def test_anygpt_conversation_records(tiny_layout):
    record = {"conversation": [[
        {"role": "user", "message": "<sosp><🗣️1><🗣️1><🗣️3><eosp> Please reply"},
        {"role": "assistant", "message": "<-Ins-> hello, how are you\n <-Res-> I am fine <sosp><🗣️2><🗣️2><eosp>"},
    ]]}
    conv = conversation_from_anygpt(tiny_layout, record)
    assert conv.turns[0].parts[0] == Media("speech", np.array([[1, 1, 3]]))
    assert conv.turns[1].parts[0] == Marker("<-Ins->") and conv.turns[1].parts[2] == Marker("<-Res->")
    again = conversation_from_anygpt(tiny_layout, conversation_to_anygpt(tiny_layout, conv))
    assert again.turns == conv.turns
    with pytest.raises(AnyGPTStringError, match="<🗣️1024> out of range"):
        string_to_parts(tiny_layout, "<sosp><🗣️1024><eosp>")
    with pytest.raises(AnyGPTStringError, match="mid-frame"):
        string_to_parts(tiny_layout, "<somu><🎶1><🎶2050><eomu>")
    with pytest.raises(AnyGPTStringError, match="unknown role"):
        conversation_from_anygpt(tiny_layout, {"conversation": [{"role": "bot", "message": "x"}]})


# Today's pools, by length, first and last entry and a digest of all of them: the words moved into the
# plugins, the prompts a trained model saw must not change by one character.
KNOWN_POOLS = {
    ("image", "x2text"): (33, "Describe the image.", "Provide a brief caption for the photo.", "2a7e99bb3bd7fe66"),
    ("image", "text2x"): (33, "Draw an image of the following.", "Sketch a photo following the description.",
                          "5fd82864b14ae954"),
    ("speech", "x2text"): (33, "Transcribe the speech.", "Produce a transcript for the audio clip.", "2a7d05a57e0c4c20"),
    ("speech", "text2x"): (33, "Read the text aloud as a speech.", "Create an audio clip that says the text.",
                           "050d489904f74ecc"),
    ("music", "x2text"): (33, "Describe the music.", "Write one line about the track.", "143dda281266de43"),
    ("music", "text2x"): (33, "Compose a music from this description.", "Give me a track like this.",
                          "a6ba0714a150ec2d"),
}


@pytest.mark.parametrize("key", sorted(KNOWN_POOLS))
def test_instruction_pools_are_unchanged(key):
    import hashlib

    from anygpt.formats.templates import INSTRUCTIONS

    n, first, last, digest = KNOWN_POOLS[key]
    pool = instruction_pool(*key)
    assert (len(pool), pool[0], pool[-1]) == (n, first, last)
    assert hashlib.sha256("\n".join(pool).encode()).hexdigest()[:16] == digest
    assert INSTRUCTIONS[key] == pool


def test_instruction_pool_errors():
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        instruction_pool("video", "x2text")
    with pytest.raises(ValueError, match="direction"):
        instruction_pool("image", "sideways")


def test_anygpt_strings_of_a_subset_layout():
    """Spans are those of the layout: a speech-only layout parses speech spans, leaves others as text."""
    from anygpt.layout import VocabLayout

    lay = VocabLayout.default(320, ["speech"])
    parts = string_to_parts(lay, "hi <sosp><🗣️1><🗣️7><eosp> and <soim><👀1><eoim>")
    assert parts == [Text("hi "), Media("speech", np.array([[1, 7]])), Text(" and <soim><👀1><eoim>")]

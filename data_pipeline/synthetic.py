"""Tiny synthetic corpora shaped like the real ones, with broken files on purpose.

Used by the tests (one fixture per reader and per recipe), by ``anygpt bench data`` and by the demo:
each builder writes a few seconds of tones and small pictures into a directory laid out like the
public corpus (LibriSpeech, MLS, Common Voice, img2dataset tars, JourneyDB, GigaSpeech, MusicCaps,
AnyInstruct) and returns a :class:`Corpus` that says which samples must come out and which inputs
must be skipped for which reason, so a test can check the accounting exactly.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

PathLike = Union[str, Path]


@dataclass
class Corpus:
    """A generated corpus: pass ``source``/``input``/``options`` to the pipeline, compare with the rest.

    Attributes:
        options: extra :class:`~data_pipeline.options.PreprocessOptions` settings the expectations
            assume (e.g. a ``max_seconds`` filter), as dotted ``filters.max_seconds`` style keys.
        keys: ``__key__`` of every sample that must be written, in output order.
        skips: expected ``skipped_by_reason``.
    """

    source: str
    input: Path
    keys: list[str]
    skips: dict[str, int]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def inputs(self) -> int:
        return len(self.keys) + sum(self.skips.values())


# ------------------------------------------------------------------------------- media files
def tone(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """A tone with a seed-dependent pitch plus a little noise (so codes differ between files)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    f0 = 150.0 + 40.0 * (seed % 17)
    wav = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal(t.shape)
    return wav.astype(np.float32)


def write_audio(path: PathLike, seconds: float = 1.0, sample_rate: int = 16000, seed: int = 0,
                channels: int = 1) -> Path:
    """WAV/FLAC/MP3/OGG by suffix (libsndfile)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = tone(seconds, sample_rate, seed)
    if channels > 1:
        wav = np.stack([wav] * channels, axis=1)
    sf.write(str(path), wav, sample_rate)
    return path


def image_bytes(size: tuple[int, int] = (48, 40), seed: int = 0, fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, size=3)
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 255, size=3)[None, None, :]
    arr = np.clip(base[None, None, :] * 0.5 + grad + rng.integers(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: PathLike, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(image_bytes(size, seed, fmt))
    return path


def write_corrupt(path: PathLike, kind: str = "garbage") -> Path:
    """A broken media file: ``garbage`` (not the format), ``empty`` (0 bytes) or ``truncated`` (a PNG cut short)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(image_bytes((64, 64), 99)[:150])
    else:
        path.write_bytes(b"RIFF\x00\x00\x00\x00this is not media at all" * 3)
    return path


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------- corpora
def manifest_corpus(root: PathLike, fmt: str = "jsonl", broken: bool = True, n: int = 2) -> Corpus:
    """``id,text,<modality>`` rows with pairs of every built-in modality (+ one broken input per kind)."""
    root = Path(root)
    rows: list[dict] = []
    keys = []
    for i in range(n):
        write_audio(root / f"wav/sp{i}.wav", 0.6, 16000, i)
        rows.append({"id": f"sp{i}", "text": f"spoken words {i}", "speech": f"wav/sp{i}.wav"})
        keys.append(f"sp{i}")
    for i in range(n):
        write_image(root / f"img/im{i}.png", (40 + 8 * i, 36), seed=10 + i)
        rows.append({"id": f"im{i}", "text": f"a picture number {i}", "image": f"img/im{i}.png"})
        keys.append(f"im{i}")
    write_audio(root / "music/mu0.wav", 0.5, 44100, 3, channels=2)
    rows.append({"id": "mu0", "text": "a calm piano tune", "music": "music/mu0.wav"})
    keys.append("mu0")
    skips: Counter = Counter()
    if broken:
        write_corrupt(root / "wav/corrupt.wav")
        write_corrupt(root / "img/empty.png", "empty")
        write_corrupt(root / "img/truncated.png", "truncated")
        write_audio(root / "wav/long.wav", 2.5, 16000, 7)
        rows += [
            {"id": "missing", "text": "no file", "speech": "wav/does_not_exist.wav"},
            {"id": "corrupt", "text": "garbage audio", "speech": "wav/corrupt.wav"},
            {"id": "empty_png", "text": "empty picture", "image": "img/empty.png"},
            {"id": "trunc_png", "text": "cut picture", "image": "img/truncated.png"},
            {"id": "no_text", "text": "  ", "speech": "wav/sp0.wav"},
            {"id": "too_long", "text": "long audio", "speech": "wav/long.wav"},
            {"id": "no_media", "text": "only words"},
        ]
        skips.update({"missing_file": 1, "unreadable_media": 3, "empty_text": 1, "too_long": 1, "no_media": 1})
    if fmt == "jsonl":
        path = root / "manifest.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            if broken:
                fh.write('{"id": "broken", "text": \n')
                skips["bad_record"] += 1
    else:
        path = root / f"manifest.{fmt}"
        cols = list(dict.fromkeys(k for r in rows for k in r))  # id, text, then the media columns
        with open(path, "w", encoding="utf-8", newline="") as fh:
            delim = "\t" if fmt == "tsv" else ","
            w = csv.writer(fh, delimiter=delim, quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
                           escapechar="\\" if fmt == "tsv" else None)
            w.writerow(cols)
            for r in rows:
                w.writerow([r.get(c, "") for c in cols])
            if broken:
                fh.write(delim.join(["short", "row"]) + "\n")
                skips["bad_record"] += 1
    return Corpus("manifest", path, keys, dict(skips), {"filters.max_seconds": 2.0})


def librispeech_corpus(root: PathLike) -> Corpus:
    """``SPK/CHAP/SPK-CHAP.trans.txt`` + FLACs; one utterance without audio, one corrupt FLAC."""
    root = Path(root)
    keys = []
    for spk, chap in (("19", "198"), ("84", "121123")):
        d = root / "train-clean-5" / spk / chap
        lines = []
        for k in range(2):
            utt = f"{spk}-{chap}-{k:04d}"
            write_audio(d / f"{utt}.flac", 0.5 + 0.1 * k, 16000, int(spk) + k)
            lines.append(f"{utt} THE WORDS OF UTTERANCE {k}")
            keys.append(utt)
        if spk == "84":
            lines.append(f"{spk}-{chap}-0002 THIS ONE HAS NO AUDIO")
            write_corrupt(d / f"{spk}-{chap}-0003.flac")
            lines.append(f"{spk}-{chap}-0003 THIS ONE IS CORRUPT")
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Corpus("librispeech", root, keys, {"missing_file": 1, "unreadable_media": 1})


def mls_corpus(root: PathLike) -> Corpus:
    """MLS: ``train/transcripts.txt`` (``SPK_BOOK_SEG<TAB>text``) + ``train/audio/SPK/BOOK/*.flac``."""
    root = Path(root)
    split = root / "train"
    lines, keys = [], []
    for spk, book in (("4800", "10003"), ("5678", "2222")):
        for seg in range(2):
            utt = f"{spk}_{book}_{seg:06d}"
            write_audio(split / "audio" / spk / book / f"{utt}.flac", 1.2, 16000, seg + int(book) % 7)
            lines.append(f"{utt}\tthe text of segment {seg} of book {book}")
            keys.append(utt)
    lines.append("4800_10003_000009\tmissing audio for this one")
    write_audio(split / "audio" / "4800" / "10003" / "4800_10003_000005.flac", 1.2, 16000, 8)
    lines.append("4800_10003_000005\t")  # an empty transcript
    write_audio(split / "audio" / "4800" / "10003" / "4800_10003_000010.flac", 0.4, 16000, 3)
    lines.append("4800_10003_000010\ttoo short a clip")
    (split / "transcripts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Corpus("librispeech", root, keys, {"missing_file": 1, "empty_text": 1, "too_short": 1},
                  {"filters.min_seconds": 1.0})


def commonvoice_corpus(root: PathLike, audio_ext: str = ".mp3") -> Corpus:
    """Common Voice locale dir: ``validated.tsv`` + ``clips/*.mp3`` (quotes in sentences, votes, one bad clip)."""
    root = Path(root)
    header = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
              "gender", "accents", "variant", "locale", "segment"]
    rows, keys = [], []
    sentences = ['He said "hello" and left.', "It's a fine day", "Numbers like 3 are fine"]
    for i, s in enumerate(sentences):
        name = f"common_voice_en_{1000 + i}{audio_ext}"
        write_audio(root / "clips" / name, 0.8, 48000 if i == 0 else 32000, i)
        rows.append([f"client{i}", name, f"s{i}", s, "", str(2 + i), "0", "twenties", "", "", "", "en", ""])
        keys.append(f"common_voice_en_{1000 + i}")
    write_corrupt(root / "clips" / f"common_voice_en_2000{audio_ext}")
    rows.append(["client9", f"common_voice_en_2000{audio_ext}", "s9", "A broken clip", "", "2", "0", "", "", "", "", "en", ""])
    write_audio(root / "clips" / f"common_voice_en_2001{audio_ext}", 0.8, 32000, 5)
    rows.append(["client9", f"common_voice_en_2001{audio_ext}", "s10", "", "", "2", "0", "", "", "", "", "en", ""])
    with open(root / "validated.tsv", "w", encoding="utf-8") as fh:
        fh.write("\t".join(header) + "\n")
        for r in rows:
            fh.write("\t".join(r) + "\n")
    (root / "train.tsv").write_text("\t".join(header) + "\n" + "\t".join(rows[0]) + "\n", encoding="utf-8")
    return Corpus("commonvoice", root, keys, {"unreadable_media": 1, "empty_text": 1})


def wds_pairs_corpus(root: PathLike, score_field: Optional[str] = None) -> Corpus:
    """img2dataset output: ``00000.tar`` (KEY.jpg + KEY.txt + KEY.json) and a second tar that is not a tar.

    With ``score_field`` (LAION-Aesthetics), every ``.json`` carries that score and ``punsafe``; one
    sample scores below 5 (expected ``meta_filtered`` under the recipe's bound).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    skips: Counter = Counter()
    with tarfile.open(root / "00000.tar", "w") as tf:
        for i in range(4):
            key = f"0000{i:05d}"
            meta = {"url": f"http://example.com/{i}.jpg", "key": key, "status": "success", "caption": f"caption in json {i}",
                    "width": 80, "height": 64, "original_width": 640, "original_height": 480, "similarity": 0.31}
            if score_field:
                meta[score_field] = 6.1 if i != 2 else 4.2
                meta["punsafe"] = 0.01
            _tar_add(tf, f"{key}.jpg", image_bytes((80, 64), 20 + i, "JPEG"))
            if i != 1:  # sample 1 has its caption only in the json
                _tar_add(tf, f"{key}.txt", f"a photo of thing number {i}".encode())
            _tar_add(tf, f"{key}.json", json.dumps(meta).encode())
            if score_field and i == 2:
                skips["meta_filtered"] += 1
            else:
                keys.append(key)
        _tar_add(tf, "000000010.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        _tar_add(tf, "000000010.txt", b"a broken jpeg")
        _tar_add(tf, "000000010.json", json.dumps({"url": "u", score_field or "x": 7.0, "punsafe": 0.0}).encode())
        skips["unreadable_media"] += 1
        _tar_add(tf, "000000011.txt", b"caption without an image")
        skips["no_media"] += 1
        _tar_add(tf, "000000012.jpg", image_bytes((80, 64), 30, "JPEG"))
        _tar_add(tf, "000000012.txt", b"")
        _tar_add(tf, "000000012.json", json.dumps({"url": "u", "caption": "", score_field or "x": 7.0, "punsafe": 0.0}).encode())
        skips["empty_text"] += 1
    (root / "00001.tar").write_bytes(b"this is not a tar archive" * 40)
    skips["unreadable_archive"] += 1
    return Corpus("wds-pairs", root, keys, dict(skips))


def journeydb_corpus(root: PathLike) -> Corpus:
    """JourneyDB: annotation JSONL (``img_path``, ``prompt``, ``Task2.Caption``) + ``imgs/``."""
    root = Path(root)
    recs, keys = [], []
    for i in range(3):
        rel = f"./00{i}/{'abcdef'[i]}{i}.jpg"
        write_image(root / "imgs" / rel, (72, 64), 40 + i)
        rec = {"img_path": rel, "prompt": f"midjourney prompt {i}, 8k, trending", "Task1": {"Style": ["photo"], "Content": ["cat"]},
               "Task2": {"Caption": f"A caption describing picture {i}."}}
        if i == 1:
            del rec["Task2"]  # falls back to the prompt
        recs.append(rec)
        keys.append(f"__00{i}_{'abcdef'[i]}{i}_jpg")
    recs.append({"img_path": "./009/missing.jpg", "prompt": "an image that is not there", "Task2": {"Caption": "missing"}})
    write_image(root / "imgs" / "010" / "tiny.jpg", (20, 20), 5)
    recs.append({"img_path": "./010/tiny.jpg", "prompt": "a tiny image", "Task2": {"Caption": "too small to use"}})
    path = root / "train_anno_realease_repath.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return Corpus("manifest", path, keys, {"missing_file": 1, "image_too_small": 1})


def gigaspeech_corpus(root: PathLike) -> Corpus:
    """GigaSpeech HF layout: per-segment metadata CSV + ``audio/SEGMENT_ID.wav``; tags for punctuation/garbage."""
    root = Path(root)
    header = ["segment_id", "speaker", "text", "begin_time", "end_time", "audio_id", "title", "url", "source",
              "category", "original_full_path"]
    texts = {"POD0000000001_S0000008": "AS THEY'RE LEAVING <COMMA> CAN KASH PULL ZAHRA ASIDE <QUESTIONMARK>",
             "POD0000000001_S0000017": "BUT IT WAS NOT TO BE <PERIOD>",
             "YOU0000000315_S0000660": "<SIL>",
             "YOU0000000315_S0000661": "<MUSIC>",
             "AUD0000001556_S0000014": "IT IS TOO SHORT <PERIOD>"}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "xs_metadata.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i, (sid, text) in enumerate(texts.items()):
            write_audio(root / "audio" / f"{sid}.wav", 0.5 if "SHORT" in text else 1.3, 16000, i)
            w.writerow([sid, "N/A", text, "10.0", "11.3", sid.split("_")[0], "t", "u", "podcast", "People", "x.opus"])
    keys = ["POD0000000001_S0000008", "POD0000000001_S0000017"]
    return Corpus("manifest", root / "xs_metadata.csv", keys, {"text_filtered": 2, "too_short": 1})


def musiccaps_corpus(root: PathLike) -> Corpus:
    """MusicCaps CSV (``ytid,start_s,end_s,...,caption``) + ``audio/YTID.wav`` clips (one 12 s clip is clipped)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    header = ["ytid", "start_s", "end_s", "audioset_positive_labels", "aspect_list", "caption", "author_id",
              "is_balanced_subset", "is_audioset_eval"]
    rows = [["-0Gj8-vB1q4", "30", "40", "/m/0140xf", "['low quality', 'sustained strings']",
             "The low quality recording features a ballad song that contains sustained strings.", "4", "False", "True"],
            ["-0SdAVK79lg", "30", "40", "/m/0155w", "['guitar song']", "This song features an electric guitar as the main instrument.", "0", "False", "False"],
            ["-0vPFx-wRRI", "30", "40", "/m/025_jnm", "['a cappella']", "Short.", "6", "False", "True"],
            ["-0xzrMun0Rs", "30", "40", "/m/01g90h", "['missing clip']", "A clip whose audio was never downloaded.", "1", "False", "False"]]
    for i, r in enumerate(rows[:3]):
        write_audio(root / "audio" / f"{r[0]}.wav", 12.0 if i == 0 else 2.5, 32000 if i else 48000, i)
    with open(root / "musiccaps-public.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return Corpus("manifest", root / "musiccaps-public.csv", ["-0Gj8-vB1q4", "-0SdAVK79lg"],
                  {"text_too_short": 1, "missing_file": 1})


def conversations_corpus(root: PathLike) -> Corpus:
    """AnyInstruct-style dialogues whose turns refer to media files of each built-in modality."""
    root = Path(root)
    write_audio(root / "speech" / "q0.wav", 0.7, 16000, 1)
    write_audio(root / "speech" / "a0.wav", 0.6, 24000, 2)
    write_image(root / "images" / "p0.png", (48, 48), 3)
    write_audio(root / "music" / "m0.wav", 0.5, 32000, 4)
    recs = [
        {"id": "chat-0", "conversation": [
            {"role": "user", "content": [{"speech": "speech/q0.wav"}, {"text": "What is in this picture?"}, {"image": "images/p0.png"}]},
            {"role": "assistant", "content": [{"text": "<-Ins-> what is in this picture <-Res-> A small square."},
                                              {"speech": "speech/a0.wav"}]}]},
        {"id": "chat-1", "conversation": [
            {"role": "system", "content": "You are a music assistant."},
            {"role": "user", "message": "Play something calm."},
            {"role": "assistant", "message": "Here it is:", "music": "music/m0.wav"}]},
        {"id": "chat-missing", "conversation": [
            {"role": "user", "content": [{"image": "images/nope.png"}, {"text": "describe"}]},
            {"role": "assistant", "content": "Nothing."}]},
        {"id": "chat-badrole", "conversation": [{"role": "narrator", "content": "once upon a time"}]},
        {"id": "chat-empty", "conversation": []},
    ]
    path = root / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return Corpus("conversations", path, ["chat-0", "chat-1"], {"missing_file": 1, "bad_record": 2})


def anygpt_jsonl_corpus(root: PathLike) -> Corpus:
    """AnyGPT token strings: pretraining pairs, an SFT conversation, and broken strings."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    img = "<soim>" + "".join(f"<👀{(i * 37) % 8192}>" for i in range(32)) + "<eoim>"
    sp = "<sosp>" + "".join(f"<🗣️{(i * 11) % 1024}>" for i in range(20)) + "<eosp>"
    mu = "<somu>" + "".join(f"<🎶{2048 * (i % 4) + (i * 5) % 2048}>" for i in range(12)) + "<eomu>"
    recs = [
        {"id": "pair-image", "text": "a red bus", "image": img},
        {"id": "pair-speech", "text": "hello world", "speech": sp},
        {"id": "pair-music", "text": "a slow waltz", "music": mu},
        {"id": "sft-0", "conversation": [
            {"role": "user", "message": "Say this: " + sp},
            {"role": "assistant", "message": "<-Ins-> say this <-Res-> Sure. " + sp}]},
        {"id": "bad-range", "text": "an id out of range", "image": img.replace("<👀0>", "<👀9000>")},
        {"id": "bad-frame", "text": "music cut mid frame", "music": "<somu><🎶1><🎶2049><🎶4097><eomu>"},
        {"id": "bad-role", "conversation": [{"role": "robot", "message": "hi"}]},
        {"id": "no-media", "text": "just text"},
    ]
    path = root / "anygpt.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.write("not json at all\n")
    return Corpus("anygpt-jsonl", path, ["pair-image", "pair-speech", "pair-music", "sft-0"],
                  {"codes_out_of_range": 1, "bad_token_string": 2, "no_media": 1, "bad_record": 1})


def speech_image_manifest(root: PathLike, n: int, seconds: float = 1.0) -> Path:
    """A clean manifest of ``n`` alternating speech/image pairs (benchmarks, resume tests)."""
    root = Path(root)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            write_audio(root / "wav" / f"s{i}.wav", seconds, 16000, i)
            rows.append({"id": f"s{i:05d}", "text": f"utterance number {i}", "speech": f"wav/s{i}.wav"})
        else:
            write_image(root / "img" / f"i{i}.png", (64, 48), i)
            rows.append({"id": f"i{i:05d}", "text": f"picture number {i}", "image": f"img/i{i}.png"})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


__all__ = ["Corpus", "tone", "write_audio", "write_image", "image_bytes", "write_corrupt", "manifest_corpus",
           "librispeech_corpus", "mls_corpus", "commonvoice_corpus", "wds_pairs_corpus", "journeydb_corpus",
           "gigaspeech_corpus", "musiccaps_corpus", "conversations_corpus", "anygpt_jsonl_corpus",
           "speech_image_manifest"]

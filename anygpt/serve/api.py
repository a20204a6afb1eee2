"""``/v1/chat/completions`` and ``/v1/models`` in the OpenAI formats, on the shared chat session.

Request (the chat-completions body; unknown fields are ignored):

- ``messages``: ``system``/``developer`` (the system prompt), ``user`` and ``assistant`` turns; the
  last one is the user's.  User content is a string or parts: ``text``; ``image_url`` with a
  ``data:`` URL (base64) or, only when the server was started with ``--media-root DIR``, a
  ``file:`` URL of a file inside DIR (any other scheme or place is refused: a client can never make
  the server read arbitrary files); ``input_audio`` (``{"data": base64, "format": "wav"|"flac"}``,
  read as spoken audio); and the extension part ``{"type": "anygpt_media", "anygpt_media":
  {"modality": M, "mime_type": ..., "data": base64}}`` for any modality of the model (music ...).
- ``modalities``: what the answer may hold: ``"text"``, ``"audio"`` (the model's spoken modality,
  returned as ``message.audio``) and any modality name of the model; each non-text one is *required*
  (the answer holds at least one span of it), as the official API does for audio.  Absent: the model
  chooses freely.  ``audio: {"format": "wav"|"flac"}`` picks the audio format (``voice`` names are
  accepted and ignored; the extension ``anygpt_voice: {"data": base64, "format": ...}`` gives a
  recording whose voice speech answers use).
- ``temperature``, ``top_p`` (every mode), ``max_tokens`` / ``max_completion_tokens`` (the answer's
  budget, at most the server's ``--max-new-tokens``), ``seed``, ``stream``
  (+ ``stream_options.include_usage``); ``n`` must be 1.

Response: a ``chat.completion``; ``message.content`` holds the answer's text, or is null with
``message.audio`` = ``{"id", "data" (base64), "expires_at", "transcript"}`` when audio was asked for,
as in the official API.  Generated media the official format has no field for (images, music, and
speech that was not asked for as audio) come in the extension field ``message.anygpt_media``: a list
of ``{"modality", "mime_type", "data" (base64), "seconds"}`` in answer order, so a client that ignores
it still works; notices (a span that could not be rendered) in ``message.anygpt_notes``.
``stream: true`` sends ``chat.completion.chunk`` events (SSE): text deltas as they are generated,
then one chunk whose delta carries ``audio`` / ``anygpt_media``, the finishing chunk, optionally the
usage chunk, and ``data: [DONE]``.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status: 400 (bad JSON, bad
base64, unreadable or unsupported media, unsupported part type, a prompt longer than the context),
401 (missing or wrong API key), 403 (a ``file:`` URL outside the media root), 404 (unknown model),
413 (body or decoded media over the limits), 429 (queue full); the server goes on serving.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import mimetypes
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

import soundfile as sf

from anygpt import modalities as registry
from anygpt.formats import Part, Text, Turn
from anygpt.infer.chat import ChatAnswer
from anygpt.infer.generation import ContextError, Event
from anygpt.infer.mediaio import MediaInputError, modality_for_file, spoken_modality
from anygpt.infer.settings import GenerationConfig
from anygpt.modalities.plugin import AudioModality, ImageModality, Modality
from anygpt.serve.engine import Busy, Engine, turn_config
from anygpt.serve.limits import MIB

AUDIO_FORMATS = {"wav": ".wav", "flac": ".flac"}
MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".png": "image/png", ".npy": "application/x-npy"}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)",
                       re.DOTALL)


class ApiError(Exception):
    """A request the API refuses: HTTP status plus the fields of the OpenAI error object."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def mime_of(path: Path) -> str:
    return MIME.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def suffix_of_mime(mime: str) -> str:
    """``image/png`` -> ``.png``, ``audio/x-wav`` -> ``.wav`` (the subtype when mimetypes does not know it)."""
    known = {v: k for k, v in MIME.items()}
    if mime in known:
        return known[mime]
    ext = mimetypes.guess_extension(mime, strict=False)
    if ext:
        return ".jpg" if ext in (".jpe", ".jfif") else ext
    return "." + mime.split("/", 1)[-1].removeprefix("x-").split("+")[0]


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class MediaInput:
    """One media item of a request, written to the request's directory and read in the model's turn."""

    modality: str
    path: Path
    param: str


@dataclass
class ChatRequest:
    """A validated request: turns with media still as files, the turn's config and output options."""

    turns: list[tuple[str, list[Part | MediaInput]]]  # (role, parts); the last is the user's
    system: str | None
    config: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    audio_modality: str | None = None  # returned as message.audio (asked for with "audio")
    audio_format: str = "wav"
    voice: MediaInput | None = None
    workdir: Path | None = None


class RequestReader:
    """Turns one request body into a :class:`ChatRequest` (``ApiError`` for anything wrong).

    Media bytes are decoded and size-checked here, before the request waits for the model; reading
    them through a codec happens in the model's turn.
    """

    def __init__(self, engine: Engine, workdir: Path) -> None:
        self.engine = engine
        self.layout = engine.layout
        self.workdir = workdir
        self.count = 0

    # ------------------------------------------------------------------ media
    def _bytes(self, data: Any, param: str) -> bytes:
        if not isinstance(data, str):
            raise ApiError(400, f"{param}: expected a base64 string", "invalid_base64", param)
        limit = self.engine.limits.media_bytes
        compact = "".join(data.split())
        if len(compact) * 3 // 4 > limit:
            raise ApiError(413, f"{param}: media larger than the server's limit of {limit / MIB:g} MiB",
                           "media_too_large", param)
        try:
            return base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{param}: invalid base64 data", "invalid_base64", param) from None

    def _write(self, raw: bytes, suffix: str, modality: str, param: str) -> MediaInput:
        if not raw:
            raise ApiError(400, f"{param}: empty media", "invalid_media", param)
        self.count += 1
        path = self.workdir / f"in{self.count:02d}{suffix}"
        path.write_bytes(raw)
        return MediaInput(modality, path, param)

    def _modality(self, suffix: str, family: type[Modality], param: str) -> str:
        try:
            return modality_for_file(self.layout, suffix, family)
        except MediaInputError as e:
            raise ApiError(400, f"{param}: {e}", "unsupported_media", param) from None

    def image_url(self, part: dict[str, Any], param: str) -> MediaInput:
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{param}.image_url.url: expected a data: or file: URL", "invalid_value", param)
        if url.startswith("data:"):
            m = _DATA_URL.fullmatch(url)
            if m is None or not m.group("b64"):
                raise ApiError(400, f"{param}: expected data:<mime>;base64,<data>", "invalid_image_url", param)
            suffix = suffix_of_mime(m.group("mime") or "application/octet-stream")
            modality = self._modality(suffix, ImageModality, param)
            return self._write(self._bytes(m.group("data"), param), suffix, modality, param)
        if url.startswith("file:"):
            path = self._local_file(url, param)
            return MediaInput(self._modality(path.suffix, ImageModality, param), path, param)
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise ApiError(400, f"{param}: URL scheme {scheme!r} is not served; send a data: URL"
                            + (" or a file: URL under the media root" if self.engine.media_root else ""),
                       "unsupported_url", param)

    def _local_file(self, url: str, param: str) -> Path:
        root = self.engine.media_root
        if root is None:
            raise ApiError(403, f"{param}: file: URLs are off (the server was started without --media-root)",
                           "file_urls_disabled", param)
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"{param}: file: URLs name a local path (file:///...)", "unsupported_url", param)
        try:
            path = Path(unquote(parsed.path)).resolve(strict=True)
        except (OSError, RuntimeError):
            raise ApiError(400, f"{param}: no such file under the media root", "invalid_media", param) from None
        if not path.is_relative_to(root):  # after resolving: no "..", no symlink out of the root
            raise ApiError(403, f"{param}: file outside the media root", "file_outside_media_root", param)
        if not path.is_file():
            raise ApiError(400, f"{param}: not a file", "invalid_media", param)
        if path.stat().st_size > self.engine.limits.media_bytes:
            raise ApiError(413, f"{param}: file larger than the server's media limit", "media_too_large", param)
        return path

    def audio(self, spec: Any, param: str, family: type[Modality] = AudioModality,
              modality: str | None = None) -> MediaInput:
        if not isinstance(spec, dict):
            raise ApiError(400, f"{param}: expected {{\"data\": base64, \"format\": \"wav\"}}", "invalid_value", param)
        fmt = str(spec.get("format", "wav")).lower()
        if fmt not in AUDIO_FORMATS:
            raise ApiError(400, f"{param}.format: {fmt!r} is not supported (use {' or '.join(AUDIO_FORMATS)})",
                           "unsupported_media", param)
        suffix = AUDIO_FORMATS[fmt]
        modality = modality or self._modality(suffix, family, param)
        return self._write(self._bytes(spec.get("data"), param), suffix, modality, param)

    def extension_media(self, spec: Any, param: str) -> MediaInput:
        if not isinstance(spec, dict) or spec.get("modality") not in self.layout.modalities:
            has = ", ".join(self.layout.modalities) or "none"
            raise ApiError(400, f"{param}.modality: one of the model's modalities ({has})", "invalid_value", param)
        suffix = suffix_of_mime(str(spec.get("mime_type") or "application/octet-stream"))
        if suffix not in registry.get(spec["modality"]).suffixes:
            raise ApiError(400, f"{param}.mime_type: {spec['modality']} does not read {suffix} files",
                           "unsupported_media", param)
        return self._write(self._bytes(spec.get("data"), param), suffix, spec["modality"], param)

    # ------------------------------------------------------------------ messages
    def text_of(self, content: Any, param: str) -> str:
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            out = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
                    raise ApiError(400, f"{param}[{j}]: only text parts are read here", "unsupported_content",
                                   f"{param}[{j}]")
                out.append(str(part.get("text") or part.get("refusal") or ""))
            return "".join(out)
        raise ApiError(400, f"{param}: expected a string or a list of parts", "invalid_value", param)

    def user_parts(self, content: Any, param: str) -> list[Part | MediaInput]:
        if isinstance(content, str):
            return [Text(content)] if content else []
        if not isinstance(content, list):
            raise ApiError(400, f"{param}: expected a string or a list of parts", "invalid_value", param)
        parts: list[Part | MediaInput] = []
        for j, part in enumerate(content):
            where = f"{param}[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}.text: expected a string", "invalid_value", where)
                parts.append(Text(part["text"]))
            elif kind == "image_url":
                parts.append(self.image_url(part, where))
            elif kind == "input_audio":
                parts.append(self.audio(part.get("input_audio"), where))
            elif kind == "anygpt_media":
                parts.append(self.extension_media(part.get("anygpt_media"), where))
            else:
                raise ApiError(400, f"{where}: unsupported content part type {kind!r} (supported: text, image_url, "
                                    f"input_audio, anygpt_media)", "unsupported_content", where)
        return parts

    def read(self, body: Any) -> ChatRequest:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_json")
        model = body.get("model")
        if model != self.engine.model_id:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {self.engine.model_id!r}",
                           "model_not_found", "model")
        if body.get("n", 1) != 1:
            raise ApiError(400, "n: only one choice per request", "invalid_value", "n")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: expected a non-empty list", "invalid_value", "messages")
        system: list[str] = []
        turns: list[tuple[str, list[Part | MediaInput]]] = []
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, dict):
                raise ApiError(400, f"{where}: expected an object", "invalid_value", where)
            role = msg.get("role")
            if role in ("system", "developer"):
                system.append(self.text_of(msg.get("content"), f"{where}.content"))
            elif role == "user":
                turns.append(("user", self.user_parts(msg.get("content"), f"{where}.content")))
            elif role == "assistant":
                text = self.text_of(msg.get("content"), f"{where}.content")
                turns.append(("assistant", [Text(text)] if text else []))
            else:
                raise ApiError(400, f"{where}.role: {role!r} is not supported (system, developer, user, assistant)",
                               "unsupported_role", f"{where}.role")
        if not turns or turns[-1][0] != "user":
            raise ApiError(400, "messages: the last message must be the user's", "invalid_value", "messages")
        if not turns[-1][1]:
            raise ApiError(400, f"messages[{len(messages) - 1}].content: empty message", "invalid_value",
                           f"messages[{len(messages) - 1}].content")
        outputs, include, audio_modality = self.modalities(body.get("modalities"))
        audio_format = "wav"
        audio = body.get("audio")
        if audio is not None:
            fmt = audio.get("format", "wav") if isinstance(audio, dict) else None
            if fmt not in AUDIO_FORMATS:
                raise ApiError(400, f"audio.format: {fmt!r} is not supported (use {' or '.join(AUDIO_FORMATS)})",
                               "unsupported_value", "audio.format")
            audio_format = fmt
        voice = None
        if body.get("anygpt_voice") is not None:
            voice_of = self.engine.media.voice_modality
            if voice_of is None:
                raise ApiError(400, "anygpt_voice: this model has no modality that takes a voice prompt",
                               "unsupported_value", "anygpt_voice")
            voice = self.audio(body["anygpt_voice"], "anygpt_voice", modality=voice_of)
        config = self.config(body, outputs, include)
        stream_options = body.get("stream_options") or {}
        return ChatRequest(
            turns=turns, system="\n".join(t for t in system if t) or None, config=config,
            stream=bool(body.get("stream", False)),
            include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
            audio_modality=audio_modality, audio_format=audio_format, voice=voice, workdir=self.workdir)

    def modalities(self, value: Any) -> tuple[tuple[str, ...] | None, tuple[str, ...], str | None]:
        """``modalities`` -> (outputs allowed, modalities required, the one returned as message.audio)."""
        if value is None:
            return None, (), None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ApiError(400, "modalities: expected a list such as [\"text\", \"audio\"]", "invalid_value", "modalities")
        outputs: list[str] = []
        audio_modality = None
        for v in value:
            if v == "audio":
                audio_modality = spoken_modality(self.layout)
                if audio_modality is None:
                    raise ApiError(400, "modalities: this model does not speak (no spoken audio modality)",
                                   "unsupported_value", "modalities")
                v = audio_modality
            elif v != "text" and v not in self.layout.modalities:
                raise ApiError(400, f"modalities: {v!r} is not one of text, audio, "
                                    f"{', '.join(self.layout.modalities)}", "unsupported_value", "modalities")
            if v not in outputs:
                outputs.append(v)
        return tuple(outputs), tuple(m for m in outputs if m != "text"), audio_modality

    def config(self, body: dict[str, Any], outputs: tuple[str, ...] | None, include: tuple[str, ...]) -> GenerationConfig:
        def number(name: str, kind: type, lo: float, hi: float | None) -> Any:
            value = body.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ApiError(400, f"{name}: expected a number", "invalid_value", name)
            if value < lo or (hi is not None and value > hi):
                raise ApiError(400, f"{name}: {value} is outside [{lo}, {hi if hi is not None else 'inf'}]",
                               "invalid_value", name)
            return kind(value)

        top_p = number("top_p", float, 0.0, 1.0)
        if top_p == 0.0:
            raise ApiError(400, "top_p: must be above 0", "invalid_value", "top_p")
        budget = number("max_completion_tokens", int, 1, None) or number("max_tokens", int, 1, None)
        try:
            return turn_config(self.engine.config, temperature=number("temperature", float, 0.0, 2.0), top_p=top_p,
                               max_new_tokens=budget, seed=number("seed", int, 0, 2**63 - 1),
                               outputs=outputs, include=include)
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_value") from None


# ---------------------------------------------------------------------------------------------- a turn


def _media_error(item: MediaInput, e: Exception) -> ApiError:
    # The messages name the request's temporary file; the client knows its part by the param.
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ApiError(400, msg.replace(str(item.path), item.param), "invalid_media", item.param)


def execute(engine: Engine, req: ChatRequest, on_event: Callable[[Event], None] | None = None,
            ready: Callable[[], None] | None = None) -> ChatAnswer:
    """Run one request in the model's turn: read its media through the codecs, check the prompt fits,
    call ``ready`` (streaming starts there), then generate through the chat session."""
    try:
        with engine.turn():
            session = engine.session(req.workdir / "out", system=req.system)

            def part(p: Part | MediaInput) -> Part:
                if not isinstance(p, MediaInput):
                    return p
                try:
                    return session.encode(p.modality, p.path)[0]
                except ValueError as e:
                    raise _media_error(p, e) from None

            turns = [Turn(role, [part(p) for p in parts]) for role, parts in req.turns]
            session.history = turns[:-1]
            if req.voice is not None:
                try:
                    session.set_voice(req.voice.path)
                except ValueError as e:
                    raise _media_error(req.voice, e) from None
            user = turns[-1].parts
            try:
                session.fit(Turn("user", user), req.config)
                if ready is not None:
                    ready()
                return session.respond(user, on_event, req.config)
            except ContextError as e:
                raise ApiError(400, str(e), "context_length_exceeded", "messages") from None
    except Busy as e:
        raise ApiError(429, str(e), "server_busy") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _audio_bytes(path: Path, fmt: str) -> bytes:
    if path.suffix.lower() == AUDIO_FORMATS[fmt]:
        return path.read_bytes()
    data, sr = sf.read(path, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt.upper())
    return buf.getvalue()


def media_fields(req: ChatRequest, answer: ChatAnswer) -> dict[str, Any]:
    """``audio`` (the first span of the asked-for spoken modality), ``anygpt_media`` (every other
    generated file, in order) and ``anygpt_notes``, as far as the answer has them."""
    out: dict[str, Any] = {}
    media = []
    for e in answer.files:
        if "audio" not in out and e.modality == req.audio_modality:
            out["audio"] = {"id": f"audio_{uuid.uuid4().hex}", "data": _b64(_audio_bytes(e.path, req.audio_format)),
                            "expires_at": int(time.time()) + 3600, "transcript": answer.text}
        else:
            media.append({"modality": e.modality, "mime_type": mime_of(e.path), "data": _b64(e.path.read_bytes()),
                          "seconds": e.seconds})
    if media:
        out["anygpt_media"] = media
    notes = answer.messages()
    if notes:
        out["anygpt_notes"] = notes
    return out


def _usage(answer: ChatAnswer) -> dict[str, int]:
    prompt, completion = answer.result.prompt_length, len(answer.result.ids) + 1  # + the final <eom>/stop
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(answer: ChatAnswer) -> str:
    return "stop" if answer.result.finished else "length"


def completion(engine: Engine, req: ChatRequest, answer: ChatAnswer) -> dict[str, Any]:
    """The ``chat.completion`` object for an answer."""
    extra = media_fields(req, answer)
    message = {"role": "assistant", "content": None if "audio" in extra else answer.text, "refusal": None, **extra}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": engine.model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(answer)}],
            "usage": _usage(answer)}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8")


class Stream:
    """A streamed request: generation runs in its own thread and hands events over a queue.

    :meth:`start` returns once the request is ready to stream (its media read, its prompt fits) or
    raises its ``ApiError``, so refusals keep their 4xx status; :meth:`chunks` then yields the SSE
    bytes (the official ``chat.completion.chunk`` format, ending with ``data: [DONE]``).
    """

    def __init__(self, engine: Engine, req: ChatRequest, cleanup: Callable[[], None]) -> None:
        self.engine, self.req, self.cleanup = engine, req, cleanup
        self.q: queue.Queue = queue.Queue()
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _work(self) -> None:
        try:
            answer = execute(self.engine, self.req, on_event=lambda e: self.q.put(("event", e)),
                             ready=lambda: self.q.put(("ready", None)))
            self.q.put(("done", answer))
        except ApiError as e:
            self.q.put(("error", e))
        except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
            self.q.put(("error", ApiError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")))

    def start(self) -> None:
        """Start generating; blocks until ready (or raises the request's ``ApiError``)."""
        threading.Thread(target=self._work, name="anygpt-stream", daemon=True).start()
        kind, item = self.q.get()
        if kind == "error":
            raise item

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.engine.model_id, "system_fingerprint": None,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def chunks(self) -> Iterator[bytes]:
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                kind, item = self.q.get()
                if kind == "event":
                    if item.kind == "text" and item.text:
                        yield self._chunk({"content": item.text})
                elif kind == "done":
                    extra = media_fields(self.req, item)
                    if extra:
                        yield self._chunk(extra)
                    yield self._chunk({}, _finish_reason(item))
                    if self.req.include_usage:
                        yield _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                    "model": self.engine.model_id, "choices": [], "usage": _usage(item)})
                    break
                else:  # an error after the stream began: the official API sends an error event
                    yield _sse(item.body())
                    break
            yield b"data: [DONE]\n\n"
        finally:
            self.cleanup()


def models(engine: Engine) -> dict[str, Any]:
    """The ``/v1/models`` list: this server's one model."""
    return {"object": "list", "data": [model_card(engine)]}


def model_card(engine: Engine) -> dict[str, Any]:
    try:
        created = int((engine.lm.directory / "config.json").stat().st_mtime)
    except OSError:
        created = 0
    return {"id": engine.model_id, "object": "model", "created": created, "owned_by": "anygpt",
            "anygpt_modalities": ["text", *engine.layout.modalities]}

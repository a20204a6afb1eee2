"""The chat page at ``/``: a Gradio 6 app on the shared chat session.

One conversation per browser session (a ``gr.State`` holding its :class:`~anygpt.infer.chat.ChatSession`,
forgotten with its files when the tab closes); turns queue one at a time for the model (the page's
queue and the API share the engine's turn).  What the page offers comes from the model's layout and
the modality plugins: the file types of the upload box, the voice input (when the layout has the
voice-prompt modality), a token limit per variable-length modality, and the modalities an answer
must include (the ``include`` constraint: "answer with a picture").
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from anygpt import modalities as registry
from anygpt.formats import Text
from anygpt.infer.chat import ChatAnswer, ChatSession
from anygpt.infer.mediaio import modality_for_file
from anygpt.serve.engine import Busy, Engine, turn_config

AUTO = "auto"


def _forget(session: ChatSession | None) -> None:
    """A browser session ended: its generated files go with it."""
    if session is not None:
        shutil.rmtree(session.out_dir, ignore_errors=True)


def limit_modes(engine: Engine) -> list[str]:
    """The modes whose answer length the page sets: text and every modality without a fixed span length."""
    return ["text", *(m for m, spec in engine.layout.modalities.items() if spec.span_length is None)]


def answer_messages(answer: ChatAnswer) -> list[dict[str, Any]]:
    """The assistant's chat messages: its text (with any notices), then each generated file."""
    notes = [f"*({n})*" for n in answer.messages()]
    text = "\n\n".join(([answer.text] if answer.text else []) + notes)
    out = [{"role": "assistant", "content": text}] if text else []
    out += [{"role": "assistant", "content": {"path": str(f.path)}} for f in answer.files]
    return out


def build_page(engine: Engine) -> Any:
    """The ``gr.Blocks`` of the chat page (queued, not launched: the server mounts it)."""
    import gradio as gr

    layout = engine.layout
    suffixes = sorted({x for m in layout.modalities for x in registry.get(m).suffixes})
    voice_of = engine.media.voice_modality
    modes = limit_modes(engine)
    cfg = engine.config

    def respond(message: dict[str, Any] | None, chat: list[dict[str, Any]] | None, session: ChatSession | None,
                must: list[str] | None, read_as: str, temperature: float, top_p: float, *rest: Any):
        limits, voice = rest[: len(modes)], (rest[len(modes)] if voice_of else None)
        text = ((message or {}).get("text") or "").strip()
        files = [Path(f if isinstance(f, str) else f["path"]) for f in (message or {}).get("files") or []]
        if not text and not files:
            raise gr.Error("Type a message, or attach a file.")
        session = session or engine.session(engine.scratch("page"))
        try:
            config = turn_config(cfg, temperature=temperature, top_p=top_p,
                                 max_tokens={m: int(v) for m, v in zip(modes, limits)},
                                 include=tuple(m for m in layout.modalities if m in (must or [])))
            with engine.turn():
                if (voice or None) != session.voice_path:
                    session.set_voice(voice or None)
                parts = []
                for f in files:
                    if f.stat().st_size > engine.limits.media_bytes:
                        raise ValueError(f"{f.name}: larger than the server's media limit")
                    modality = read_as if read_as != AUTO else modality_for_file(layout, f.suffix)
                    parts.append(session.encode(modality, f)[0])
                if text:
                    parts.append(Text(text))
                answer = session.respond(parts, config=config)
        except (Busy, ValueError, OSError) as e:
            raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        chat = list(chat or [])
        chat += [{"role": "user", "content": {"path": str(f)}} for f in files]
        if text:
            chat.append({"role": "user", "content": text})
        chat += answer_messages(answer)
        return gr.MultimodalTextbox(value=None), chat, session

    def reset(session: ChatSession | None):
        if session is not None:
            session.reset()
        return [], session, gr.MultimodalTextbox(value=None)

    has = ", ".join(["text", *layout.modalities])
    with gr.Blocks(title=f"AnyGPT - {engine.model_id}", analytics_enabled=False) as page:
        gr.Markdown(f"**{engine.model_id}** &nbsp; modalities: {has}. Type a message, attach files or record "
                    f"from the microphone; answers may hold any of them.")
        state = gr.State(None, delete_callback=_forget)
        chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat", buttons=["copy", "copy_all"])
        box = gr.MultimodalTextbox(file_types=suffixes, file_count="multiple", sources=["upload", "microphone"],
                                   placeholder="Message (Enter sends)", show_label=False, elem_id="box")
        with gr.Row():
            must = gr.CheckboxGroup(list(layout.modalities), label="The answer must include", elem_id="must", scale=4)
            clear = gr.Button("Reset conversation", elem_id="reset", size="sm", scale=1)
        with gr.Accordion("Voice and generation settings", open=False, elem_id="settings"):
            voice = None
            if voice_of:
                voice = gr.Audio(label=f"Voice to answer {voice_of} in (optional)", sources=["upload", "microphone"],
                                 type="filepath", elem_id="voice")
            read_as = gr.Dropdown([AUTO, *layout.modalities], value=AUTO, label="Read uploads as",
                                  info="auto: by file type (audio as spoken audio)")
            text = cfg.settings("text")
            temperature = gr.Slider(0.0, 2.0, value=text.temperature, step=0.05, label="Temperature (every mode)")
            top_p = gr.Slider(0.05, 1.0, value=text.top_p, step=0.05, label="Top-p (every mode)")
            limits = [gr.Slider(1, cfg.max_new_tokens, value=min(cfg.settings(m).max_tokens, cfg.max_new_tokens),
                                step=1, label=f"Max {m} tokens") for m in modes]
        inputs = [box, chatbot, state, must, read_as, temperature, top_p, *limits] + ([voice] if voice is not None else [])
        box.submit(respond, inputs, [box, chatbot, state], api_name="chat")
        clear.click(reset, [state], [chatbot, state, box], api_name="reset")
    # One turn at a time for the page; the engine's turn also orders it with API requests.
    page.queue(default_concurrency_limit=1, max_size=engine.limits.queue)
    return page

"""Inference: constrained KV-cached generation, base-model tasks and the multimodal chat.

- ``anygpt.infer.settings``: per-modality sampling settings (switch at a span's start token).
- ``anygpt.infer.constraints``: the state machine that keeps every answer well-formed.
- ``anygpt.infer.generation``: batched KV-cached sampling loop, streaming, device/dtype choice.
- ``anygpt.infer.loading``: model directory -> LM + tokenizer + layout on a device.
- ``anygpt.infer.mediaio``: files -> code spans and spans -> files, through each modality's plugin and codec.
- ``anygpt.infer.tasks``: ``anygpt generate "text|image|a red bus"`` (both directions for every modality).
- ``anygpt.infer.chat``: the chat session every front end shares (terminal, ``anygpt serve``'s page and API)
  and the terminal REPL of ``anygpt chat`` / ``launch/chat.py``.
- ``anygpt.infer.bench``: ``anygpt bench infer``.

Submodules are imported by their users; importing this package stays cheap.
"""

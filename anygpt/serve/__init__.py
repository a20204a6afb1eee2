"""``anygpt serve``: one model behind a local web chat page and an OpenAI-compatible API.

- ``anygpt.serve.engine``: the served model (one per process), its lock and queue (limits in
  ``anygpt.serve.limits``), the temporary directory; every front end takes turns through it.
- ``anygpt.serve.api``: ``/v1/chat/completions`` and ``/v1/models`` in the OpenAI formats.
- ``anygpt.serve.page``: the Gradio chat page at ``/``.
- ``anygpt.serve.server``: both on one FastAPI app run by uvicorn; ``anygpt.serve.cli`` the command.
- ``anygpt.serve.bench``: ``anygpt bench serve`` (concurrent API clients against the tiny model).

The chat logic is :class:`anygpt.infer.chat.ChatSession` (the terminal chat's too); this package
turns HTTP requests and page events into its turns.  Needs the ``web`` extra (Gradio, which brings
FastAPI and uvicorn); importing this package stays cheap.
"""

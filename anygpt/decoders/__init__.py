"""Non-autoregressive decoders that turn the LM's discrete ids back into media.

- ``anygpt.decoders.soundstorm``: SoundStorm-style masked parallel decoder that fills in the acoustic
  RVQ layers 2-8 of SpeechTokenizer codes from the semantic layer 1 (optionally continuing a voice
  prompt), plus its trainer in ``anygpt.decoders.train_soundstorm``.
- ``anygpt.decoders.unclip``: SEED image embedding -> ``diffusers`` Stable unCLIP pipeline -> PIL images.

Submodules are imported explicitly by their users: importing this package stays cheap (no ``diffusers``).
"""

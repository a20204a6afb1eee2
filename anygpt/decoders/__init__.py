"""Non-autoregressive decoders that turn the LM's discrete ids back into media.

- ``anygpt.decoders.soundstorm``: SoundStorm-style masked parallel decoder that fills in a speech
  codec's acoustic codebooks from the ones the LM generates (SpeechTokenizer: RVQ layers 2-8 from
  layer 1; counts from the codec's card), optionally continuing a voice prompt; its trainer is
  ``anygpt.decoders.train_soundstorm`` (``anygpt soundstorm``, parsed in ``anygpt.decoders.cli``).
- ``anygpt.decoders.unclip``: SEED image embedding -> ``diffusers`` Stable unCLIP pipeline -> PIL images.

Submodules are imported explicitly by their users: importing this package stays cheap (no ``diffusers``).
"""

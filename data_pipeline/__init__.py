"""Offline preprocessing: raw corpora -> codec codes -> sharded WebDataset tars (resumable, parallel)."""

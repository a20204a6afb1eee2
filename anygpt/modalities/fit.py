"""``fit-codebooks``: seed every VQ codebook of a (tiny) codec by k-means on its encoder outputs.

Why: a randomly initialised codec quantises everything to (nearly) the same code -- SpeechTokenizer
and Encodec start from all-zero codebooks (PLATFORM.md), SEED's are tiny uniform values -- so a demo
LM trained on such codes would learn nothing.  Running k-means on the encoder outputs of real
inputs (for residual VQ: layer by layer on the residual left by the previous layers, exactly how
RVQ encodes) gives codes that differ between inputs.  Real checkpoints never need this.

The report lists, per codebook, how many distinct codes the fitting inputs use and the perplexity
of their histogram (``exp(entropy)``: 1 = constant codes, ``codebook_size`` = uniform use).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from anygpt import modalities as registry
from anygpt.modalities.base import Codec, CodecError


@dataclass
class CodebookUsage:
    name: str
    size: int
    used: int
    perplexity: float

    def line(self) -> str:
        return f"{self.name}: {self.used}/{self.size} codes used, perplexity {self.perplexity:.1f}"


@dataclass
class FitReport:
    modality: str
    inputs: int
    vectors: int
    iters: int
    seconds: float
    codebooks: list[CodebookUsage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        head = (f"fit {self.modality}: {self.inputs} inputs, {self.vectors} vectors, "
                f"{self.iters} k-means iterations, {self.seconds:.1f}s")
        return "\n".join([head] + ["  " + c.line() for c in self.codebooks] + [f"  note: {n}" for n in self.notes])


# ------------------------------------------------------------------------------------ k-means ---


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest centroid for each row of ``x`` (chunked so N x K never materialises)."""
    c2 = centroids.pow(2).sum(1)
    out = []
    for start in range(0, x.shape[0], chunk):
        xs = x[start: start + chunk]
        d = xs.pow(2).sum(1, keepdim=True) - 2 * xs @ centroids.t() + c2[None]
        out.append(d.argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0,
           min_per_cluster: int = 1, max_clusters: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with random-sample init; returns ``(centroids [k, D], counts [k])``.

    Only ``min(k, N // min_per_cluster)`` clusters are fitted; the remaining codebook rows are
    placed far from the data (distinct, never chosen, count 0).  With little data this
    keeps a residual quantiser from memorising every vector in its first layer, which would leave
    nothing but rounding noise for the later layers.  ``max_clusters`` caps it further: a small
    synthetic corpus is better served by a few dozen well-populated codes that recur across inputs
    (learnable by a tiny LM) than by thousands of rare ones.  Empty clusters keep their centroid.
    """
    x = x.float()
    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    scale = float(x.std()) if n > 1 else 1.0
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    k_fit = max(1, min(k, n // max(1, min_per_cluster), max_clusters or k))
    centroids = x[torch.randperm(n, generator=g)[:k_fit]].clone()
    assign = _nearest(x, centroids)
    for _ in range(iters if k_fit < n else 0):
        sums = torch.zeros(k_fit, d).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k_fit).float()
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        new_assign = _nearest(x, centroids)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    if k_fit < k:
        # Unused rows sit far from the data (distinct, finite, never nearest), so exactly the
        # fitted codes are used; near copies would split clusters at random.
        far = torch.randn(k - k_fit, d, generator=g)
        far = far / far.norm(dim=1, keepdim=True).clamp_min(1e-6) * (1e3 * scale * math.sqrt(d))
        centroids = torch.cat([centroids, x.mean(0, keepdim=True) + far])
    counts = torch.bincount(_nearest(x, centroids), minlength=k).float()
    return centroids, counts


def usage(ids: np.ndarray | torch.Tensor, size: int, name: str) -> CodebookUsage:
    """Distinct codes and histogram perplexity of one codebook's ids."""
    ids = torch.as_tensor(np.asarray(ids)).reshape(-1).long()
    if ids.numel() == 0:
        return CodebookUsage(name, size, 0, 0.0)
    hist = torch.bincount(ids, minlength=size).double()
    p = hist[hist > 0] / hist.sum()
    return CodebookUsage(name, size, int((hist > 0).sum()), float(torch.exp(-(p * p.log()).sum())))


def codebook_usage(codec: Codec, items: Sequence[Any]) -> list[CodebookUsage]:
    """Encode ``items`` and report usage per codebook (RVQ layer / Encodec codebook / SEED codebook)."""
    codes = codec.encode(items)
    out = []
    for k in range(codec.num_codebooks):
        ids = np.concatenate([c[k].reshape(-1) for c in codes]) if codes else np.zeros(0, np.int64)
        out.append(usage(ids, codec.codebook_size, f"{codec.modality}[{k}]"))
    return out


# ------------------------------------------------------------------------------- per codec ---


def _set_codebook(cb: Any, centroids: torch.Tensor, counts: torch.Tensor) -> None:
    """Write centroids into a codebook module, whichever layout it has."""
    if callable(getattr(cb, "set_codebook", None)):  # the codec knows its codebook's storage (Mimi)
        cb.set_codebook(centroids, counts)
        return
    with torch.no_grad():
        if isinstance(cb, torch.nn.Embedding):  # SEED
            cb.weight.copy_(centroids.to(cb.weight))
            return
        cb.embed.copy_(centroids.to(cb.embed))  # SpeechTokenizer / transformers Encodec EMA codebooks
        if hasattr(cb, "embed_avg"):
            cb.embed_avg.copy_(centroids.to(cb.embed_avg))
        if hasattr(cb, "cluster_size"):
            cb.cluster_size.copy_(counts.to(cb.cluster_size))
        if hasattr(cb, "inited"):
            cb.inited.fill_(1)


def _subsample(x: torch.Tensor, max_vectors: int, seed: int) -> torch.Tensor:
    """At most ``max_vectors`` rows (k-means cost is linear in N; a random subset is plenty).  The
    same seed picks the same frames in every chain of a codec (their rows are the same frames)."""
    x = x.float()
    if x.shape[0] > max_vectors:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_vectors]]
    return x


def fit_codebooks(codec: Codec, items: Sequence[Any], *, iters: int = 20, seed: int = 0,
                  max_vectors: int = 200_000, min_per_cluster: int = 4,
                  max_clusters: int | None = None) -> FitReport:
    """Initialise every codebook of ``codec`` in place from ``items`` (waveforms / images).

    Residual codebooks are fitted layer by layer on what the previous ones leave (RVQ); a single
    codebook (SEED) on the codec's fit vectors; a split quantiser chain by chain
    (:meth:`Codec.fit_chains`).  Each codebook fits at most ``N // min_per_cluster`` clusters (see
    :func:`kmeans`).
    Returns a :class:`FitReport` with per-codebook usage on the fitting inputs.
    """
    if not items:
        raise CodecError("fit: no inputs given")
    t0 = time.perf_counter()
    chains = [(_subsample(x, max_vectors, seed), books) for x, books in codec.fit_chains(items)]
    layer = 0  # counts codebooks across chains: k-means seeds follow the codebook axis
    for residual, books in chains:
        for j, cb in enumerate(books):
            centroids, counts = kmeans(residual, codec.codebook_size, iters=iters, seed=seed + layer,
                                       min_per_cluster=min_per_cluster, max_clusters=max_clusters)
            _set_codebook(cb, centroids, counts)
            if j + 1 < len(books):
                residual = residual - centroids[_nearest(residual, centroids)]
            layer += 1
    vectors = int(chains[0][0].shape[0]) if chains else 0
    report = FitReport(codec.modality, len(items), vectors, iters, 0.0, codebook_usage(codec, items))
    slots = int(codec.card.get("tokens_per_item") or 0)
    if slots and report.codebooks[0].used < 2 * slots:
        # One codebook serves every slot of a fixed-length span (SEED's 32 queries) and slot vectors
        # differ mostly by slot: with fewer than a couple of codes per slot, items get (nearly) the
        # same codes.
        report.notes.append(f"only {report.codebooks[0].used} codes for {slots} slots per item: items will "
                            f"hardly differ in codes; fit on at least {2 * min_per_cluster} inputs")
    report.seconds = time.perf_counter() - t0
    return report


def load_inputs(modality: str, paths: Sequence[str | os.PathLike], codec: Codec,
                max_seconds: float | None = 30.0) -> list[Any]:
    """Read fitting inputs with the modality's reader (``MediaError`` names a bad file)."""
    from anygpt.modalities.plugin import ReadOptions

    plugin = registry.get(modality)
    return [plugin.read(p, codec, ReadOptions(clip_seconds=max_seconds))[0] for p in paths]


def fit_codec(modality: str, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
              base: str | os.PathLike = "tiny", *, codec: str | None = None, iters: int = 20, seed: int = 0,
              max_seconds: float | None = 30.0, max_clusters: int | None = None,
              max_vectors: int = 200_000) -> tuple[Codec, FitReport]:
    """Build ``modality``'s codec from ``base`` (``"tiny"`` or a directory; ``codec`` picks among the
    modality's codecs), fit it on the files in ``inputs`` and save it (weights + card with the fit
    report) to ``out_dir``."""
    built = registry.build_codec(modality, base, codec=codec)
    items = load_inputs(modality, inputs, built, max_seconds)
    report = fit_codebooks(built, items, iters=iters, seed=seed, max_clusters=max_clusters, max_vectors=max_vectors)
    built.save(Path(out_dir), fitted={
        "inputs": report.inputs,
        "vectors": report.vectors,
        "iters": report.iters,
        "max_clusters": max_clusters,
        "codebooks": [{"name": c.name, "used": c.used, "perplexity": round(c.perplexity, 3)} for c in report.codebooks],
    })
    return built, report


__all__ = ["kmeans", "usage", "codebook_usage", "fit_codebooks", "fit_codec", "load_inputs",
           "FitReport", "CodebookUsage"]

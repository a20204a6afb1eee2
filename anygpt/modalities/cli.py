"""``anygpt codec ...``: encode/decode one file with a modality codec, fit tiny codebooks, benchmark.

    anygpt codec encode --modality M --input FILE (--codecs DIR | --tiny [--codec NAME]) --out codes.npy
    anygpt codec decode --modality M --input codes.npy (--codecs DIR | --tiny [--codec NAME]) --out FILE
    anygpt codec fit    --modality M --inputs FILE... --out CODECS_DIR [--base tiny|DIR] [--codec NAME] [--iters N]
    anygpt codec bench  [--real] [--json FILE]

Modalities and codecs come from the registry (:mod:`anygpt.modalities`).  ``--codecs DIR`` is a
codecs directory with one subdirectory per modality (what ``codec fit`` writes); a directory that is
itself a codec directory (holds ``card.yaml``) works too.
Every error prints one line to stderr and exits non-zero.  ``add_codec_parser`` plugs this into
the top-level ``anygpt`` parser; ``main(argv)`` runs it stand-alone (tests).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anygpt import modalities as registry


def add_codec_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``codec`` (with encode/decode/fit/bench) on an ``add_subparsers()`` object.

    The parser sets ``handler`` (and the alias ``func``): ``args.handler(args)`` runs the command
    and returns the exit code (0, or 1 after printing a one-line ``error: ...`` to stderr).
    """
    p = subparsers.add_parser("codec", help="encode/decode media with a modality codec, fit tiny codebooks")
    sub = p.add_subparsers(dest="codec_command", metavar="{encode,decode,fit,bench}")
    sub.required = True

    modalities = registry.names()

    def source_args(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group(required=True)
        g.add_argument("--codecs", metavar="DIR", help="codecs directory (DIR/<modality>/) or one codec directory")
        g.add_argument("--tiny", action="store_true", help="use the tiny random codec (same architecture)")
        sp.add_argument("--codec", default=None, metavar="NAME",
                        help="with --tiny: which of the modality's codecs (default: its default codec)")
        sp.add_argument("--device", default=None, help="torch device (default: cpu)")

    enc = sub.add_parser("encode", help="media file -> codes .npy ([codebooks, T] int64)")
    enc.add_argument("--modality", required=True, choices=modalities)
    enc.add_argument("--input", required=True, metavar="FILE")
    enc.add_argument("--out", required=True, metavar="CODES.npy")
    enc.add_argument("--max-seconds", type=float, default=None, help="clip audio to this duration")
    source_args(enc)
    enc.set_defaults(func=_guarded(cmd_encode), handler=_guarded(cmd_encode))

    dec = sub.add_parser("decode", help="codes .npy -> a media file (.wav, .png ... by modality)")
    dec.add_argument("--modality", required=True, choices=modalities)
    dec.add_argument("--input", required=True, metavar="CODES.npy")
    dec.add_argument("--out", required=True, metavar="FILE")
    options = {}
    for plugin in registry.registered().values():
        for opt, (kind, text) in plugin.render_options.items():
            options.setdefault(opt, (kind, []))[1].append(f"{plugin.name}: {text}")
    for opt, (kind, texts) in options.items():
        dec.add_argument(f"--{opt}", type=kind, default=None, help="; ".join(texts))
    source_args(dec)
    dec.set_defaults(func=_guarded(cmd_decode), handler=_guarded(cmd_decode))

    fit = sub.add_parser("fit", help="k-means the codebooks of a (tiny) codec on real inputs; write CODECS_DIR/<modality>/")
    fit.add_argument("--modality", required=True, choices=modalities)
    fit.add_argument("--inputs", required=True, nargs="+", metavar="FILE")
    fit.add_argument("--out", required=True, metavar="CODECS_DIR")
    fit.add_argument("--base", default="tiny", metavar="tiny|DIR", help="codec to start from (default: tiny)")
    fit.add_argument("--tiny", dest="base", action="store_const", const="tiny", help="same as --base tiny")
    fit.add_argument("--codec", default=None, metavar="NAME", help="which of the modality's codecs (default: its default)")
    fit.add_argument("--iters", type=int, default=20, help="k-means iterations (default 20)")
    fit.add_argument("--clusters", type=int, default=None,
                     help="fit at most this many codes per codebook (small corpora learn better with few)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--max-seconds", type=float, default=30.0, help="clip each audio input (default 30)")
    fit.set_defaults(func=_guarded(cmd_fit), handler=_guarded(cmd_fit))

    bench = sub.add_parser("bench", help="encode/decode speed of tiny and real-size codecs")
    bench.add_argument("--seconds", type=float, default=4.0, help="audio clip length")
    bench.add_argument("--no-real", action="store_true", help="tiny codecs only")
    bench.add_argument("--real-image", action="store_true", help="include the 1.1 B-parameter SEED (slow on CPU)")
    bench.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the run")
    bench.add_argument("--device", default=None, help="torch device (default: cpu)")
    bench.add_argument("--json", default=None, metavar="FILE")
    bench.set_defaults(func=_guarded(cmd_bench), handler=_guarded(cmd_bench))
    return p


# ------------------------------------------------------------------------------------ helpers ---


def _load_codec(args: argparse.Namespace) -> Any:
    from anygpt.modalities.base import CodecError

    if args.codec is not None and not args.tiny:
        raise CodecError("--codec picks a tiny codec (--tiny --codec NAME); a --codecs directory's card says "
                         "which codec it holds")
    source: str | Path = "tiny" if args.tiny else registry.codec_dir(args.codecs, args.modality)
    t0 = time.perf_counter()
    codec = registry.build_codec(args.modality, source, codec=args.codec)
    if args.device:
        codec.to(args.device)
    n = sum(p.numel() for p in codec.parameters())
    print(f"codec {args.modality} {codec.card['name']} ({'tiny' if args.tiny else source}): {n / 1e6:.1f} M params, "
          f"loaded in {time.perf_counter() - t0:.2f}s")
    return codec


# ----------------------------------------------------------------------------------- commands ---


def cmd_encode(args: argparse.Namespace) -> int:
    from anygpt.modalities.plugin import ReadOptions

    codec = _load_codec(args)
    plugin = registry.get(args.modality)
    item, info = plugin.read(args.input, codec, ReadOptions(clip_seconds=args.max_seconds))
    t0 = time.perf_counter()
    codes = codec.encode([item])[0]
    dt = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, codes.astype(np.int64))
    media_seconds = info.get("seconds")
    rate = f", {media_seconds / dt:.1f}x real time" if media_seconds else ""
    print(f"encoded {args.input} ({plugin.describe(info)}) -> codes {list(codes.shape)} int64 in {dt:.3f}s{rate}; "
          f"wrote {out}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from anygpt.modalities.base import CodecError

    try:
        codes = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CodecError(f"{args.input}: cannot read codes ({' '.join(str(exc).split())})") from None
    if codes.ndim == 1:
        codes = codes[None]
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise CodecError(f"{args.input}: expected an integer [codebooks, T] array, got {codes.dtype} {codes.shape}")
    codec = _load_codec(args)
    plugin = registry.get(args.modality)
    options = {k: getattr(args, k) for k in plugin.render_options if getattr(args, k) is not None}
    t0 = time.perf_counter()
    item = codec.decode([codes], **options)[0]
    dt = time.perf_counter() - t0
    out = plugin.write(Path(args.out), item, codec)
    secs = plugin.seconds(item, codec)
    speed = f" ({secs:.2f}s, {secs / max(dt, 1e-9):.1f}x real time)" if secs else ""
    print(f"decoded {args.input} codes {list(codes.shape)} -> {args.modality} in {dt:.3f}s{speed}; wrote {out}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from anygpt.modalities.fit import fit_codec

    out = Path(args.out) / args.modality
    t0 = time.perf_counter()
    codec, report = fit_codec(args.modality, args.inputs, out, base=args.base, codec=args.codec, iters=args.iters,
                              seed=args.seed, max_seconds=args.max_seconds, max_clusters=args.clusters)
    print(report.summary())
    print(f"wrote {out} (card + weights) in {time.perf_counter() - t0:.1f}s; use --codecs {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from anygpt.modalities.bench import bench_codecs

    bench_codecs(seconds=args.seconds, real=not args.no_real, real_image=args.real_image, threads=args.threads,
                 device=args.device, json_path=args.json)
    return 0


def _guarded(fn: Any) -> Any:
    """Wrap a command so expected failures become one line on stderr and exit code 1."""

    def wrapper(args: argparse.Namespace) -> int:
        from anygpt.modalities.base import CodecError
        from anygpt.modalities.media import MediaError

        try:
            return int(fn(args) or 0)
        except (CodecError, MediaError) as exc:
            print(f"error: {exc}", file=sys.stderr)
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return 1

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``codec`` command (``args.func`` already turns errors into exit code 1)."""
    return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry with only the ``codec`` subcommand (``argv`` may omit the leading ``codec``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "codec":
        argv = ["codec", *argv]
    parser = argparse.ArgumentParser(prog="anygpt", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command")
    add_codec_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

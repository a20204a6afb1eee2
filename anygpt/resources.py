"""The configs that ship with the package: DeepSpeed JSONs, codec cards, stage YAMLs.

They live at the top of the source tree (``ds_configs/``, ``tokenizers/``, ``launch/configs/``, the
layout the product brief fixes) and reach the wheel through ``anygpt/shipped/``, which holds one
symbolic link to each of those directories: setuptools copies what the links point at into the wheel
as package data, an editable install follows the links, so there is one copy of every file and an
installed package finds its configs from any working directory.

``anygpt configs list|path|cp`` shows and copies them out (as ``tune cp`` does), so a user of an
installed package can launch ``deepspeed --module anygpt.train --config $(anygpt configs path
tiny_cpu)`` or edit a copy.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "shipped"
# kind -> (directory under shipped/, file suffix)
KINDS = {"ds_configs": ("ds_configs", ".json"), "cards": ("cards", ".yaml"), "stages": ("stages", ".yaml")}


class ResourceError(ValueError):
    """A shipped config that does not exist (the message lists the ones that do)."""


def shipped_dir(kind: str) -> Path:
    """The directory of one kind of shipped config (``ds_configs``, ``cards``, ``stages``)."""
    return SHIPPED / KINDS[kind][0]


def list_shipped() -> dict[str, list[str]]:
    """kind -> names (file stems) of the shipped configs of that kind."""
    out = {}
    for kind, (_, suffix) in KINDS.items():
        d = shipped_dir(kind)
        out[kind] = sorted(p.stem for p in d.glob(f"*{suffix}")) if d.is_dir() else []
    return out


def shipped_path(name: str) -> Path:
    """A shipped config by name: ``zero3``, ``zero3.json``, ``ds_configs/zero3.json``, ``tiny_cpu``,
    ``launch/configs/tiny_cpu.yaml``, ``speech`` (a card) ..."""
    stem = Path(name).name
    wanted_kind = {"ds_configs": "ds_configs", "tokenizers": "cards", "configs": "stages"}.get(Path(name).parent.name)
    for kind, (_, suffix) in KINDS.items():
        if wanted_kind not in (None, kind):
            continue
        base = stem[: -len(suffix)] if stem.endswith(suffix) else stem
        path = shipped_dir(kind) / f"{base}{suffix}"
        if path.is_file():
            return path
    known = ", ".join(n for names in list_shipped().values() for n in names)
    raise ResourceError(f"no shipped config named {name!r}; shipped: {known}")


def resolve_config_path(path: str | Path) -> Path:
    """``path`` when it exists (relative to the working directory), else the shipped config it names.

    This is what lets ``optim.deepspeed: ds_configs/zero3.json`` work from any directory and from an
    installed package.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    try:
        return shipped_path(str(path))
    except ResourceError:
        return p


# ------------------------------------------------------------------------------------ command ---


def add_configs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list, locate or copy the shipped configs (stage YAMLs, DeepSpeed JSONs, cards)",
                       description="The configs that ship with the package. 'path NAME' prints where one is "
                                   "(e.g. deepspeed --module anygpt.train --config $(anygpt configs path tiny_cpu)); "
                                   "'cp NAME DEST' copies one out to edit.")
    sp = p.add_subparsers(dest="configs_command", metavar="{list,path,cp}")
    sp.required = True
    sp.add_parser("list", help="every shipped config by kind").set_defaults(handler=_cmd_list)
    path = sp.add_parser("path", help="print the path of a shipped config")
    path.add_argument("name")
    path.set_defaults(handler=_cmd_path)
    cp = sp.add_parser("cp", help="copy a shipped config to DEST (a file or a directory)")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.set_defaults(handler=_cmd_cp)


def _cmd_list(args: argparse.Namespace) -> int:
    for kind, names in list_shipped().items():
        print(f"{kind:<11} {' '.join(names)}")
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    print(shipped_path(args.name))
    return 0


def _cmd_cp(args: argparse.Namespace) -> int:
    src = shipped_path(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise ResourceError(f"{dest} exists; not overwriting it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"copied {src.name} to {dest}")
    return 0


__all__ = ["SHIPPED", "shipped_dir", "shipped_path", "list_shipped", "resolve_config_path", "ResourceError",
           "add_configs_parser"]

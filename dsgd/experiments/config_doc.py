"""``dsgd config``: every config key with its default and meaning, read from the dataclasses of
``config.py`` themselves (their defaults, and the comment on or above each field), so the
listing cannot drift from the code. ``dsgd config --preset NAME`` prints a resolved preset.
Also the name lists (presets, topologies, models, data sets, algorithms) the ``--help`` texts
show.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from typing import Any

from dsgd.experiments import config as C


def field_docs(cls: type) -> dict[str, str]:
    """{field: meaning} of a config dataclass: the comment at the end of the field's line, or
    else the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        trailing = comments.get(node.end_lineno, "")
        if trailing and not lines[node.end_lineno - 1].lstrip().startswith("#"):
            docs[node.target.id] = trailing
            continue
        above, i = [], node.lineno - 1
        while i in comments and lines[i - 1].lstrip().startswith("#"):
            above.insert(0, comments[i])
            i -= 1
        docs[node.target.id] = " ".join(above)
    return docs


def _value(v: Any) -> str:
    if v is None:
        return "(unset)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def keys(cls: type = C.Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every config key, sections after the top-level keys."""
    docs, defaults = field_docs(cls), cls()
    rows, sections = [], []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, type(value)))
        else:
            rows.append((prefix + f.name, _value(value), docs.get(f.name, "")))
    for name, sub in sections:
        rows += keys(sub, f"{name}.")
    return rows


def names() -> dict[str, list[str]]:
    """The names a config may use, by kind, from the registries themselves."""
    from dsgd.data import DATASETS, PARTITIONS
    from dsgd.models import MODELS
    from dsgd.topology import NAMES

    return {
        "presets": sorted(p.stem for p in C.PRESETS.glob("*.toml")),
        "algorithms": list(C.ALGORITHMS),
        "topologies": list(NAMES),
        "models": sorted(MODELS) + ['"package.module:factory"'],
        "data sets": list(DATASETS) + ['"package.module:factory"'],
        "partitions": list(PARTITIONS),
        "gradients": list(C.GRADIENTS),
        "schedules": list(C.SCHEDULES),
        "instruments": list(C.INSTRUMENTS),
    }


def reference() -> str:
    """The text ``dsgd config`` prints."""
    rows = keys()
    width = max(len(k) for k, _, _ in rows) + 2
    vwidth = min(max(len(v) for _, v, _ in rows), 18) + 2
    out = ["Every config key, its default and its meaning. Set them in a TOML file ([data], "
           "[model], [train], [log]) or with --set section.key=value."]
    section = ""
    for key, value, doc in rows:
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            out += ["", f"[{head}]"]
            section = head
        out.append(f"  {key:<{width}}{value:<{vwidth}}{doc}".rstrip())
    out.append("")
    out += [f"{kind}: {', '.join(items)}" for kind, items in names().items()]
    return "\n".join(out)


def _command(args) -> int:
    if args.preset:
        print(C.dumps_toml(C.load(args.preset, args.set)), end="")
    else:
        print(reference())
    return 0


def add_to(sub: argparse._SubParsersAction) -> None:
    """Add ``dsgd config`` and the name lists of the other commands' ``--help``."""
    lists = names()
    c = sub.add_parser("config", help="list every config key with its default and meaning",
                       description="Every config key with its default and meaning; with "
                                   "--preset, that preset resolved.")
    c.add_argument("--preset", metavar="NAME",
                   help=f"print this preset (or TOML file) resolved: {', '.join(lists['presets'])}")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the preset (repeatable)")
    c.set_defaults(fn=_command)

    train = sub.choices["train"]
    train.formatter_class = argparse.RawDescriptionHelpFormatter
    train.epilog = "\n".join(
        f"{kind}: {', '.join(lists[kind])}" for kind in
        ("presets", "algorithms", "topologies", "models", "data sets")) + (
        "\nevery key with its default and meaning: dsgd config")
    for action in train._actions:
        if action.dest == "config":
            action.help = f"a TOML file or a preset name: {', '.join(lists['presets'])}"
    for action in sub.choices["topology"]._actions:
        if action.dest == "name":
            action.help = f"one of {', '.join(lists['topologies'])}"

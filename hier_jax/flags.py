"""One flag generator for every config dataclass: a flag per field, nested configs by prefix, shared
flags that set several sub-configs at once, and the fields a command line actually gave.

A field's flag is its name with dashes (`batch_size` -> `--batch-size`); its metadata (`option`) may
rename it, add aliases, give a parser for a value that is not a plain int/float/str/bool, make it
repeatable or take several values, and mark it run-only (a resumed run may change it). A field whose
type is a config dataclass is flattened: its fields get the field's `prefix` (`head` -> `--head-
channels`); fields that name the same `shared` group (the edge's and the cloud's optimizer) also get
one flag each without the prefix that sets every member (`--learning-rate` sets both sides,
`--edge-learning-rate` the edge only, whatever their order on the command line).

Every flag's argparse default is SUPPRESS, so the parsed namespace holds exactly what was given:
`parse` lays it over the defaults, and `given` says which fields it set (what a resumed run lays over
the config of its checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

SHARED = "@"  # dest prefix of a shared group's flags


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    repeat: bool = False,
    many: bool = False,
    run_only: bool = False,
    prefix: str | None = None,
    shared: str | None = None,
    alias_suffixes: tuple[str, ...] = (),
    values: dict[str, tuple[str, Any]] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with what the flag generator needs in its metadata.

    flag / aliases: the flag's spelling (default: the field's name) and other spellings of it;
    alias_suffixes: other spellings of a prefixed field (`schedule` gives `--edge-schedule`);
    parse: str -> value; repeat: the flag may be given several times (a tuple of values);
    many: one flag, several values (nargs "+"); run_only: a resumed run may change it;
    prefix / shared: for a nested config (see the module docstring);
    values: old values kept as spellings: {value: (path, value)} sets `path` instead (a path with
    the SHARED prefix names a shared group's field).
    """
    metadata = {
        "help": help,
        "flag": flag,
        "aliases": aliases,
        "parse": parse,
        "metavar": metavar,
        "repeat": repeat,
        "many": many,
        "run_only": run_only,
        "prefix": prefix,
        "shared": shared,
        "alias_suffixes": alias_suffixes,
        "values": values or {},
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _meta(field: dataclasses.Field, key: str, fallback: Any = None) -> Any:
    return field.metadata.get(key, fallback) if field.metadata.get(key) is not None else fallback


def _hint(cls: type, field: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def is_config(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One generated flag: the dotted path it sets (or SHARED + group + field), its spellings, its type."""

    dest: str
    spellings: tuple[str, ...]
    field: dataclasses.Field
    hint: Any
    default: Any


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_specs(cls: type, defaults: Any = None, include: Iterable[str] | None = None) -> list[Flag]:
    """Every flag of `cls` (only its top-level fields in `include`, when given), defaults from `defaults`."""
    defaults = cls() if defaults is None else defaults
    include = None if include is None else set(include)
    specs: list[Flag] = []
    groups: dict[str, tuple[type, Any]] = {}
    for field in dataclasses.fields(cls):
        if include is not None and field.name not in include:
            continue
        hint, default = _hint(cls, field), getattr(defaults, field.name)
        if is_config(hint):
            prefix = _meta(field, "prefix", field.name)
            for sub in flag_specs(hint, default):
                name = sub.spellings[0].removeprefix("--")
                spellings = (
                    (
                        f"--{prefix}-{name}",
                        *(f"--{prefix}-{a.replace('_', '-')}" for a in _meta(sub.field, "alias_suffixes", ())),
                    )
                    if prefix
                    else sub.spellings
                )
                specs.append(dataclasses.replace(sub, dest=f"{field.name}.{sub.dest}", spellings=spellings))
            if (group := _meta(field, "shared")) and group not in groups:
                groups[group] = (hint, default)
                specs += [
                    dataclasses.replace(sub, dest=f"{SHARED}{group}.{sub.dest}") for sub in flag_specs(hint, default)
                ]
            continue
        flag = _meta(field, "flag") or _dashed(field.name)
        specs.append(Flag(field.name, (flag, *_meta(field, "aliases", ())), field, hint, default))
    return specs


def _value_type(hint: Any) -> Callable[[str], Any]:
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0]
    return hint


def add_flags(
    parser: argparse.ArgumentParser, cls: type, defaults: Any = None, include: Iterable[str] | None = None
) -> None:
    """Add a flag per field of `cls` (nested configs flattened), every one defaulting to SUPPRESS."""
    for spec in flag_specs(cls, defaults, include):
        field, hint = spec.field, spec.hint
        shown = spec.default if not isinstance(spec.default, tuple) else ",".join(map(str, spec.default)) or "none"
        text = f"{_meta(field, 'help', '')} (default: {shown})".strip()
        kwargs: dict[str, Any] = {"dest": spec.dest, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if hint is bool:
            parser.add_argument(*spec.spellings, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["type"] = _meta(field, "parse") or _value_type(hint)
        if _meta(field, "metavar"):
            kwargs["metavar"] = _meta(field, "metavar")
        if _meta(field, "repeat"):
            kwargs["action"] = "append"
        elif _meta(field, "many"):
            kwargs["nargs"] = "+"
        elif _meta(field, "values"):
            prefix = spec.dest.rpartition(".")[0]
            kwargs["action"] = _rewriting(
                {
                    value: (target if target.startswith(SHARED) or not prefix else f"{prefix}.{target}", new)
                    for value, (target, new) in _meta(field, "values").items()
                }
            )
        parser.add_argument(*spec.spellings, **kwargs)


def _rewriting(rewrite: dict[str, tuple[str, Any]]) -> type[argparse.Action]:
    """An argparse action that stores old values where they now belong ({value: (dest, new value)})."""

    class Rewriting(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            dest, value = rewrite.get(values, (self.dest, values))  # type: ignore[arg-type]
            setattr(namespace, dest, value)

    return Rewriting


def _given_values(cls: type, args: argparse.Namespace, defaults: Any, include: Iterable[str] | None) -> dict[str, Any]:
    """{dest: value} of the flags of `cls` (those `add_flags` added with `include`) on the command line."""
    given = {}
    for spec in flag_specs(cls, defaults, include):
        if hasattr(args, spec.dest):
            value = getattr(args, spec.dest)
            given[spec.dest] = tuple(value) if _meta(spec.field, "repeat") or _meta(spec.field, "many") else value
    return given


def _paths_of(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Shared-group values spread to every member not set on its own."""
    out = {k: v for k, v in values.items() if not k.startswith(SHARED)}
    members: dict[str, list[str]] = {}
    for field in dataclasses.fields(cls):
        if (group := _meta(field, "shared")) is not None:
            members.setdefault(group, []).append(field.name)
    for key, value in values.items():
        if key.startswith(SHARED):
            group, _, rest = key.removeprefix(SHARED).partition(".")
            for member in members.get(group, ()):
                out.setdefault(f"{member}.{rest}", value)
    return out


def given(
    cls: type, args: argparse.Namespace, defaults: Any = None, include: Iterable[str] | None = None
) -> dict[str, Any]:
    """{dotted field path: value} for every field the command line set (shared flags spread); pass
    the `include` that `add_flags` was given."""
    return _paths_of(cls, _given_values(cls, args, defaults, include))


def replace_paths(config: Any, values: dict[str, Any]) -> Any:
    """`config` with each dotted path set to its value (nested configs rebuilt)."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, inner in nested.items():
        top[head] = replace_paths(getattr(config, head), inner)
    return dataclasses.replace(config, **top)


def parse(cls: type, args: argparse.Namespace, defaults: Any = None, include: Iterable[str] | None = None) -> Any:
    """The config the command line gives: `defaults` with every given flag laid over it."""
    defaults = cls() if defaults is None else defaults
    return replace_paths(defaults, given(cls, args, defaults, include))


def paths(config: Any, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted path, value, field) of every leaf field of a config, nested configs flattened."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from paths(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", value, field


def flag_name(cls: type, path: str) -> str:
    """The flag that sets a dotted path of `cls` (`edge_optimizer.learning_rate` -> --edge-learning-rate)."""
    for spec in flag_specs(cls):
        if spec.dest == path:
            return spec.spellings[0]
    return _dashed(path.rpartition(".")[2])


def run_only_paths(cls: type, prefix: str = "") -> set[str]:
    """Dotted paths of the fields marked run_only (a resumed run may give them new values)."""
    found = set()
    for field in dataclasses.fields(cls):
        hint = _hint(cls, field)
        if is_config(hint):
            found |= run_only_paths(hint, f"{prefix}{field.name}.")
        elif _meta(field, "run_only", False):
            found.add(f"{prefix}{field.name}")
    return found


def comma_list(text: str) -> tuple[str, ...]:
    """'3g,wifi' -> ('3g', 'wifi'); '' -> ()."""
    return tuple(part for part in text.split(",") if part)


def int_pair(form: str, meaning: str, *, ordered: bool = False) -> Callable[[str], tuple[int, int]]:
    """A parser of 'A:B' into two integers >= 0 (with A < B when `ordered`), whose error says `form`
    and `meaning` (argparse shows it after the flag's name)."""

    def parse_pair(text: str) -> tuple[int, int]:
        first, sep, last = text.partition(":")
        if sep and first.isdigit() and last.isdigit() and (not ordered or int(first) < int(last)):
            return int(first), int(last)
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; valid: {form}, {meaning}")

    return parse_pair


def trajectory_paths(cls: type) -> list[str]:
    """Dotted paths of the fields not marked run_only: what a resumed run must share with its checkpoint."""
    run_only = run_only_paths(cls)
    return [path for path, _, _ in paths(cls()) if path not in run_only]


def as_argv(cls: type, values: dict[str, Any]) -> list[str]:
    """The flags that give these {path: value} (from `given`), as a command line would spell them."""
    argv: list[str] = []
    for spec in flag_specs(cls):
        if spec.dest not in values:
            continue
        value, flag = values[spec.dest], spec.spellings[0]
        if spec.hint is bool:
            argv.append(flag if value else f"--no-{flag.removeprefix('--')}")
        elif _meta(spec.field, "repeat"):
            for item in value:
                argv += [flag, ":".join(map(str, item)) if isinstance(item, tuple) else str(item)]
        elif _meta(spec.field, "many"):
            argv += [flag, *map(str, value)]
        elif isinstance(value, tuple):  # a comma list (`comma_list`)
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv

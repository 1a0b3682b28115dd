"""The TOML/CLI machinery of configs: check and coerce values against the dataclass types, merge recipes and
``--set``/flag overrides, validate, and write the resolved config back as TOML.

    cfg = load_config(DistillConfig, recipe="recipes/distill/tiny-cpu.toml",
                      overrides={"train.steps": 50, "optim.blr": None})   # None = not given
    save_config(cfg, run_dir / "config.toml")

TOML has no null: an optional field is unset with the string ``"none"`` (that is also how the resolved
config writes it), e.g. ``clip_grad = "none"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from hdcli.errors import HDError, closest, did_you_mean
from hdcli.rundir import atomic_write

# ---------------------------------------------------------------- generic machinery

def sections(cls) -> dict[str, type]:
    """Section name -> dataclass type of a top-level config class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls) -> list[str]:
    """Every dotted key a config class accepts (``train.batch_size``, ...)."""
    return [f"{s}.{f.name}" for s, sc in sections(cls).items() for f in dataclasses.fields(sc)]


def _unknown(key: str, cls, where: str) -> HDError:
    keys = valid_keys(cls)
    # a bare key that exists in some section is the commonest slip: suggest the dotted key directly
    exact = [k for k in keys if k.rsplit(".", 1)[1] == key.rsplit(".", 1)[-1]]
    hits = exact or closest(key, keys)
    return HDError(f"unknown config key {key!r} in {where}", f"did you mean: {', '.join(hits)}?" if hits else "")


def _is_optional(tp) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else functools.reduce(operator.or_, args)
    return False, tp


def coerce(value, tp, key: str):
    """Check/convert one value read from TOML or the CLI against the field's type; HDError naming the key."""
    optional, tp = _is_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    origin = typing.get_origin(tp)

    def bad(expected: str):
        return HDError(f"{key} must be {expected}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML and the CLI accept nan/inf; no setting means them
                raise bad("a finite number")
            return float(value)
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad("a table, e.g. {embed_dim = 48}")
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, str) and origin is list:  # "9,10" from a CLI flag
            value = [v.strip() for v in value.split(",") if v.strip()]
            if args and args[0] in (int, float):
                try:
                    value = [args[0](v) for v in value]
                except ValueError:
                    raise bad(f"a comma-separated list of {args[0].__name__}s") from None
        if not isinstance(value, list | tuple):
            raise bad("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)} values")
            return tuple(coerce(v, a, key) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else typing.Any
        out = [v if inner is typing.Any else coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    return value


def from_dict(cls, data: dict, where: str = "the recipe"):
    """Build a config from nested dicts (a parsed recipe) on top of the defaults; unknown keys -> HDError."""
    cfg = cls()
    merge(cfg, data, where)
    return cfg


def merge(cfg, data: dict, where: str) -> None:
    """Apply a nested dict ``{section: {key: value}}`` onto ``cfg`` in place, checking every key and type."""
    secs = sections(type(cfg))
    for sname, values in data.items():
        if sname not in secs:
            if sname in ("target", "targets") and "distill" in secs:  # [[target]] tables outside [distill]
                raise HDError(f"[[{sname}]] tables in {where} belong to the distill section",
                              "write each as [[distill.targets]] with teacher, kind, blocks, weight (docs/distill.md)")
            if isinstance(values, dict):  # a mistyped section name
                raise HDError(f"unknown config section [{sname}] in {where}", did_you_mean(sname, secs))
            raise _unknown(sname, type(cfg), where)  # a bare key outside any section
        if not isinstance(values, dict):
            raise HDError(f"[{sname}] in {where} must be a table of settings, got {values!r}")
        sec = getattr(cfg, sname)
        hints = typing.get_type_hints(type(sec))
        for key, value in values.items():
            if key not in hints:
                raise _unknown(f"{sname}.{key}", type(cfg), where)
            setattr(sec, key, coerce(value, hints[key], f"{sname}.{key}"))


def apply_overrides(cfg, overrides: dict[str, Any], where: str = "the command line") -> None:
    """Set dotted keys (``{"optim.blr": 1e-4}``); values of None mean 'not given' and are skipped."""
    nested: dict[str, dict] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if "." not in key:
            raise _unknown(key, type(cfg), where)
        sname, name = key.split(".", 1)
        nested.setdefault(sname, {})[name] = value
    merge(cfg, nested, where)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["optim.blr=1e-4", "student.kwargs={depth=6}"]`` -> dotted dict; values are TOML, else strings."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise HDError(f"--set expects KEY=VALUE, got {item!r}", "e.g. --set optim.min_lr=1e-6")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key.strip()] = value
    return out


def read_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HDError(f"recipe not found: {path}", "give a path to a .toml file, e.g. recipes/distill/tiny-cpu.toml")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise HDError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise HDError(f"{path} is not a text file") from None


def validate(cfg) -> None:
    """Run each section's ``validate()`` then the config's own (cross-section checks), if any."""
    for sname in sections(type(cfg)):
        check = getattr(getattr(cfg, sname), "validate", None)
        if check:
            check()
    check = getattr(cfg, "validate", None)
    if check:
        check()


def load_config(cls, recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                base: str | os.PathLike | None = None, *, preset=None):
    """Defaults <- preset <- ``base`` (a resolved config.toml, when resuming) <- recipe(s) <- CLI overrides;
    validated. ``preset(layers, overrides)`` may return ``(nested dict, where)`` applied over the defaults
    (e.g. the linear-probe recipe when one of the layers turns linear probing on), or None."""
    overrides = overrides or {}
    recipes = list(recipe) if isinstance(recipe, list | tuple) else [recipe]  # several: layered, later keys win
    layers = [(read_toml(path), str(path)) for path in (base, *recipes) if path is not None]
    cfg = cls()
    chosen = preset(layers, overrides) if preset is not None else None
    if chosen is not None:
        merge(cfg, *chosen)
    for data, where in layers:
        merge(cfg, data, where)
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- TOML writer (tomllib only reads)

def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else _string(k)


def _string(s: str) -> str:
    out = []
    for c in s:
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest round-trip form; always has '.' or 'e'
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, os.PathLike):
        return _string(os.fspath(v))
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_dict(cfg) -> dict:
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in sections(type(cfg))}


def dump_config(cfg, header: str = "") -> str:
    """The full config as TOML, one table per section (what ``tomllib`` + ``from_dict`` read back equal)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for sname, values in to_dict(cfg).items():
        if lines:
            lines.append("")
        lines.append(f"[{sname}]")
        lines += [f"{_key(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def save_config(cfg, path: str | os.PathLike, header: str = "resolved configuration of this run (hd writes it)") -> Path:
    """Write the resolved config atomically (temp file + rename)."""
    return atomic_write(path, dump_config(cfg, header))


def identity_changes(cfg, old: dict) -> dict[str, tuple[str, str]]:
    """The settings that define ``cfg``'s method and model (its class's ``IDENTITY``: sections or dotted keys)
    that differ from ``old`` (a parsed config.toml of the same run): key -> (old, new) as TOML values.

    ``old`` is read through the same types first (0 and 0.0, "none" and None, lists and tuples agree), and
    tables compare by content, not key order."""
    import json

    new = to_dict(cfg)
    try:
        before = type(cfg)()
        merge(before, old, "config.toml")
        old = to_dict(before)
    except HDError:  # a config.toml of another version: compare what it says
        pass

    def canon(v) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    changed = {}
    for item in getattr(type(cfg), "IDENTITY", ()):
        section, _, key = item.partition(".")
        keys = [key] if key else list(new.get(section, {}))
        for k in keys:
            a, b = old.get(section, {}).get(k), new.get(section, {}).get(k)
            if canon(a) != canon(b):
                changed[f"{section}.{k}"] = (toml_value(a), toml_value(b))
    return changed

"""One configuration grammar for every entry point: typed configs, presets, ``key=value``.

A *config* is a dataclass whose fields are declared with :func:`option`, which records the
field's help text and its allowed values: ``choices``, a numeric range (``ge`` / ``gt`` /
``le`` / ``lt``), ``min_len`` for tuples, or a ``check`` predicate.  From that one
declaration this module gives every entry point the same behaviour:

* **overrides** (:func:`apply_overrides`): ``key=value`` strings, typed by the field's
  annotation: ``bool`` (true/false, yes/no, on/off, 1/0), ``int``, ``float``, ``str``,
  tuples (comma separated, ``sizes=180,224``; ``protocols=`` is the empty tuple; fixed
  length ``tuple[int, int]`` too) and ``Optional`` (``epochs=none``).  Floats must be
  finite (``nan`` / ``inf`` are refused for every float key).
* **presets** (:func:`from_preset`): named dicts of field values.  A preset, then keyword
  values, then ``key=value`` strings; later ones win.
* **errors**: every wrong key, type or value raises :class:`spp_jax.errors.ConfigError`
  (also a ValueError) with one line naming the key, the value and what is allowed, e.g.
  ``dropout=1.5: must be in [0, 1)``; :func:`user_errors` turns it into an ``error: ...``
  line and exit status 1 in an entry point.
* **--help** (:func:`help_text`, :func:`cli_parser`): every key with its default, allowed
  values and meaning, in the sections the fields declare (``group=``), and the presets.
* **files** (:func:`write_config`, :func:`read_config`): the resolved config as JSON in
  the run's output directory, and back with every value's type checked and the file
  named in every error (not JSON, not an object, unknown key, missing key, wrong type,
  out of range).

Validation (:func:`validate`) checks each field's type and spec, then calls the config's
optional ``cross_check(self)`` method (rules involving several fields; raise
ConfigError), and returns a normalised copy (lists -> tuples, ints -> floats where a
float is declared).  A config may also define ``resolve(self, explicit)``, which
:func:`from_preset` and :func:`apply_overrides` call before validating, with the set of
keys the caller gave, to derive values the user left open (no-SPP training picks one
input size).  Plain dataclass fields without :func:`option` work too (no help text, no
range).

Adopting it in an entry point (experiments/train.py does exactly this)::

    @dataclasses.dataclass
    class DetConfig:
        scales: tuple[int, ...] = option((480, 576, 688, 864, 1200),
                                         "image scales (shorter side, pixels)",
                                         group="features", ge=1, min_len=1)
        svm_c: float = option(1.0, "linear SVM C", group="classifier", gt=0)
        backbone: str = option("zf5", "Table-1 backbone", choices=("zf5", "overfeat7"))

    PRESETS = {"paper": {}, "quick": {"scales": (480,)}}

    def main(argv=None):
        ap = cli_parser(DetConfig, __doc__, presets=PRESETS, default_preset="paper")
        ap.add_argument("--out", default="runs/det")
        args = ap.parse_intermixed_args(argv)
        with user_errors():
            cfg = from_preset(DetConfig, PRESETS, args.preset, args.overrides)
            write_config(cfg, args.out)
            ...

``--help`` then lists every key, ``svm_c=-1`` exits 1 with ``error: svm_c=-1.0: must be
> 0``, and ``read_config(DetConfig, "runs/det/config.json")`` reads the run back.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import numbers
import os
import textwrap
import types
import typing
from typing import Any, Callable, Iterable, Mapping, Sequence

from spp_jax import atomic
from spp_jax.errors import ConfigError, UserError

__all__ = ["Spec", "option", "spec_of", "parse_value", "coerce_value", "check_value", "parse_overrides",
           "apply_overrides", "from_preset", "validate", "config_dict", "write_config",
           "read_config", "from_dict", "help_text", "cli_parser", "reject_flags", "user_errors"]

_META = "spp_jax.config_grammar"


# ---------------------------------------------------------------------------------------
# Field declarations
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """What one config key means and allows (stored in the dataclass field's metadata).

    For tuples, ``choices`` and the range apply to each value and ``min_len`` to the count.
    ``choices`` may be a zero-argument callable (imported lazily, e.g. the model names).
    ``check(value)`` returns None when the value is fine, else why not (text).
    ``group`` starts a section of ``--help``; fields without one stay in the previous
    field's section.  ``optional_in_file``: a config file without this key gets the
    default (for keys added after files were written); other keys must be present.
    """

    help: str = ""
    group: str | None = None
    choices: Sequence | Callable[[], Sequence] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_len: int | None = None
    check: Callable[[Any], str | None] | None = None
    optional_in_file: bool = False

    def allowed(self) -> tuple | None:
        c = self.choices() if callable(self.choices) else self.choices
        return None if c is None else tuple(c)

    def range_text(self) -> str | None:
        lo = (f"[{_num(self.ge)}" if self.ge is not None else
              f"({_num(self.gt)}" if self.gt is not None else None)
        hi = (f"{_num(self.le)}]" if self.le is not None else
              f"{_num(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return None

    def describe(self) -> str:
        """The rule as shown by --help: "one of: a, b", "in [0, 1)", ">= 1", ..."""
        parts = []
        allowed = self.allowed()
        if allowed is not None:
            parts.append("one of: " + ", ".join(_spell(a) for a in allowed))
        if self.range_text():
            parts.append(self.range_text())
        if self.min_len:
            parts.append(f"at least {self.min_len} value{'s' if self.min_len > 1 else ''}")
        return "; ".join(parts)

    def scalar_violation(self, v) -> str | None:
        """Why one (non-None, correctly typed) value is not allowed, or None."""
        allowed = self.allowed()
        if allowed is not None and v not in allowed:
            return "must be one of: " + ", ".join(_spell(a) for a in allowed)
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        ok = ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
              and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))
        return None if ok else f"must be {self.range_text()}"


def option(default, help: str, *, group: str | None = None, choices=None, ge=None, gt=None,
           le=None, lt=None, min_len: int | None = None, check=None,
           optional_in_file: bool = False):
    """A config field: ``name: type = option(default, "what it means", ...)`` (see :class:`Spec`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable: use a tuple")
    spec = Spec(help, group, choices, ge, gt, le, lt, min_len, check, optional_in_file)
    return dataclasses.field(default=default, metadata={_META: spec})


def spec_of(field: dataclasses.Field) -> Spec:
    """A field's :class:`Spec` (an empty one for plain dataclass fields)."""
    return field.metadata.get(_META, Spec())


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


# ---------------------------------------------------------------------------------------
# Types: text -> value (command lines), value -> value (Python and JSON), checks
# ---------------------------------------------------------------------------------------
def _optional_inner(tp):
    """(True, X) for Optional[X] / X | None, else (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported config type {tp}: only Optional[X] unions")
        return type(None) in args, inner[0]
    return False, tp


def _tuple_elems(tp, n: int) -> list | None:
    """Element types of a tuple annotation for n values, or None if tp is not a tuple."""
    if typing.get_origin(tp) is not tuple:
        return None
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return [args[0]] * n
    return list(args)


_TYPE_NAMES = {bool: ("a bool (true/false)", "bools"), int: ("an int", "ints"),
               float: ("a float", "floats"), str: ("a string", "strings")}


def _type_name(tp) -> str:
    optional, tp = _optional_inner(tp)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        name = (f"a comma-separated list of {_TYPE_NAMES.get(args[0], ('', str(args[0])))[1]}"
                if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} comma-separated values")
    else:
        name = _TYPE_NAMES.get(tp, (str(tp),))[0]
    return f"none or {name}" if optional else name


def parse_value(key: str, text: str, tp) -> Any:
    """Command-line text -> a value of annotation ``tp`` (raises ConfigError naming ``key``)."""
    optional, tp = _optional_inner(tp)
    t = text.strip()
    if optional and t.lower() in ("none", "null", ""):
        return None
    if typing.get_origin(tp) is tuple:
        parts = [p.strip() for p in t.strip("()[]").split(",") if p.strip()]
        elems = _tuple_elems(tp, len(parts))
        if len(elems) != len(parts):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")
        return tuple(parse_value(key, p, e) for p, e in zip(parts, elems))
    if tp is bool:
        low = t.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    elif tp in (int, float):
        try:
            return tp(t)
        except ValueError:
            pass
    elif tp is str:
        return t
    else:
        raise TypeError(f"{key}: unsupported config type {tp}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")


def coerce_value(key: str, value, tp) -> Any:
    """A Python or JSON value -> the field's type, strictly (raises ConfigError naming ``key``).

    Lossless normalisations only: a list becomes a tuple, an int a float where a float
    is declared.  "0.5" is not a float, 1 is not a bool, 1.0 is not an int.
    """
    optional, tp = _optional_inner(tp)
    if value is None and optional:
        return None
    if typing.get_origin(tp) is tuple and isinstance(value, (list, tuple)):
        elems = _tuple_elems(tp, len(value))
        if len(elems) == len(value):
            return tuple(coerce_value(key, v, e) for v, e in zip(value, elems))
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    elif tp is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    elif tp is str and isinstance(value, str):
        return value
    elif tp not in (bool, int, float, str) and typing.get_origin(tp) is not tuple:
        raise TypeError(f"{key}: unsupported config type {tp}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _check(key: str, value, spec: Spec) -> None:
    """Raise ConfigError if a typed value breaks its spec."""
    if value is None:
        return
    if not isinstance(value, tuple):
        why = spec.scalar_violation(value)
    elif spec.min_len and len(value) < spec.min_len:
        why = f"must have at least {spec.min_len} value{'s' if spec.min_len > 1 else ''}"
    else:
        bad = [(v, w) for v in value for w in [spec.scalar_violation(v)] if w]
        why = f"each value {bad[0][1]} (got {_spell(bad[0][0])})" if bad else None
    if why is None and spec.check is not None:
        why = spec.check(value)
    if why:
        raise ConfigError(f"{key}={_spell(value)}: {why}")


def _coerced(cfg):
    """``cfg`` with every field coerced to its declared type (ConfigError if impossible)."""
    hints = _hints(type(cfg))
    return dataclasses.replace(cfg, **{name: coerce_value(name, getattr(cfg, name), hints[name])
                                       for name in _fields(type(cfg))})


def check_value(key: str, value, tp, **rule) -> Any:
    """One value outside a config class (e.g. a library function's argument): coerced to
    ``tp`` and checked against ``rule`` (:class:`Spec` keywords: choices, ge, gt, le, lt,
    min_len, check); raises ConfigError ``key=value: ...``."""
    v = coerce_value(key, value, tp)
    _check(key, v, Spec(**rule))
    return v


def validate(cfg):
    """Check every field's type and spec, then ``cfg.cross_check()``; returns a normalised copy."""
    out = _coerced(cfg)
    for name, f in _fields(type(cfg)).items():
        _check(name, getattr(out, name), spec_of(f))
    if hasattr(out, "cross_check"):
        out.cross_check()
    return out


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _spell(v) -> str:
    """A value as it is written on the command line (``true``, ``none``, ``180,224``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(_spell(x) for x in v) if v else "''"
    if isinstance(v, str):
        return repr(v) if (not v or any(c in v for c in " ,=")) else v
    return repr(v)


# ---------------------------------------------------------------------------------------
# Overrides and presets
# ---------------------------------------------------------------------------------------
def _unknown_key(cls, key: str, source: str = "") -> ConfigError:
    where = f"{source}: " if source else ""
    return ConfigError(f"{where}unknown config key {key!r}; valid keys: {', '.join(_fields(cls))}")


def parse_overrides(cls, overrides: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> {key: typed value} for config class ``cls`` (later ones win)."""
    fields, hints, out = _fields(cls), _hints(cls), {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (see --help for the keys)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise _unknown_key(cls, key)
        out[key] = parse_value(key, text, hints[key])
    return out


def _finish(cfg, explicit: Iterable[str]):
    """Type-normalise, let the config derive what the user left open, then validate."""
    cfg = _coerced(cfg)
    if hasattr(cfg, "resolve"):
        cfg = cfg.resolve(frozenset(explicit))
    return validate(cfg)


def apply_overrides(cfg, overrides: Iterable[str]):
    """A new, validated config: ``cfg`` with ``["key=value", ...]`` applied."""
    changes = parse_overrides(type(cfg), overrides)
    return _finish(dataclasses.replace(cfg, **changes), changes)


def from_preset(cls, presets: Mapping[str, Mapping[str, Any]], preset: str,
                overrides: Iterable[str] = (), **kwargs):
    """``cls()`` with a named preset, then keyword values, then ``key=value`` strings; validated."""
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; valid: {', '.join(presets)}")
    for k in kwargs:
        if k not in _fields(cls):
            raise _unknown_key(cls, k)
    changes = {**kwargs, **parse_overrides(cls, overrides)}
    cfg = dataclasses.replace(cls(), **{**presets[preset], **changes})
    return _finish(cfg, changes)


# ---------------------------------------------------------------------------------------
# JSON files
# ---------------------------------------------------------------------------------------
def config_dict(cfg) -> dict[str, Any]:
    """The config as a JSON-able dict (tuples become lists when dumped)."""
    return {name: getattr(cfg, name) for name in _fields(type(cfg))}


def with_file_defaults(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` (a config as read from a file) with every ``optional_in_file`` key it lacks set
    to its default: a file written before such a key existed means that key's default."""
    base = cls()
    filled = {k: getattr(base, k) for k, f in _fields(cls).items()
              if k not in raw and spec_of(f).optional_in_file}
    return {**json.loads(json.dumps(filled)), **raw}


def write_config(cfg, directory: str | os.PathLike, name: str = "config.json") -> str:
    """Write ``cfg`` as JSON to ``directory/name`` atomically (temp file, rename); returns the path."""
    path = os.path.join(os.fspath(directory), name)
    atomic.write_text(path, json.dumps(config_dict(cfg), indent=1) + "\n")  # never half a file
    return path


def from_dict(cls, raw: Mapping[str, Any], source: str = "config"):
    """A validated ``cls`` from a mapping of every key (JSON values); errors start with ``source``."""
    fields, hints = _fields(cls), _hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise _unknown_key(cls, unknown[0], source)
    missing = [k for k, f in fields.items() if k not in raw and not spec_of(f).optional_in_file]
    if missing:
        raise ConfigError(f"{source}: missing key{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)} (the file must list every key)")
    try:
        return validate(cls(**{k: coerce_value(k, v, hints[k]) for k, v in raw.items()}))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_config(cls, path: str | os.PathLike):
    """Read a config JSON file written by :func:`write_config`; every error names the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON config file ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys, got {type(raw).__name__}")
    return from_dict(cls, raw, source=path)


# ---------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------
def help_text(cls, presets: Mapping[str, Mapping[str, Any]] | None = None, width: int = 100) -> str:
    """Every key of ``cls`` with its default, allowed values and meaning; then the presets."""
    lines, group, default = ["config keys (key=value; the default is shown):"], None, cls()
    for name, f in _fields(cls).items():
        spec = spec_of(f)
        if spec.group and spec.group != group:
            group = spec.group
            lines += ["", f"{group}:"]
        head = f"  {name}={_spell(getattr(default, name))}"
        rule = f"[{spec.describe()}]" if spec.describe() else ""
        pad = 34
        if len(head) >= pad - 1:
            lines.append(head)
            head = ""
        wrapped = textwrap.wrap(spec.help, width - pad) or [""]
        if rule and len(wrapped[-1]) + len(rule) + 1 > width - pad:
            wrapped.append(rule)  # the rule is never split across lines
        elif rule:
            wrapped[-1] = f"{wrapped[-1]} {rule}".strip()
        lines.append(head.ljust(pad) + wrapped[0])
        lines += [" " * pad + w for w in wrapped[1:]]
    if presets:
        lines += ["", "presets (--preset NAME sets these keys; key=value arguments then win):"]
        for pname, values in presets.items():
            body = " ".join(f"{k}={_spell(v)}" for k, v in values.items()) or "(the defaults above)"
            lines += textwrap.wrap(body, width, initial_indent=f"  {pname}: ",
                                   subsequent_indent=" " * 6)
    return "\n".join(lines)


def cli_parser(cls, description: str, *, presets: Mapping[str, Mapping[str, Any]] | None = None,
               default_preset: str | None = None, preset_help: str | None = None
               ) -> argparse.ArgumentParser:
    """An argparse parser with ``[--preset NAME] [key=value ...]`` and the keys in ``--help``.

    Add the entry point's own flags to it; parse with ``parse_intermixed_args`` so flags
    and ``key=value`` may come in any order.  ``--preset`` is checked by
    :func:`from_preset` (a ConfigError, so exit status 1 like every bad value).
    """
    ap = argparse.ArgumentParser(description=description, epilog=help_text(cls, presets),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        ap.add_argument("--preset", default=default_preset, metavar="|".join(presets),
                        help=preset_help or f"config preset (default: {default_preset})")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config keys to change (listed below)")
    return ap


def reject_flags(extras: Sequence[str], cls, old_flags: Mapping[str, str] | None = None) -> None:
    """Unknown ``--flags`` left by ``parse_known_intermixed_args`` -> ConfigError naming what to use.

    ``old_flags`` maps a retired flag's name (``no_progress``) to its new spelling
    (``progress=false``); a flag named like a key (``--svm-c``) is told ``svm_c=VALUE``.
    """
    flags = [e for e in extras if e.startswith("-")]
    if not flags:
        return
    name = flags[0].lstrip("-").split("=", 1)[0].replace("-", "_")
    use = (old_flags or {}).get(name) or (f"{name}=VALUE" if name in _fields(cls) else None)
    hint = f"use {use}" if use else "the options are --preset, --workdir and key=value (see --help)"
    raise ConfigError(f"unknown option {flags[0]}: {hint}")


@contextlib.contextmanager
def user_errors(*also: type[BaseException]):
    """In an entry point: a UserError (or one of ``also``) becomes ``error: ...`` on stderr, exit 1.

    Any other exception keeps its traceback: it is a bug.
    """
    try:
        yield
    except (UserError, *also) as e:
        raise SystemExit(f"error: {e}") from None

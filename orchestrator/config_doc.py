"""`sputnik config [--config FILE] [overrides]`: every config key with its value, default, type,
allowed range and a one-line description, read from the config dataclasses themselves (the
description is the comment beside or above the field in the source), so it cannot drift from them.

Test: `pytest tests/orchestrator/test_orch_config.py -k sputnik_config`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Annotated, Any, Literal

from orchestrator.config import RunConfig

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def _comments(cls) -> dict[str, str]:
    """field name -> the comment beside it, or the comment lines just above it; a subclass's
    fields without a comment of their own keep their base class's (SFTConfig's pretraining keys)."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in inspect.getmro(cls) if k is not object]):
        out.update({k: v for k, v in _own_comments(klass).items() if v or k not in out})
    return out


def _own_comments(cls) -> dict[str, str]:
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = _FIELD.match(line) if not stripped.startswith(("def ", "@", '"""')) else None
        if m and not m.group(1).startswith("__"):
            # a comment above a field describes it when it is a sentence, not a group heading
            out[m.group(1)] = m.group(2) or (" ".join(above) if len(" ".join(above).split()) >= 3 else "")
        above = []
    return out


def _type_and_range(tp: Any) -> tuple[str, str]:
    """('int', '>= 1') from Annotated[int, Field(ge=1)]; choices for a Literal; Optional shown as '| None'."""
    bounds = []
    if typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
        for m in meta:
            for item in getattr(m, "metadata", []) or [m]:
                for op, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                    if getattr(item, op, None) is not None:
                        bounds.append(f"{sym} {getattr(item, op)}")
    args = typing.get_args(tp)
    optional = type(None) in args and typing.get_origin(tp) is not Literal
    if optional:
        inner = [a for a in args if a is not type(None)]
        name, rng = _type_and_range(inner[0]) if len(inner) == 1 else (" | ".join(map(_name, inner)), "")
        return f"{name} | None", rng
    if typing.get_origin(tp) is Literal:
        return "choice", " | ".join(str(a) for a in args)
    return _name(tp), ", ".join(bounds)


def _name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def describe(cfg: RunConfig) -> list[dict]:
    """One row per leaf key: key, value, default, type, range, description."""
    rows = []

    def walk(obj, prefix: str) -> None:
        cls = type(obj)
        hints = typing.get_type_hints(cls, include_extras=True)
        notes = _comments(cls)
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            tp, rng = _type_and_range(hints.get(f.name, Any))
            rows.append({"key": key, "value": value, "default": default, "type": tp, "range": rng, "description": notes.get(f.name, "")})

    walk(cfg, "")
    return rows


def run(cfg: RunConfig, cli_args) -> int:
    rows = describe(cfg)
    cols = ("key", "value", "default", "type", "range", "description")
    text = [[_show(r[c]) for c in cols] for r in rows]
    widths = [min(40, max(len(c), *(len(t[i]) for t in text))) for i, c in enumerate(cols[:-1])]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "  description")
    for t in text:
        print("  ".join(v[:w].ljust(w) for v, w in zip(t, widths)) + "  " + t[-1])
    print(f"\n{len(rows)} keys; change any with KEY=VALUE after the command, e.g. `sputnik grpo grpo.group_size=16`.")
    return 0


def _show(v: Any) -> str:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return "{" + ", ".join(f"{f.name}: {_show(getattr(v, f.name))}" for f in dataclasses.fields(v)) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return str(v)

"""``NAME=VALUE,NAME=VALUE`` lists, as options (``--filters``, ``--window``, ``--decide``) and
source specs (``sim:rate=R,...``) write them: one reader, so they all take the same spelling
(blanks around parts and names allowed, empty parts skipped) and refuse it the same way."""

from __future__ import annotations

import math
from collections.abc import Iterable


def name_values(text: str, names: Iterable[str]) -> dict[str, str]:
    """``"a=1, b=2"`` -> ``{"a": "1", "b": "2"}``, every name one of ``names``, none twice.

    Raises ValueError naming the part at fault and the names allowed.
    """
    known = tuple(names)
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = (s.strip() for s in part.partition("="))
        if not eq or name not in known:
            raise ValueError(f"{part!r} is not NAME=VALUE with NAME one of {', '.join(known)}")
        if name in out:
            raise ValueError(f"{name} is given twice")
        out[name] = value
    return out


def name_numbers(text: str, names: Iterable[str]) -> dict[str, float]:
    """:func:`name_values` with every value a finite number (ValueError naming the one that is not)."""
    out: dict[str, float] = {}
    for name, value in name_values(text, names).items():
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        out[name] = number
    return out

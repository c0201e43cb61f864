"""A faster ``dataclasses.replace`` for the records changed once or more per report.

``dataclasses.replace`` looks up the class's fields and checks them on every call (about
9 µs for a device record, four times per report); :func:`evolve` keeps, per class, one
``attrgetter`` that reads every field in C and the position of each field, and builds the
new record directly (3.6 µs for a device, 2.6 of them the frozen class's ``__init__``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from typing import Any, TypeVar

T = TypeVar("T")

_SHAPES: dict[type, tuple[Callable[[Any], tuple[Any, ...]], dict[str, int]]] = {}


def evolve(record: T, **changes: Any) -> T:
    """A copy of the dataclass instance ``record`` with ``changes`` (field name -> value).

    Unlike ``dataclasses.replace`` it does not check that every name in ``changes`` is a
    field (a name that is not raises KeyError): the callers are few, typed, and tested.
    """
    cls = type(record)
    shape = _SHAPES.get(cls)
    if shape is None:
        shape = _SHAPES[cls] = _shape(cls)
    read, position = shape
    values = list(read(record))
    for name, value in changes.items():
        values[position[name]] = value
    return cls(*values)


def _shape(cls: type) -> tuple[Callable[[Any], tuple[Any, ...]], dict[str, int]]:
    names = [f.name for f in fields(cls)]
    many = attrgetter(*names)
    read = many if len(names) > 1 else (lambda record: (many(record),))
    return read, {name: index for index, name in enumerate(names)}

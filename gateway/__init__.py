"""The Tokenwell gateway.

Its pure core (:data:`CORE`: the charging rule, the token economics, verifying and
charging a batch, the registry's packed records, the MQTT byte stream split into
packets, topics, flood counts, operator views) may also be compiled with mypyc
into C extensions, by ``scripts/setup`` (``scripts/compile_core.py``), into
``gateway/_compiled``: the same code, with less CPU a report (docs/performance.md).
Those modules are then imported from there, but only while the build is of these very
sources, for this Python (its manifest holds each source's SHA-256 and the extensions'
suffix), and ``TOKENWELL_PURE`` is not set; otherwise, as without a build, from their
Python source.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
from collections.abc import Mapping
from pathlib import Path

# The compiled core: pure modules on every report's path. Not wire (the boundary with
# hostile input, where a compiled function's own type checks would raise TypeError
# before its code can refuse a wrong type with a reason), nor pricing (the same, for the
# configuration), nor keytable (its tests replace its hash function, which compiled
# callers would not see).
CORE = (
    "metering", "economics", "ingest", "packing", "records", "mqtt_packets", "topics",
    "flood", "views",
)  # fmt: skip
COMPILED_DIR = Path(__file__).with_name("_compiled")
MANIFEST = "manifest.json"  # what build_manifest() returned when it was built


def core_digests(sources: Path = Path(__file__).parent) -> dict[str, str]:
    """The SHA-256 of each :data:`CORE` module's source in ``sources``."""
    digest = hashlib.sha256
    return {name: digest((sources / f"{name}.py").read_bytes()).hexdigest() for name in CORE}


def build_manifest(sources: Path = Path(__file__).parent) -> dict[str, object]:
    """What a build of the core from ``sources`` for this interpreter records: the
    sources' digests, and the file suffix this interpreter's import system looks for
    first in extension modules (a build for another Python is no build for this one;
    read from ``importlib``, imported already, rather than ``sysconfig``, which would
    add a millisecond to every process's start)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return {"sources": core_digests(sources), "extension": suffix}


def usable_build(
    build: Path = COMPILED_DIR,
    sources: Path = Path(__file__).parent,
    environ: Mapping[str, str] = os.environ,
) -> bool:
    """Whether the compiled core in ``build`` may be used: it is there, ``TOKENWELL_PURE``
    is not set, and its manifest is :func:`build_manifest` of ``sources``."""
    if environ.get("TOKENWELL_PURE"):
        return False
    try:
        manifest = json.loads((build / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(manifest == build_manifest(sources))


def core_is_compiled() -> bool:
    """Whether the core modules in use are the compiled ones."""
    from gateway import metering  # here, not above: this module is imported first

    return not (metering.__file__ or "").endswith(".py")


if usable_build():
    __path__.insert(0, str(COMPILED_DIR))  # searched first: only the core is there

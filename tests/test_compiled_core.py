"""The compiled core (gateway/__init__.py, scripts/compile_core.py): used only while it is
the build of the very sources beside it, never when ``TOKENWELL_PURE`` is set; and built
by the set-up wherever there is a C compiler, in this process and in the gateway's own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import gateway


def _sources(tmp_path: Path) -> Path:
    sources = tmp_path / "sources"
    sources.mkdir()
    for name in gateway.CORE:
        (sources / f"{name}.py").write_text(f"# {name}\n", encoding="utf-8")
    return sources


def _build(tmp_path: Path, manifest: object) -> Path:
    build = tmp_path / "build"
    build.mkdir()
    (build / gateway.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return build


def test_only_a_build_of_these_very_sources_is_used(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    build = _build(tmp_path, gateway.build_manifest(sources))
    assert gateway.usable_build(build, sources, environ={})
    assert not gateway.usable_build(build, sources, environ={"TOKENWELL_PURE": "1"})
    (sources / "economics.py").write_text("# economics, changed since\n", encoding="utf-8")
    assert not gateway.usable_build(build, sources, environ={})


@pytest.mark.parametrize(
    "manifest",
    [None, [], {}, {"sources": {}}, {"sources": {"metering": "0" * 64}}, "another Python"],
)
def test_a_missing_or_broken_manifest_means_no_build(tmp_path: Path, manifest: object) -> None:
    sources = _sources(tmp_path)
    if manifest == "another Python":  # the very sources, built for other extensions
        manifest = {**gateway.build_manifest(sources), "extension": ".cpython-312-x.so"}
    build = _build(tmp_path, manifest)
    assert not gateway.usable_build(build, sources, environ={})
    assert not gateway.usable_build(tmp_path / "nowhere", sources, environ={})
    (build / gateway.MANIFEST).write_bytes(b"\xff not json")
    assert not gateway.usable_build(build, sources, environ={})


def _compiled_in_a_new_process(environ: dict[str, str]) -> bool:
    command = [sys.executable, "-c", "import gateway; print(gateway.core_is_compiled())"]
    done = subprocess.run(command, capture_output=True, text=True, env=environ, check=True)
    return done.stdout.strip() == "True"


PYTHON_H = Path(sysconfig.get_paths()["include"], "Python.h")
CAN_COMPILE = bool(shutil.which("cc")) and PYTHON_H.exists()


@pytest.mark.skipif(not CAN_COMPILE, reason="no C compiler or Python headers: runs as Python")
@pytest.mark.skipif(bool(os.environ.get("TOKENWELL_PURE")), reason="TOKENWELL_PURE is set")
def test_the_set_up_compiled_the_core_and_the_gateway_runs_it() -> None:
    """Where there is a C compiler (and Python's headers), ``scripts/setup`` compiled the
    core: a set-up that silently stopped doing so would cost the event loop a fifth more
    work a report."""
    assert gateway.usable_build()
    assert gateway.core_is_compiled()
    assert _compiled_in_a_new_process(dict(os.environ))
    assert not _compiled_in_a_new_process({**os.environ, "TOKENWELL_PURE": "1"})

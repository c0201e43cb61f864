"""Compile the gateway's pure core (``gateway.CORE``) with mypyc into ``gateway/_compiled``.

Run by ``scripts/setup`` (``.venv/bin/python scripts/compile_core.py``); does nothing
when the build there is already of the current sources. Writes the build's manifest last,
so a build that failed half-way is never used (gateway/__init__.py). Exits non-zero when
it cannot compile (no C compiler, no mypyc): the gateway then runs the same modules as
Python.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's gateway, whichever one the venv installed

import gateway  # noqa: E402

SETUP = """
import sys
from mypyc.build import mypycify
from setuptools import setup

setup(
    name="tokenwell-core",
    ext_modules=mypycify(sys.argv[1:], group_name="gateway.core", opt_level="3"),
    script_args=["build_ext", "--build-lib", "lib", "--build-temp", "temp"],
)
"""


def main() -> int:
    build, sources = gateway.COMPILED_DIR, Path(gateway.__file__).parent
    if gateway.usable_build(environ={}):  # TOKENWELL_PURE says what runs, not what is built
        return 0
    # mypy options may go with the paths; msgpack, paho and PyNaCl have no type stubs.
    paths = ["--ignore-missing-imports", *(str(sources / f"{name}.py") for name in gateway.CORE)]
    with tempfile.TemporaryDirectory() as work:
        done = subprocess.run(
            [sys.executable, "-c", SETUP, *paths], cwd=work, capture_output=True, text=True
        )
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
            return 1
        shutil.rmtree(build, ignore_errors=True)
        shutil.copytree(Path(work, "lib", "gateway"), build)
    manifest = gateway.build_manifest()
    (build / gateway.MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

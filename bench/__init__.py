"""Tokenwell's benchmark (``python -m bench``); method in bench/run.py and docs/performance.md."""

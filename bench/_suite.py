"""Bench scripts as modules: the planner suite's scenarios for the scripts built on them (``work_clock.py``,
``seed_spread.py``), and any bench script for a test of its parts.

``bench/planner.py`` cannot be imported by its name from a script in ``bench/`` (that name is the
package it benchmarks), so it is loaded once under another.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

NAME = "planner_suite"


def bench_module(script: str, name: str | None = None) -> ModuleType:
    """``bench/<script>.py`` as the module ``name`` (default: the script's), loaded once. Registered before it
    runs, as an import would be: its dataclasses look their module up by name."""
    name = name or script
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{script}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def planner_suite() -> ModuleType:
    """``bench/planner.py`` as a module (its SUITE, PROMPTS, offers_for, ...), loaded once."""
    return bench_module("planner", NAME)

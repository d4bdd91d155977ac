"""The planner suite's scenarios for the bench scripts built on them (``work_clock.py``, ``seed_spread.py``).

``bench/planner.py`` cannot be imported by its name from a script in ``bench/`` (that name is the
package it benchmarks), so it is loaded once under another.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

NAME = "planner_suite"


def planner_suite() -> ModuleType:
    """``bench/planner.py`` as a module (its SUITE, PROMPTS, offers_for, ...), loaded once."""
    if NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(NAME, Path(__file__).resolve().parent / "planner.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[NAME]

"""Eviction policies ("presses"): scoring only. The cut lives in ``engine/compress.py``.

Importing this package registers every press (one module per family).
"""

from knormctl.engine.presses.base import PRESSES, BasePress, make_press, press_names, register
from knormctl.engine.presses import simple  # noqa: F401  (registers knorm, knorm-inverse, random, streaming)

__all__ = ["PRESSES", "BasePress", "make_press", "press_names", "register"]

"""Eviction policies ("presses"): scoring only. The cut lives in ``engine/compress.py``.

Importing this package registers every press (one module per family); ``kvpress:Name``
specs are built on demand by ``kvpress_backend.py`` (optional dependency).
"""

from knormctl.engine.presses.base import (PRESSES, BasePress, Param, check_model_support, make_press, press_names,
                                          press_parameters, register, resolve_press)
from knormctl.engine.presses import simple  # noqa: F401  (knorm, knorm-inverse, random, streaming, keydiff)
from knormctl.engine.presses import attention  # noqa: F401  (snapkv, tova, pyramidkv, expected-attention)
from knormctl.engine.presses import wrappers  # noqa: F401  (adakv, criticalkv)

__all__ = ["PRESSES", "BasePress", "Param", "check_model_support", "make_press", "press_names", "press_parameters", "register",
           "resolve_press"]

"""Lazy package exports: ``from moekit import MoETransformer`` works, but ``import moekit``
(and so ``moekit --help`` and ``moekit presets``) does not import torch, which alone takes
about a second and a half.

A package lists its public names and the submodules that define them; a name's module is
imported on first use (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``; ``exports`` maps name -> defining module."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


__all__ = ["lazy_exports"]

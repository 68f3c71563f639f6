"""Argument types for the command line that refuse bad numbers while parsing.

argparse reports a refused value as one line and exit status 2 before any work starts:
``moekit demo: error: argument --steps: must be >= 1, got -1``. Every numeric flag uses one
of these (tests/test_cli_bad_input.py holds every subcommand to it), so ``--batch-size 0`` or
``--temperature nan`` never reaches torch or numpy to fail there in their words.
"""

from __future__ import annotations

import argparse
import math


class IntArg:
    """An integer >= ``minimum``, and <= ``maximum`` when given."""

    def __init__(self, minimum: int, maximum: int | None = None):
        self.minimum, self.maximum = minimum, maximum
        self.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if self.maximum is not None and not self.minimum <= value <= self.maximum:
            raise argparse.ArgumentTypeError(f"must be in [{self.minimum}, {self.maximum}], got {value}")
        if value < self.minimum:
            raise argparse.ArgumentTypeError(f"must be >= {self.minimum}, got {value}")
        return value

    def __repr__(self) -> str:
        return f"IntArg({self.minimum}, {self.maximum})"


class FloatArg:
    """A finite number >= ``minimum`` (> when ``strict``), and <= ``maximum`` when given."""

    def __init__(self, minimum: float, *, strict: bool = False, maximum: float | None = None):
        self.minimum, self.strict, self.maximum = minimum, strict, maximum
        self.__name__ = "number"

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < self.minimum or (self.strict and value == self.minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if self.strict else '>='} {self.minimum}, got {text}")
        if self.maximum is not None and value > self.maximum:
            raise argparse.ArgumentTypeError(f"must be <= {self.maximum:g}, got {text}")
        return value

    def __repr__(self) -> str:
        return f"FloatArg({self.minimum}, strict={self.strict}, maximum={self.maximum})"


positive_int = IntArg(1)  # counts: steps, batch sizes, lengths, threads
nonneg_int = IntArg(0)  # seeds, warm-up steps
positive_float = FloatArg(0.0, strict=True)  # learning rates, minutes, scales
nonneg_float = FloatArg(0.0)  # temperatures (0 = greedy)

__all__ = ["IntArg", "FloatArg", "positive_int", "nonneg_int", "positive_float", "nonneg_float"]

"""The one exception type for user errors (STYLE.md: raised deep, printed once at the CLI edge)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HDError(Exception):
    """A problem the user can fix: ``problem`` says what is wrong, ``hint`` how to fix it.

    The CLI prints it as one red line (``error: problem (hint)``) and exits 2; with ``--debug``
    the full traceback is shown instead.
    """

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.problem} ({self.hint})" if self.hint else self.problem


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` closest names to ``word`` among ``choices`` (for 'did you mean' hints)."""
    choices = list(choices)
    hits = difflib.get_close_matches(word, choices, n=n, cutoff=0.4)
    return hits or sorted(choices, key=lambda c: -difflib.SequenceMatcher(None, word, c).ratio())[:n]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint naming the closest valid choices, e.g. ``did you mean: mae, mae-l?``."""
    hits = closest(word, choices)
    return f"did you mean: {', '.join(hits)}?" if hits else ""

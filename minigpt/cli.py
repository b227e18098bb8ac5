"""The command line's argument parser: argparse with one-line errors that name the fix.

`python -m minigpt` and its `bench kernels` / `bench serve` suites all parse with `Parser`.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

__all__ = ["Parser", "did_you_mean"]

# argparse reads a word that starts with "-" as a flag unless it looks like a negative number, and before
# Python 3.14 "-1e-3" does not (only "-1" and "-0.5" do): `--lr -1e-3` failed with "expected one argument".
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the fix.

    argparse prints the usage before an error, and ``train``'s usage is dozens of lines of flags
    that bury the one line that matters; an unknown flag gets the closest real one instead
    (Python 3.11's argparse has no ``suggest_on_error``). Abbreviations are off: ``--max-step``
    was silently taken for ``--max-steps`` (and ``--model.n_layer`` for ``--model.n_layers``),
    and a prefix that is unique today becomes ambiguous when a flag is added.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER  # argparse's own attribute: "-1e-3" is a value
        self.commands: argparse._SubParsersAction | None = None

    def add_subparsers(self, **kwargs: Any) -> argparse._SubParsersAction:
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:  # a mistyped subcommand or choice names the closest real one
            message += did_you_mean(choice[1], (c.strip(" '") for c in choice[2].split(",")))
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """Leftover arguments are reported by the subcommand's parser, which knows the flags to suggest."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            target = self.commands.choices.get(str(getattr(parsed, self.commands.dest, None)), self) if self.commands else self
            target.error(_unrecognized(extras, [s for a in target._actions for s in a.option_strings]))
        return parsed


def _closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice most like `word` (difflib's ratio, at least 0.6), or None."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return match[0] if match else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean kernels?' naming the choice closest to `word`, or '' when none is close."""
    match = _closest(word, choices)
    return f"; did you mean {match}?" if match else ""


def _unrecognized(extras: list[str], options: list[str]) -> str:
    """'unrecognized argument --max-step; did you mean --max-steps?' (values after an unknown flag are left out).

    Names are compared without their dashes (every flag shares the ``--``, which would make ``--foo``
    look like ``--lr``), and a suggestion equal to what was typed (a flag after ``--``) is none.
    """
    bare = {o.lstrip("-"): o for o in options}
    words = [w for w in extras if w != "--"]
    hints: list[tuple[str, str | None]] = []
    for word in [w for w in words if w.startswith("-")] or words:
        name = word.split("=", 1)[0]
        closest = _closest(name.lstrip("-"), bare) if word.startswith("-") else None
        match = bare[closest] if closest else None
        hints.append((word, match if match != name else None))
    if len(hints) == 1:
        word, match = hints[0]
        return f"unrecognized argument {word}" + (f"; did you mean {match}?" if match else "")
    return "unrecognized arguments " + ", ".join(f"{w} (did you mean {m}?)" if m else w for w, m in hints)

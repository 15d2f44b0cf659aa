"""The library's errors: every error it raises on purpose derives from :class:`SpectralPeftError`.

Each class also derives from the built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``,
``FileExistsError``), so ``except ValueError`` keeps working. Messages are one line: what is wrong and what to do.
The command line prints that line and exits with status 2; any other exception is a bug, printed as one line with a
pointer to ``--debug``.

| class | built-in base | raised for |
|---|---|---|
| :class:`InputError` | ``ValueError`` | a bad value: a spec, a range, a non-finite number, a malformed file |
| :class:`MissingInputError` | ``FileNotFoundError`` | a path that should exist and does not |
| :class:`OutputExistsError` | ``FileExistsError`` | an output that exists and may not be replaced |
"""

from __future__ import annotations


class SpectralPeftError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(SpectralPeftError, ValueError):
    """A bad input value."""


class MissingInputError(SpectralPeftError, FileNotFoundError):
    """A path that should exist does not."""


class OutputExistsError(SpectralPeftError, FileExistsError):
    """An output exists and may not be replaced."""

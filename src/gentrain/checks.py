"""Checks of single config values, each failing as one GentrainError line that names the key."""

from gentrain.errors import GentrainError


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive(key: str, value, integer: bool = True) -> None:
    """A positive integer (or, integer=False, a positive number)."""
    number = is_int(value) if integer else (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not number or value <= 0:
        raise GentrainError(f"{key} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def at_least(key: str, value, low: int) -> None:
    """An integer >= low."""
    if not is_int(value) or value < low:
        raise GentrainError(f"{key} must be an integer >= {low}, got {value!r}")


def one_of(key: str, value, choices=(True, False)) -> None:
    """One of `choices` (booleans compared by identity, so 1 is not true)."""
    if not any(value is c if isinstance(c, bool) else value == c for c in choices):
        raise GentrainError(f"{key} must be one of {'|'.join(str(c).lower() for c in choices)}, got {value!r}")

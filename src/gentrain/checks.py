"""Checks of single config values, the one mechanism every verb's table (config.SCHEMAS) and every model
family's `check` use: each rule takes (key, value) and fails as one GentrainError line that names the key,
the value and what fits."""

import math

from omegaconf import ListConfig

from gentrain.errors import GentrainError

LARGEST = 2 ** 31 - 1  # no count (steps, images, samples) gentrain takes is larger


def _kind(value) -> str:
    return "null" if value is None else "a list" if isinstance(value, (list, ListConfig)) else repr(value)


def integer(low: int = 0, high: int = LARGEST, optional: bool = False):
    """An integer in [low, high]."""
    what = (("a positive integer" if low == 1 else f"an integer >= {low}") if high == LARGEST else
            f"an integer from {low} to {high}") + (" (or null)" if optional else "")

    def rule(key, value):
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            limit = f" up to {high}" if high == LARGEST and isinstance(value, int) and value > high else ""
            raise GentrainError(f"{key} must be {what}{limit}, got {_kind(value)}")
    return rule


def number(low: float | None = None, high: float | None = None, above: bool = False, below: bool = False,
           optional: bool = False):
    """A finite number in [low, high] (above, below: strictly)."""
    if (low, above, high) == (0, True, None):
        what = "a positive number"
    else:
        bounds = [f"{'>' if above else '>='} {low:g}" if low is not None else None,
                  f"{'<' if below else '<='} {high:g}" if high is not None else None]
        what = "a number " + " and ".join(b for b in bounds if b)

    def rule(key, value):
        if value is None and optional:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (low is None or (value > low if above else value >= low))
        ok = ok and (high is None or (value < high if below else value <= high))
        if not ok:
            raise GentrainError(f"{key} must be {what}{' (or null)' if optional else ''}, got {_kind(value)}")
    return rule


def positive(optional: bool = False):
    return number(0, above=True, optional=optional)


def boolean(key, value):
    if not isinstance(value, bool):
        raise GentrainError(f"{key} must be true or false, got {_kind(value)}")


def choice(*values, optional: bool = False):
    def rule(key, value):
        if value is None and optional:
            return
        if not any(value is v if isinstance(v, bool) else (value == v and not isinstance(value, bool)) for v in values):
            raise GentrainError(f"{key} must be one of {'|'.join(str(v).lower() for v in values)}, got {_kind(value)}")
    return rule


def text(optional: bool = False):
    def rule(key, value):
        if value is None and optional:
            return
        if not isinstance(value, str) or not value:
            raise GentrainError(f"{key} must be a {'path' if 'root' in key or 'dir' in key else 'text'}"
                                f"{' (or null)' if optional else ''}, got {_kind(value)}")
    return rule


def list_of(item, min_len: int = 0, max_len: int | None = None):
    def rule(key, value):
        if not isinstance(value, (list, ListConfig)) or len(value) < min_len or (max_len and len(value) > max_len):
            size = f"{min_len}" if min_len == max_len else f"at least {min_len}"
            raise GentrainError(f"{key} must be a list of {size} values, like [a,b], got {_kind(value)}")
        for i, v in enumerate(value):
            item(f"{key}[{i}]", v)
    return rule


def anything(key, value):
    pass

"""The acceptance rule's averaging window, alone in a module so that everything reads it here."""

from __future__ import annotations

from qwen_pretrain.recipes.errors import UserError

DEFAULT_SKIP_FIRST = 10
DEFAULT_SKIP_LAST = 10


def averaging_window(n_steps: int, skip_first: int = DEFAULT_SKIP_FIRST,
                     skip_last: int = DEFAULT_SKIP_LAST) -> slice | None:
    """THE ACCEPTANCE RULE for the performance mean, in one place.

    The steps are the log's unique steps in step order (a step printed twice, e.g. after a restart
    from a checkpoint, counts once with its LAST occurrence). Drop the first `skip_first` (warm-up,
    slow first step) and the last `skip_last` (checkpoint save, teardown) and average over the
    rest. The rest must hold at least one step: with the defaults a log needs 21 unique steps.
    Returns the slice of the sorted unique steps to average, or None when the log is too short.
    """
    if skip_first < 0 or skip_last < 0:
        raise UserError("--skip-first and --skip-last must be >= 0")
    if n_steps < skip_first + skip_last + 1:
        return None
    return slice(skip_first, n_steps - skip_last)

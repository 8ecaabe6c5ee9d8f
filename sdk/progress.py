"""Progress bars for long steps: shown on a terminal (or when asked), silent in pipes and tests."""
from __future__ import annotations

from tqdm.auto import tqdm


def bar(total: int | None, desc: str, unit: str = "it", progress: bool | None = None, **kwargs) -> tqdm:
    """`progress=None` shows the bar only when stderr is a terminal."""
    disable = None if progress is None else not progress
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True, **kwargs)

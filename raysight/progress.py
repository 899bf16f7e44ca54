"""The one progress helper: a tqdm bar on an interactive terminal, silent elsewhere (tests, logs, CI)."""

from __future__ import annotations

from typing import Any, Optional


def progress_bar(total: Optional[int], desc: str, unit: str = "rows", enabled: bool = True) -> Any:
    """A tqdm bar of ``total`` ``unit``; ``enabled=False`` (or output that is not a terminal) shows nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, dynamic_ncols=True)

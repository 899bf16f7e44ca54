"""Batch rows of invokes: narrowing a module value to one invoke's rows, and writing an invoke's rows back.

Narrowing returns *views* (``tensor.narrow``), so in-place edits of an invoke's rows change the real batch. A value
is narrowed where it is a tensor whose first dimension is the batch; anything else is passed whole. A run that
expands every prompt into k rows next to each other (beam search, ``num_return_sequences``: HF's
``repeat_interleave``) names its factors k, and a first dimension of k x the batch is narrowed to the invoke's k-row
blocks. Replacing an invoke's rows builds a new tensor (``torch.cat``) instead of copying in place, so autograd stays
intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from raysight.errors import StructureError


@dataclass(frozen=True)
class Rows:
    """The rows ``[start, start + size)`` of a batch of ``total`` rows that belong to one invoke; with ``factors``,
    also rows ``[k * start, k * (start + size))`` of a batch expanded to ``k * total`` rows, for each k."""

    start: int
    size: int
    total: int
    factors: tuple[int, ...] = ()

    def span(self, tensor: torch.Tensor) -> Optional[tuple[int, int]]:
        """(first row, number of rows) of this invoke in ``tensor``, or None if its first dimension is not a batch."""
        if tensor.dim() == 0:
            return None
        n = tensor.shape[0]
        if n == self.total:
            return self.start, self.size
        if self.factors and n % self.total == 0 and n // self.total in self.factors:
            k = n // self.total
            return self.start * k, self.size * k
        return None


def narrow(value: Any, rows: Optional[Rows]) -> Any:
    """``value`` restricted to ``rows`` (views into the batch); ``rows=None`` means the whole batch."""
    if rows is None:
        return value
    if isinstance(value, torch.Tensor):
        span = rows.span(value)
        return value if span is None else value.narrow(0, *span)
    if isinstance(value, (list, tuple)):
        items = [narrow(v, rows) for v in value]
        return _rebuild_sequence(value, items)
    if isinstance(value, dict):
        return _rebuild_mapping(value, {k: narrow(v, rows) for k, v in value.items()})
    return value


def replace_rows(full: Any, rows: Optional[Rows], new: Any, where: str) -> Any:
    """``full`` with the part ``rows`` selects replaced by ``new``; ``new`` must have the narrowed structure."""
    check_structure(narrow(full, rows), new, where)
    if rows is None:
        if isinstance(new, torch.Tensor) and isinstance(full, torch.Tensor) and new.device != full.device:
            return new.to(full.device)  # a value made on the client's device replaces one on the model's GPU
        return new
    return _replace(full, rows, new)


def _replace(full: Any, rows: Rows, new: Any) -> Any:
    if isinstance(full, torch.Tensor):
        span = rows.span(full)
        if span is not None:
            start, size = span
            if new.shape[1:] != full.shape[1:] or new.shape[0] != size:
                raise StructureError(
                    f"the new value has shape {tuple(new.shape)} but the invoke's rows have shape "
                    f"{(size, *full.shape[1:])}; keep the shape, or set the value for the whole batch "
                    "outside the invokes"
                )
            new = new.to(device=full.device, dtype=full.dtype)
            pieces = [full[:start], new, full[start + size :]]
            return torch.cat([p for p in pieces if p.shape[0]], dim=0)
        return new
    if isinstance(full, (list, tuple)):
        return _rebuild_sequence(full, [_replace(f, rows, n) for f, n in zip(full, new)])
    if isinstance(full, dict):
        return _rebuild_mapping(full, {k: _replace(full[k], rows, new[k]) for k in full})
    return new


def check_structure(expected: Any, got: Any, where: str, shapes: bool = False) -> None:
    """Raise :class:`StructureError` if ``got`` cannot stand in for ``expected`` (containers, lengths, keys; with
    ``shapes``, also the shape of every tensor)."""
    problem = _structure_problem(expected, got, "", shapes)
    if problem is None:
        return
    if problem.startswith("expected shape"):
        raise StructureError(
            f"cannot set {where}: {problem}. The modules after it would get the wrong shape; assign a value of the "
            "shape it replaces (validate=True checks shapes; a run without it lets a new shape through)"
        )
    raise StructureError(
        f"cannot set {where}: {problem}. Assign a value with the same structure as the one it replaces, "
        "e.g. `(new_hidden,) + output[1:]` for a tuple output."
    )


def _structure_problem(expected: Any, got: Any, at: str = "", shapes: bool = False) -> Optional[str]:
    label = f" at {at}" if at else ""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a Tensor{label}, got {type(got).__name__}"
        if shapes and tuple(got.shape) != tuple(expected.shape):
            return f"expected shape {tuple(expected.shape)}{label}, got {tuple(got.shape)}"
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)):
            return f"expected a {type(expected).__name__} of {len(expected)} items{label}, got {type(got).__name__}"
        if len(got) != len(expected):
            return f"expected {len(expected)} items{label}, got {len(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            problem = _structure_problem(e, g, f"{at}[{i}]", shapes)
            if problem:
                return problem
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"expected a mapping with keys {list(expected)}{label}, got {type(got).__name__}"
        if set(got) != set(expected):
            return f"expected keys {sorted(expected)}{label}, got {sorted(got)}"
        for k in expected:
            problem = _structure_problem(expected[k], got[k], f"{at}[{k!r}]", shapes)
            if problem:
                return problem
    return None


def _rebuild_sequence(original: Any, items: list) -> Any:
    if type(original) is tuple or type(original) is list:
        return type(original)(items)
    if hasattr(type(original), "_fields"):
        return type(original)(*items)
    return type(original)(items)


def _rebuild_mapping(original: Any, items: dict) -> Any:
    if type(original) is dict:
        return items
    try:  # ModelOutput and other dict subclasses that take keywords
        return type(original)(**items)
    except TypeError:
        return type(original)(items)


def batch_size_of(args: tuple, kwargs: dict) -> int:
    """The first dimension of the first tensor among the inputs (1 when there is none)."""
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, _Tensor) and value.dim() > 0:
            return value.size(0)  # (an int, without building the whole torch.Size)
    return 1


_Tensor = torch.Tensor


def concatenate_inputs(prepared: list[tuple[tuple, dict, int]]) -> tuple[tuple, dict]:
    """Combine the inputs of several invokes into one batch: tensors are concatenated along dim 0, every other
    argument must be the same in every invoke (keyword arguments of every invoke are kept, not only the last)."""
    if len(prepared) == 1:
        args, kwargs, _ = prepared[0]
        return args, kwargs
    first_args, first_kwargs, _ = prepared[0]
    for i, (args, kwargs, _) in enumerate(prepared[1:], start=1):
        if len(args) != len(first_args) or set(kwargs) != set(first_kwargs):
            raise ValueError(
                f"invoke {i} was given different arguments than invoke 0 ({len(args)} positional, keys "
                f"{sorted(kwargs)} vs {len(first_args)} positional, keys {sorted(first_kwargs)}); every invoke "
                "of one trace must pass the same arguments so they can be batched"
            )
    args = tuple(_concat([p[0][i] for p in prepared], f"argument {i}") for i in range(len(first_args)))
    kwargs = {k: _concat([p[1][k] for p in prepared], f"keyword {k!r}") for k in first_kwargs}
    return args, kwargs


def _concat(values: list, what: str) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        if any(v.dim() == 0 for v in values) or len({tuple(v.shape[1:]) for v in values}) != 1:
            raise ValueError(
                f"cannot batch {what} across invokes: shapes {[tuple(v.shape) for v in values]} differ beyond "
                "the first dimension"
            )
        return torch.cat(values, dim=0)
    first = values[0]
    for v in values[1:]:
        same = v is first or (type(v) is type(first) and _equal(v, first))
        if not same:
            raise ValueError(f"cannot batch {what} across invokes: it is not a tensor and differs between invokes")
    return first


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False

"""Tensors in Arrow columns, readable by any Parquet reader.

A column holds one tensor per row as nested lists (``list<list<float>>`` for a ``[tokens, hidden]`` row), so
pandas, polars, DuckDB and ``datasets`` read it without knowing raysight, and rows may differ in shape (activations
of prompts of different lengths). The column's field metadata records the torch dtype and the row shape
(``null`` where rows differ), so :func:`to_tensors` turns it back into tensors exactly. Half-precision values are
stored as float32 (lossless; Parquet readers disagree on float16) and cast back from the recorded dtype.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

DTYPE_KEY = b"raysight.dtype"
SHAPE_KEY = b"raysight.shape"

_STORED_AS = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool,
)}  # fmt: skip


def tensor_field(name: str, rows: Sequence[torch.Tensor]) -> tuple[pa.Field, pa.Array]:
    """The field and array of a column holding ``rows`` (one tensor per row, all of the same dtype and ndim)."""
    if not rows:
        raise ValueError(f"column {name!r} has no rows")
    dtype, ndim = rows[0].dtype, rows[0].dim()
    if str(dtype).removeprefix("torch.") not in _TORCH_DTYPES:
        raise TypeError(f"column {name!r}: tensors of dtype {dtype} cannot be stored; convert them (e.g. .float())")
    for row in rows:
        if row.dtype != dtype or row.dim() != ndim:
            raise ValueError(
                f"column {name!r}: rows differ in dtype or number of dimensions ({dtype}, {ndim} dims vs "
                f"{row.dtype}, {row.dim()} dims); return one kind of tensor per name"
            )
    shapes = [tuple(row.shape) for row in rows]
    stored = _STORED_AS.get(dtype, dtype)
    flat = torch.cat([row.detach().reshape(-1).to("cpu", stored) for row in rows]) if ndim else torch.stack(
        [row.detach().to("cpu", stored) for row in rows])  # fmt: skip
    array: pa.Array = pa.array(flat.numpy())
    for level in reversed(range(ndim)):  # innermost lists first: level k has prod(shape[:k]) lists of shape[k]
        lengths = np.concatenate([np.full(int(np.prod(s[:level], dtype=np.int64)), s[level], dtype=np.int64)
                                  for s in shapes])  # fmt: skip
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if offsets[-1] >= 2**31:
            array = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), array)
        else:
            array = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), array)
    shape = [s if all(other[i] == s for other in shapes) else None for i, s in enumerate(shapes[0])]
    metadata = {DTYPE_KEY: str(dtype).removeprefix("torch.").encode(), SHAPE_KEY: json.dumps(shape).encode()}
    return pa.field(name, array.type, metadata=metadata), array


def tensor_info(field: pa.Field) -> Optional[tuple[torch.dtype, list[Optional[int]]]]:
    """The torch dtype and row shape recorded on ``field``, or None for a column that holds no tensors."""
    meta = field.metadata or {}
    if DTYPE_KEY not in meta:
        return None
    return _TORCH_DTYPES[meta[DTYPE_KEY].decode()], json.loads(meta[SHAPE_KEY])


def to_tensors(data: Any, column: str) -> list[torch.Tensor]:
    """The tensors of ``column`` in ``data`` (a ``pyarrow.Table``, or a ``ray.data.Dataset`` / Parquet path, read
    whole), one per row, with the dtype they were saved with."""
    table = _as_table(data)
    if column not in table.column_names:
        raise KeyError(f"no column {column!r}; columns: {table.column_names}")
    info = tensor_info(table.schema.field(column))
    if info is None:
        raise TypeError(f"column {column!r} holds no tensors (no raysight dtype in its metadata)")
    dtype, shape = info
    chunks = table.column(column).combine_chunks()
    n = len(chunks)
    if n == 0:
        return []
    if None not in shape and _uniform(chunks, shape):  # every row has that shape: one reshape of the flat values
        values = _flat_values(chunks, len(shape))
        whole = torch.from_numpy(values.reshape(n, *shape).copy())
        return list(whole.to(dtype).unbind(0))
    return [torch.tensor(np.asarray(row.as_py())).to(dtype).reshape(_row_shape(row.as_py(), len(shape)))
            for row in chunks]  # fmt: skip


def to_tensor(data: Any, column: str) -> torch.Tensor:
    """``column`` as one tensor ``[rows, *shape]``; rows must share a shape (else use :func:`to_tensors`)."""
    rows = to_tensors(data, column)
    if rows and any(r.shape != rows[0].shape for r in rows):
        raise ValueError(f"rows of {column!r} differ in shape (e.g. prompts of different lengths); use to_tensors()")
    return torch.stack(rows) if rows else torch.empty(0)


def _uniform(array: pa.Array, shape: list) -> bool:
    """Whether every list at every level has the recorded length (a table read from several files carries the first
    file's metadata, and each file's rows may have another shape)."""
    import pyarrow.compute as pc

    for size in shape:
        lengths = pc.list_value_length(array)
        if pc.min(lengths).as_py() != size or pc.max(lengths).as_py() != size:
            return False
        array = array.flatten()
    return True


def _flat_values(array: pa.Array, depth: int) -> np.ndarray:
    for _ in range(depth):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False)


def _row_shape(value: Any, depth: int) -> tuple[int, ...]:
    shape = []
    for _ in range(depth):
        shape.append(len(value))
        value = value[0] if value else []
    return tuple(shape)


def _as_table(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        import pyarrow.parquet as pq

        return pq.read_table(data)
    if hasattr(data, "to_arrow_refs"):  # a ray.data.Dataset
        import ray

        return pa.concat_tables(ray.get(data.to_arrow_refs()))
    raise TypeError(f"expected a pyarrow.Table, a ray.data.Dataset or a Parquet path, got {type(data).__name__}")

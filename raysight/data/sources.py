"""What an extraction reads: any supported dataset, as numbered batches of columns in one stated order.

Rows are numbered 0, 1, 2, ... in the order the source yields them (a list's order; a ``datasets.Dataset``'s index
order; Parquet/JSONL files sorted by path, rows in file order; a ``ray.data.Dataset`` read with
``preserve_order``), and a batch is ``(shard, first_row_id, {column: list of values})``. The same source read again
gives the same shards, which is what makes resuming an extraction exact.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import pyarrow as pa

TEXT = "text"  # the column a list of strings becomes


@dataclass(frozen=True)
class Source:
    """A dataset to read in batches of ``batch_size`` rows; ``total`` rows when known up front."""

    batches: Any  # () -> Iterator[dict[str, list]]
    total: Optional[int]
    description: str

    def shards(self, batch_size: int) -> Iterator[tuple[int, int, dict[str, list]]]:
        start = 0
        for shard, batch in enumerate(self.batches(batch_size)):
            rows = _rows_in(batch)
            if rows:
                yield shard, start, batch
                start += rows


def as_source(data: Any) -> Source:
    """Wrap ``data``: a list of strings or of dicts, a ``pyarrow.Table``, a ``datasets.Dataset``, a
    ``ray.data.Dataset``, or Parquet / JSONL paths (a file, a directory, a glob, or a list of them)."""
    if isinstance(data, (str, os.PathLike)) or (
        isinstance(data, (list, tuple)) and data and all(isinstance(d, os.PathLike) for d in data)
    ):
        return _files([data] if isinstance(data, (str, os.PathLike)) else list(data))
    if isinstance(data, pa.Table):
        return Source(lambda n: _table_batches(data, n), data.num_rows,
                      f"pyarrow.Table ({data.num_rows} rows, {_table_digest(data)})")  # fmt: skip
    if isinstance(data, (list, tuple)):
        return _sequence(data)
    kind = type(data)
    if kind.__module__.startswith("datasets") and hasattr(data, "iter"):  # a Hugging Face datasets.Dataset
        tag = getattr(data, "_fingerprint", "")
        return Source(lambda n: data.iter(batch_size=n), len(data), f"datasets.Dataset ({len(data)} rows, {tag})")
    if kind.__module__.startswith("ray.data") and hasattr(data, "iter_batches"):
        return Source(lambda n: _ray_batches(data, n), None, "ray.data.Dataset")
    raise TypeError(
        f"cannot read an extraction's input from {kind.__name__}: pass a list of strings or dicts, a pyarrow.Table, "
        "a datasets.Dataset, a ray.data.Dataset, or Parquet/JSONL paths"
    )


def fingerprint(source: Source) -> str:
    """A short digest of what the source describes (paths, sizes), recorded with an output to check a resume."""
    return hashlib.sha256(source.description.encode()).hexdigest()[:16]


def _table_digest(table: pa.Table) -> str:
    import pyarrow.ipc as ipc

    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:16]


def _rows_in(batch: dict[str, list]) -> int:
    lengths = {len(v) for v in batch.values()}
    if len(lengths) > 1:
        raise ValueError(f"the input's columns differ in length within a batch: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _sequence(data: Sequence) -> Source:
    if all(isinstance(d, str) for d in data):
        columns = {TEXT: list(data)}
    elif all(isinstance(d, dict) for d in data):
        keys = list(data[0]) if data else []
        if any(list(d) != keys for d in data):
            raise ValueError("the input's dicts have different keys; give every row the same columns")
        columns = {k: [d[k] for d in data] for k in keys}
    else:
        raise TypeError("a list input must hold only strings (a 'text' column) or only dicts (one per row)")
    n = len(data)
    digest = hashlib.sha256()
    for key in sorted(columns):
        digest.update(key.encode())
        for value in columns[key]:
            digest.update(repr(value).encode())
    return Source(lambda size: _column_batches(columns, n, size), n, f"list ({n} rows, {digest.hexdigest()[:16]})")


def _column_batches(columns: dict[str, list], n: int, size: int) -> Iterator[dict[str, list]]:
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in columns.items()}


def _table_batches(table: pa.Table, size: int) -> Iterator[dict[str, list]]:
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size).to_pydict()


def _files(specs: list) -> Source:
    paths: list[str] = []
    for spec in specs:
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            found = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files if _readable(f)]
        elif any(c in spec for c in "*?["):
            found = [p for p in glob.glob(spec, recursive=True) if _readable(p)]
        elif os.path.exists(spec):
            found = [spec]
        else:
            raise FileNotFoundError(f"extraction input {spec!r} does not exist")
        if not found:
            raise FileNotFoundError(f"no .parquet, .jsonl or .json files in {spec!r}")
        paths.extend(sorted(found))
    for path in paths:
        if not _readable(path):
            raise ValueError(f"cannot read {path!r}: extraction reads .parquet, .jsonl and .json (JSON lines) files")
    sizes = ",".join(f"{p}:{os.path.getsize(p)}" for p in paths)
    return Source(lambda n: _file_batches(paths, n), None, f"files [{sizes}]")


def _readable(path: str) -> bool:
    return path.endswith((".parquet", ".jsonl", ".json")) and not os.path.basename(path).startswith(("_", "."))


def _file_batches(paths: list[str], size: int) -> Iterator[dict[str, list]]:
    """Batches of ``size`` rows across files (a batch may span two files, so shards do not depend on file sizes)."""
    pending: list[pa.Table] = []
    count = 0
    for path in paths:
        for piece in _file_pieces(path, size):
            pending.append(piece)
            count += piece.num_rows
            while count >= size:
                table = pa.concat_tables(pending, promote_options="default").combine_chunks()
                yield table.slice(0, size).to_pydict()
                rest = table.slice(size)
                pending, count = ([rest] if rest.num_rows else []), rest.num_rows
    if count:
        yield pa.concat_tables(pending, promote_options="default").to_pydict()


def _file_pieces(path: str, size: int) -> Iterator[pa.Table]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
            yield pa.Table.from_batches([batch])
    else:
        import pyarrow.json as pj

        yield pj.read_json(path)


def _ray_batches(dataset: Any, size: int) -> Iterator[dict[str, list]]:
    dataset.context.execution_options.preserve_order = True  # the order is what resuming relies on
    for batch in dataset.iter_batches(batch_size=size, batch_format="pyarrow"):
        yield batch.to_pydict()

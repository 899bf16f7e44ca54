"""What an extraction reads: any supported dataset, as numbered batches of columns in one stated order.

Rows are numbered 0, 1, 2, ... in the order the source yields them (a list's order; a ``datasets.Dataset``'s index
order; a ``datasets.IterableDataset``'s stream order; Parquet/JSONL files sorted by path, rows in file order; a
``ray.data.Dataset`` read with ``preserve_order``), and a batch is ``(shard, first_row_id, {column: list of values})``.
The same source read again gives the same shards, which is what makes resuming an extraction exact.

:func:`fingerprint` is what a resume compares. A list, a ``pyarrow.Table`` and a ``datasets.Dataset`` are pinned by
their whole content (a ``datasets.Dataset`` by its own ``_fingerprint``). The others cannot be hashed without reading
them all, so their fingerprint is what is known up front (file paths and sizes; a ``ray.data.Dataset``'s row count
when Ray knows it without running the dataset; an ``IterableDataset``'s name, config, split and features) plus the
content of the first batch, which the extraction reads before it opens the output anyway. A change after the first
batch that keeps all that equal is not seen by the fingerprint; a change of length is caught when the extraction
finishes (``Sink.finish`` compares the rows read with the rows in the directory).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import pyarrow as pa

TEXT = "text"  # the column a list of strings becomes


@dataclass(frozen=True)
class Source:
    """A dataset to read in batches of ``batch_size`` rows; ``total`` rows when known up front."""

    batches: Any  # (batch_size) -> Iterator[dict[str, list]]
    total: Optional[int]
    description: str
    sampled: bool = False  # the description does not pin the rows: the fingerprint adds the first batch's content

    def shards(self, batch_size: int) -> Iterator[tuple[int, int, dict[str, list]]]:
        start = 0
        for shard, batch in enumerate(self.batches(batch_size)):
            rows = _rows_in(batch)
            if rows:
                yield shard, start, batch
                start += rows


ACCEPTED = ("a list of strings or dicts, a pyarrow.Table, a datasets.Dataset or datasets.IterableDataset, "
            "a ray.data.Dataset, or Parquet/JSONL paths (a file, a directory, a glob, or a list of pathlib paths)")


def as_source(data: Any) -> Source:
    """Wrap ``data``: a list of strings or of dicts, a ``pyarrow.Table``, a ``datasets.Dataset`` or
    ``datasets.IterableDataset``, a ``ray.data.Dataset``, or Parquet / JSONL paths (a file, a directory, a glob, or
    a list of them)."""
    if isinstance(data, (str, os.PathLike)) or (
        isinstance(data, (list, tuple)) and data and all(isinstance(d, os.PathLike) for d in data)
    ):
        return _files([data] if isinstance(data, (str, os.PathLike)) else list(data))
    if isinstance(data, pa.Table):
        return Source(lambda n: _table_batches(data, n), data.num_rows,
                      f"pyarrow.Table ({data.num_rows} rows, {_table_digest(data)})")  # fmt: skip
    if isinstance(data, (list, tuple)):
        return _sequence(data)
    hf = sys.modules.get("datasets")  # a datasets object means the library is imported already
    if hf is not None:
        if isinstance(data, hf.IterableDataset):
            return _iterable_dataset(data)
        if isinstance(data, hf.Dataset):
            tag = getattr(data, "_fingerprint", "")
            return Source(lambda n: data.iter(batch_size=n), len(data), f"datasets.Dataset ({len(data)} rows, {tag})")
        if isinstance(data, (hf.DatasetDict, hf.IterableDatasetDict)):
            raise TypeError(f"extract() reads one split, not a {type(data).__name__}: pass data[split] "
                            f"(its splits: {sorted(data)})")  # fmt: skip
    ray_data = sys.modules.get("ray.data")
    if ray_data is not None and isinstance(data, ray_data.Dataset):
        return _ray_dataset(data)
    raise TypeError(f"cannot read an extraction's input from {type(data).__name__}: pass {ACCEPTED}")


def fingerprint(source: Source, first: Optional[dict[str, list]] = None) -> str:
    """A short digest of the source, recorded with an output to check a resume: its description (content digest,
    paths and sizes, known metadata) and, for a source whose description does not pin its rows (``sampled``), the
    first batch ``first`` as read."""
    digest = hashlib.sha256(source.description.encode())
    if source.sampled:
        if first is None:
            raise ValueError(f"the fingerprint of {source.description} needs its first batch")
        digest.update(b"\0first batch\0")
        _digest_columns(digest, first)
    return digest.hexdigest()[:16]


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
    _digest_columns(digest, columns)
    return Source(lambda size: _column_batches(columns, n, size), n, f"list ({n} rows, {digest.hexdigest()[:16]})")


def _digest_columns(digest: Any, columns: dict[str, Any]) -> None:
    for key in sorted(columns):
        _digest_value(digest, key)
        _digest_value(digest, columns[key])


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _digest_value(digest: Any, value: Any) -> None:
    """Feed ``value`` to ``digest`` unambiguously (type-tagged, length-prefixed) and in full: tensors and arrays by
    dtype, shape and bytes (``repr`` elides large ones), nested lists and dicts element by element."""

    def put(tag: str, data: bytes) -> None:
        digest.update(f"{tag}{len(data)}:".encode())
        digest.update(data)

    if value is None or isinstance(value, (bool, int, float)):
        put(type(value).__name__, repr(value).encode())
    elif isinstance(value, str):
        put("str", value.encode())
    elif isinstance(value, (bytes, bytearray, memoryview)):
        put("bytes", bytes(value))
    elif isinstance(value, dict):
        put("dict", str(len(value)).encode())
        for key in sorted(value, key=repr):
            _digest_value(digest, key)
            _digest_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        put(type(value).__name__, str(len(value)).encode())
        for item in value:
            _digest_value(digest, item)
    elif type(value).__module__.startswith("torch") and hasattr(value, "detach"):  # a torch.Tensor
        import torch

        tensor = value.detach().cpu().contiguous()
        put("tensor", f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        put("data", tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif type(value).__module__ == "numpy" and hasattr(value, "dtype"):  # a numpy array or scalar
        if value.dtype.hasobject:
            put("ndarray-object", str(getattr(value, "shape", ())).encode())
            _digest_value(digest, value.tolist())
        else:
            put("ndarray", f"{value.dtype.str}{getattr(value, 'shape', ())}".encode())
            put("data", value.tobytes())
    elif callable(getattr(value, "tobytes", None)):  # a PIL image and the like
        put(type(value).__qualname__, repr((getattr(value, "mode", None), getattr(value, "size", None))).encode())
        put("data", value.tobytes())
    else:
        put(type(value).__qualname__, _ADDRESS.sub("", repr(value)).encode())  # an address differs run to run


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
    return Source(lambda n: _file_batches(paths, n), None, f"files [{sizes}]", sampled=True)


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


def _iterable_dataset(data: Any) -> Source:
    """A Hugging Face ``IterableDataset`` (a streamed hub dataset, ``to_iterable_dataset()``), read in stream order.
    It has no content fingerprint; what identifies it is its name, config, version, split and features, and the
    fingerprint adds the first batch (``sampled``)."""
    info = getattr(data, "info", None)
    features = getattr(data, "features", None)
    known = {
        "dataset": getattr(info, "dataset_name", None),
        "config": getattr(info, "config_name", None),
        "version": str(info.version) if getattr(info, "version", None) else None,
        "split": str(data.split) if getattr(data, "split", None) else None,
        "features": features.to_dict() if features is not None and hasattr(features, "to_dict") else None,
    }
    tag = hashlib.sha256(json.dumps(known, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = "/".join(str(known[k]) for k in ("dataset", "config") if known[k]) or "local"
    split = f", split {known['split']}" if known["split"] else ""
    return Source(lambda n: _iterable_batches(data, n), None, f"datasets.IterableDataset ({name}{split}, {tag})",
                  sampled=True)  # fmt: skip


def _iterable_batches(data: Any, size: int) -> Iterator[dict[str, list]]:
    if hasattr(data, "iter"):
        yield from data.iter(batch_size=size)
        return
    rows = iter(data)  # an older datasets without IterableDataset.iter: batch the rows here
    while chunk := list(itertools.islice(rows, size)):
        yield {key: [row[key] for row in chunk] for key in chunk[0]}


def _ray_dataset(data: Any) -> Source:
    """A ``ray.data.Dataset``, read with ``preserve_order``. Its fingerprint is its row count when Ray knows it
    without running the dataset (``from_items``, ``range``, a materialized dataset; not a ``map_batches`` or a
    Parquet read) plus the first batch (``sampled``)."""
    count = _ray_known_count(data)
    shown = f"{count} rows" if count is not None else "rows not known up front"
    return Source(lambda n: _ray_batches(data, n), count, f"ray.data.Dataset ({shown})", sampled=True)


def _ray_known_count(data: Any) -> Optional[int]:
    """The row count the dataset's plan states without running anything. Not ``Dataset.count()`` (which runs a
    dataset whose count is not known) nor its cache (a dataset counted once would then fingerprint differently)."""
    try:
        count = data._logical_plan.dag.infer_metadata().num_rows
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return None  # a Ray without these internals: no count; the first batch still fingerprints
    return int(count) if isinstance(count, int) else None


def _ray_batches(dataset: Any, size: int) -> Iterator[dict[str, list]]:
    dataset.context.execution_options.preserve_order = True  # the order is what resuming relies on
    for batch in dataset.iter_batches(batch_size=size, batch_format="pyarrow"):
        yield batch.to_pydict()

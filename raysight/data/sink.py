"""Where an extraction's shards go: Parquet parts in a directory that a rerun resumes, or tables in memory.

The directory may be a local path or any URI pyarrow's filesystems open (``s3://``, ``gs://``, ``hdfs://``,
``file://``). A part is written to a hidden temporary name and then moved to ``part-<shard>.parquet``, so a part is
whole or absent (an atomic rename on local disks; on object stores the part appears only once it is complete).
``.raysight-extract.json`` records the job (the input's fingerprint, graph, batch size, outputs) and, when done, the
row count; it is hidden, so Parquet readers of the directory (pyarrow, pandas, ``datasets``) skip it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysight.data.sources import Source, fingerprint

logger = logging.getLogger(__name__)

MANIFEST = ".raysight-extract.json"


@dataclass
class Manifest:
    batch_size: int
    source: str
    plan: str
    outputs: list
    complete: bool = False
    rows: Optional[int] = None
    format: int = 1

    def differs_from(self, other: "Manifest") -> list[str]:
        fields = ("format", "batch_size", "source", "plan", "outputs")
        return [f for f in fields if getattr(self, f) != getattr(other, f)]


class Sink:
    """``Sink()`` keeps tables for an in-memory dataset; :meth:`directory_for` writes parts to a directory."""

    def __init__(self) -> None:
        self.tables: dict[int, pa.Table] = {}
        self.done: set[int] = set()
        self.fs: Optional[pafs.FileSystem] = None
        self.root = ""
        self.manifest: Optional[Manifest] = None

    @classmethod
    def directory_for(cls, output: Any, plan: Any, source: Source, first: dict, batch_size: int, resume: bool,
                      overwrite: bool) -> "Sink":  # fmt: skip
        """The sink writing to ``output``; ``first`` is the input's first batch (part of the fingerprint of an
        input that has no content digest up front, see ``sources.fingerprint``)."""
        sink = cls()
        sink.fs, sink.root = _filesystem(output)
        sink.shown = os.fspath(output)
        sink.manifest = Manifest(batch_size, fingerprint(source, first), plan.digest, list(plan.outputs))
        sink._open(resume, overwrite)
        return sink

    # -- opening: a new directory, a resume, or a refusal ------------------------------------------------------
    def _open(self, resume: bool, overwrite: bool) -> None:
        fs, shown = self.fs, self.shown
        kind = fs.get_file_info(self.root).type
        if kind == pafs.FileType.File:
            raise NotADirectoryError(f"extract(output={shown!r}) must be a directory; a file of that name exists")
        fs.create_dir(self.root, recursive=True)
        names = self._names()
        ours = [n for n in names if _is_part(n) or n.startswith((MANIFEST, ".part-"))]
        others = [n for n in names if n not in ours]
        if MANIFEST not in names:
            if others:
                raise FileExistsError(f"extract(output={shown!r}): the directory holds files that are not an "
                                      f"extraction's ({sorted(others)[:3]}...); give an empty or new directory")  # fmt: skip
        else:
            previous = Manifest(**json.loads(self._read(MANIFEST)))
            differs = previous.differs_from(self.manifest)
            if overwrite:
                for name in ours:
                    fs.delete_file(self._path(name))
                logger.info("extract: overwriting the extraction in %s", shown)
            elif differs or not resume:
                why = f"its {', '.join(differs)} differ(s) from this run's" if differs else "resume=False"
                raise FileExistsError(f"extract(output={shown!r}) holds another extraction ({why}); pass "
                                      "overwrite=True to replace it, or give a new directory")  # fmt: skip
            else:
                self.done = {_shard_of(n) for n in names if _is_part(n)}
                if self.done:
                    logger.info("extract: resuming in %s; %d shard(s) already written", shown, len(self.done))
        for name in self._names():
            if name.startswith(".part-"):  # a write that a crash cut short
                fs.delete_file(self._path(name))
        self._write_manifest()

    # -- shards -------------------------------------------------------------------------------------------------
    def has(self, shard: int) -> bool:
        return shard in self.done

    def put(self, shard: int, table: pa.Table) -> None:
        if self.fs is None:
            self.tables[shard] = table
            return
        temporary = self._path(f".part-{shard:06d}-{uuid.uuid4().hex[:8]}.tmp")
        pq.write_table(table, temporary, filesystem=self.fs)
        self.fs.move(temporary, self._path(_part_name(shard)))  # a part is whole or absent
        self.done.add(shard)

    def finish(self, rows_read: Optional[int] = None) -> None:
        """Mark the directory complete. ``rows_read`` (the rows the input gave) must equal the rows its parts hold:
        parts a resume skipped that came from a longer or shorter input (one the fingerprint could not tell from
        this one) are refused rather than left in the output."""
        if self.fs is None:
            return
        rows = sum(pq.ParquetFile(self.fs.open_input_file(self._path(p))).metadata.num_rows for p in self._parts())
        if rows_read is not None and rows != rows_read:
            raise FileExistsError(
                f"extract(output={self.shown!r}) holds {rows} rows but this run's input has {rows_read}: parts "
                "already there were written from an input of another length; pass overwrite=True to redo the "
                "extraction, or give a new directory"
            )
        self.manifest.complete, self.manifest.rows = True, rows
        self._write_manifest()
        logger.info("extract: %d rows in %d part(s) in %s", rows, len(self.done), self.shown)

    def dataset(self) -> Any:
        """The rows as a ``ray.data.Dataset``, ordered by id."""
        import ray
        import ray.data

        from raysight.backends.ray import init

        init()
        if self.fs is None:
            ds = ray.data.from_arrow_refs([ray.put(self.tables[s]) for s in sorted(self.tables)])
        else:
            ds = ray.data.read_parquet([self._path(p) for p in self._parts()], filesystem=self.fs)
        ds.context.execution_options.preserve_order = True
        return ds

    # -- the directory --------------------------------------------------------------------------------------------
    def _names(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return [info.base_name for info in infos]

    def _parts(self) -> list[str]:
        return sorted(n for n in self._names() if _is_part(n))

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._path(name)) as f:
            return f.read()

    def _write_manifest(self) -> None:
        temporary = self._path(MANIFEST + ".tmp")
        with self.fs.open_output_stream(temporary) as f:
            f.write(json.dumps(asdict(self.manifest), indent=1).encode())
        self.fs.move(temporary, self._path(MANIFEST))


def _filesystem(output: Any) -> tuple[pafs.FileSystem, str]:
    text = os.fspath(output)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(text)


def _part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def _shard_of(name: str) -> int:
    return int(name[len("part-"):-len(".parquet")])

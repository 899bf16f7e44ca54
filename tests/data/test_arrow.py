"""Tensor columns in Arrow and Parquet: exact round trips, rows of different shapes, and files that pandas, polars,
DuckDB and ``datasets`` read without raysight (no Ray here)."""

from __future__ import annotations

import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysight.data import tensor_field, tensor_info, to_tensor, to_tensors


def _table(**columns: list[torch.Tensor]) -> pa.Table:
    fields, arrays = zip(*(tensor_field(name, rows) for name, rows in columns.items()))
    return pa.Table.from_arrays(list(arrays), schema=pa.schema(list(fields)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.uint8, torch.bool])  # fmt: skip
def test_a_column_round_trips_through_parquet_with_its_dtype(dtype: torch.dtype, tmp_path: pathlib.Path) -> None:
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randn(3, 4, generator=g) * 10).to(dtype) for _ in range(5)]
    pq.write_table(_table(h=rows), tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet")
    assert tensor_info(table.schema.field("h")) == (dtype, [3, 4])
    back = to_tensors(table, "h")
    assert all(b.dtype == dtype and torch.equal(b, r) for b, r in zip(back, rows))
    assert torch.equal(to_tensor(table, "h"), torch.stack(rows))


def test_rows_of_different_shapes_keep_their_own_shape(tmp_path: pathlib.Path) -> None:
    rows = [torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) for n in (1, 4, 2)]
    pq.write_table(_table(h=rows), tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet")
    assert tensor_info(table.schema.field("h"))[1] == [None, 2]
    assert [tuple(t.shape) for t in to_tensors(table, "h")] == [(1, 2), (4, 2), (2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(to_tensors(table, "h"), rows))
    with pytest.raises(ValueError, match="differ in shape.*to_tensors"):
        to_tensor(table, "h")


def test_one_value_per_row_is_a_plain_column() -> None:
    table = _table(score=list(torch.tensor([0.5, 1.5, -2.0]).unbind(0)))
    assert table.schema.field("score").type == pa.float32()
    assert torch.equal(to_tensor(table, "score"), torch.tensor([0.5, 1.5, -2.0]))


def test_the_files_read_as_nested_lists_in_pandas_polars_duckdb_and_datasets(tmp_path: pathlib.Path) -> None:
    rows = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0]])]
    path = tmp_path / "t.parquet"
    pq.write_table(_table(h=rows), path)
    expected = [r.tolist() for r in rows]

    import duckdb
    import pandas as pd
    import polars as pl

    assert [[list(inner) for inner in row] for row in pd.read_parquet(path)["h"]] == expected
    assert pl.read_parquet(path)["h"].to_list() == expected
    assert [row[0] for row in duckdb.sql(f"SELECT h FROM read_parquet('{path}')").fetchall()] == expected
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert loaded["h"] == expected


def test_bad_columns_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="'h'.*differ in dtype or number of dimensions"):
        tensor_field("h", [torch.zeros(2), torch.zeros(2, 2)])
    with pytest.raises(TypeError, match="complex64.*cannot be stored"):
        tensor_field("h", [torch.zeros(2, dtype=torch.complex64)])
    table = pa.table({"n": [1, 2]})
    with pytest.raises(TypeError, match="'n' holds no tensors"):
        to_tensors(table, "n")
    with pytest.raises(KeyError, match="no column 'x'"):
        to_tensors(table, "x")


def test_parts_with_different_recorded_shapes_read_back_row_by_row(tmp_path: pathlib.Path) -> None:
    rows = [torch.randn(n, 3, generator=torch.Generator().manual_seed(n)) for n in (5, 3, 7)]
    paths = []
    for i, row in enumerate(rows):  # one part per row: each records its own row's shape as fixed
        paths.append(tmp_path / f"part-{i}.parquet")
        pq.write_table(_table(h=[row]), paths[-1])
    table = pq.read_table(paths)  # the schema (metadata included) of the first part
    assert tensor_info(table.schema.field("h"))[1] == [5, 3]
    assert all(torch.equal(a, b) for a, b in zip(to_tensors(table, "h"), rows))

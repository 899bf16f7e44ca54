"""One shard of an extraction: a batch through the plan's graph, out as an Arrow table (one row per example).

This runs where the model is (this process, or a model actor): the batch's columns fill the trace's input, the
model prepares it (a ``LanguageModel`` tokenizes), the recorded graph runs interleaved with the forward pass, and
each returned value is split into rows. For a ``LanguageModel``, a ``tokens`` column holds each example's token ids
without padding, and values of shape ``[batch, tokens, features...]`` (three or more dimensions, the second the
padded length) keep only the example's real tokens, unless the plan says ``strip_padding=False``. A 2-D value is
never cut: its second dimension may equal the token count by chance (``[batch, hidden]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import torch

from raysight.backends.base import InvokeInputs
from raysight.data.arrow import tensor_field
from raysight.data.plan import fill
from raysight.runtime.execute import run_trace

SCHEMA_KEY = b"raysight"
FORMAT = 1


@dataclass
class ShardJob:
    """What a shard needs besides the model and the graph (they travel once per job, this too)."""

    inputs: tuple
    outputs: dict[str, int]
    preprocess: Any
    strip_padding: bool
    keep_columns: tuple


def run_shard(model: Any, graph: Any, forward_kwargs: dict, method: str, job: ShardJob, first_id: int,
              batch: dict, log_to: Any = None) -> pa.Table:  # fmt: skip
    """Run ``graph`` on ``batch`` (rows ``first_id, first_id + 1, ...``) and return the rows as a table."""
    given = job.preprocess(dict(batch)) if job.preprocess is not None else batch
    args, kwargs = fill(job.inputs, given)
    prepared = InvokeInputs(*model._prepare_input(*args, **kwargs))
    n = prepared.batch_size
    rows_in = len(next(iter(batch.values()))) if batch else 0
    if n != rows_in:
        raise ValueError(f"the batch has {rows_in} rows but the trace's input is {n} examples; pass the whole column")
    saved = run_trace(model, graph.body, graph.nodes, [prepared], forward_kwargs, method, locations=graph.locations(),
                      log_to=log_to).results()  # fmt: skip
    mask = _token_mask(model, prepared)
    fields: list[pa.Field] = [pa.field("id", pa.int64())]
    arrays: list[pa.Array] = [pa.array(range(first_id, first_id + n), pa.int64())]
    if mask is not None:
        ids = prepared.kwargs["input_ids"].to(mask.device)
        field, array = tensor_field("tokens", [ids[i][mask[i]] for i in range(n)])
        fields.append(field)
        arrays.append(array)
    for column in job.keep_columns:
        arrays.append(pa.array(batch[column]))
        fields.append(pa.field(column, arrays[-1].type))
    for name, index in job.outputs.items():
        if index not in saved:
            raise RuntimeError(f"output {name!r} was never computed: the trace stopped before it, or it is in a "
                               "branch (cond) that did not run")  # fmt: skip
        field, array = tensor_field(name, _rows(name, saved[index], n, mask if job.strip_padding else None))
        fields.append(field)
        arrays.append(array)
    meta = {"format": FORMAT, "outputs": list(job.outputs), "order": "id ascending (the input's order)"}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={SCHEMA_KEY: json.dumps(meta).encode()}))


def _rows(name: str, value: Any, n: int, mask: Optional[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(value, (int, float, bool)) and n == 1:
        value = torch.tensor([value])
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"output {name!r} is a {type(value).__name__}; return a tensor per name (e.g. a module's "
                        "output[0] when its output is a tuple)")  # fmt: skip
    if value.dim() == 0 or value.shape[0] != n:
        raise ValueError(
            f"output {name!r} has shape {tuple(value.shape)}, whose first dimension is not the batch ({n} examples); "
            "return per-example values (keep the batch dimension)"
        )
    if mask is not None and value.dim() >= 3 and value.shape[1] == mask.shape[1]:  # [batch, tokens, features...]
        mask = mask.to(value.device)
        return [value[i][mask[i]] for i in range(n)]
    return list(value.unbind(0))


def _token_mask(model: Any, prepared: InvokeInputs) -> Optional[torch.Tensor]:
    """Each example's real (non-padding) token positions, for models that take token ids."""
    kwargs = prepared.kwargs
    if getattr(model, "tokenizer", None) is None or "input_ids" not in kwargs:
        return None
    ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)

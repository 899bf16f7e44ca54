"""LoRA adapters for raysight models: ``y = module(x) + (x @ A @ B) * alpha / rank`` on chosen modules.

``LoRA(model, "model.layers.*.self_attn.q_proj", rank=4)`` creates one adapter per matching ``nn.Linear``-like
module (its ``in_features``/``out_features``; or pass ``dims=(in, out)``). Inside a trace, ``lora.attach()`` records
the adapted outputs (so it works in any trace, session or generate); ``lora.weights()`` gives the adapter tensors and
``lora.to_arrow()`` a ``pyarrow.Table`` of them. ``train_lora`` runs a training loop as a raysight session (the loop
runs where the model runs) and returns per-step metrics and final weights as Arrow tables.

Parameters are created with ``torch.nn.parameter.Parameter`` directly, so they are real tensors even when the
adapter is built inside a session.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch.nn.parameter import Parameter

import raysight


class LoRA:
    """Rank-``rank`` adapters on the modules of ``model`` whose path matches ``pattern`` (``fnmatch`` style)."""

    def __init__(
        self,
        model: Any,
        pattern: str,
        rank: int = 4,
        alpha: Optional[float] = None,
        dims: Optional[tuple[int, int]] = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        matches = [(path, envoy) for path, envoy in model.named_modules() if path and fnmatch.fnmatchcase(path, pattern)]
        if not matches:
            raise ValueError(f"no module of the model matches {pattern!r}; print the model to see its module paths")
        self.model = model
        self.pattern = pattern
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.adapters: dict[str, tuple[Parameter, Parameter]] = {}
        generator = torch.Generator().manual_seed(seed)
        for path, envoy in matches:
            d_in, d_out = dims or _linear_dims(envoy._module, path)
            a = torch.empty(d_in, rank, dtype=dtype)
            bound = 1 / math.sqrt(d_in)  # as peft: A random (kaiming-uniform scale), B zero => starts as identity
            a.uniform_(-bound, bound, generator=generator)
            self.adapters[path] = (Parameter(a), Parameter(torch.zeros(rank, d_out, dtype=dtype)))
        self._envoys = dict(matches)

    def parameters(self) -> list[Parameter]:
        return [p for pair in self.adapters.values() for p in pair]

    def attach(self, scale: float = 1.0) -> None:
        """Inside a trace: add each adapter's update to its module's output (recorded, not run now)."""
        for path, (a, b) in self.adapters.items():
            envoy = self._envoys[path]
            x = envoy.input
            envoy.output = envoy.output + (x @ a @ b) * (self.scale * scale)

    def weights(self) -> dict[str, torch.Tensor]:
        """``{"<path>.A": tensor, "<path>.B": tensor}`` (detached copies)."""
        out = {}
        for path, (a, b) in self.adapters.items():
            out[f"{path}.A"] = a.detach().clone()
            out[f"{path}.B"] = b.detach().clone()
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for path, (a, b) in self.adapters.items():
            with torch.no_grad():
                a.copy_(weights[f"{path}.A"])
                b.copy_(weights[f"{path}.B"])

    def to_arrow(self) -> Any:
        """One row per adapter matrix: name, shape, dtype and the values (flattened, float32)."""
        return _weights_table([(None, name, t) for name, t in self.weights().items()], with_step=False)

    def __repr__(self) -> str:
        return f"LoRA(rank={self.rank}, modules={list(self.adapters)})"


@dataclass
class TrainResult:
    """What ``train_lora`` returns: ``metrics`` (one row per step: step, loss), ``weights`` (``LoRA.to_arrow``) and
    ``checkpoints`` (the weights after every ``checkpoint_every``-th step, with their step)."""

    metrics: Any
    weights: Any
    checkpoints: Any = None  # (step, name, shape, dtype, values) every checkpoint_every steps; empty without them

    def write_parquet(self, directory: Any) -> list[str]:
        """Write ``metrics.parquet``, ``weights.parquet`` (and ``checkpoints.parquet``) into ``directory`` (made if
        missing); return the paths."""
        import os

        import pyarrow.parquet as pq

        os.makedirs(directory, exist_ok=True)
        tables = {"metrics": self.metrics, "weights": self.weights}
        if self.checkpoints is not None and self.checkpoints.num_rows:
            tables["checkpoints"] = self.checkpoints
        paths = []
        for name, table in tables.items():
            paths.append(os.path.join(directory, f"{name}.parquet"))
            pq.write_table(table, paths[-1])
        return paths


def train_lora(
    model: Any,
    lora: LoRA,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Any],
    lr: float = 1e-3,
    optimizer: str = "AdamW",
    forward: Optional[Callable[[Any, Any], Any]] = None,
    remote: Any = None,
    checkpoint_every: int = 0,
) -> TrainResult:
    """Train ``lora`` on ``batches`` as one raysight session.

    Each batch is a model input (or, with ``forward``, anything ``forward(model, batch)`` turns into the proxy the
    loss is computed from); ``loss_fn(output_proxy, batch)`` builds the loss inside the trace (default output: the
    model's logits). ``remote=True`` trains where the model's Ray pool is (the whole loop on one actor); the trained
    weights come back into ``lora`` either way. ``checkpoint_every=k`` also keeps the adapter weights after every
    k-th step. Returns per-step losses, the final weights and the checkpoints as Arrow tables.
    """
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be a non-negative int (0: none), got {checkpoint_every!r}")
    import pyarrow as pa

    batches = list(batches)
    if not batches:
        raise ValueError("train_lora needs at least one batch")
    if not isinstance(getattr(torch.optim, optimizer, None), type):
        raise ValueError(f"optimizer={optimizer!r} is not a torch.optim optimizer (e.g. 'AdamW', 'SGD')")
    with model.session(**({} if remote is None else {"remote": remote})) as session:
        opt = getattr(torch.optim, optimizer)(lora.parameters(), lr=lr)  # looked up now: a node of the session
        losses = raysight.list().save()
        checkpoints = raysight.list().save()
        with session.iter(list(range(len(batches)))) as step:
            batch = raysight.apply(operator.getitem, batches, step)
            inputs = batch["input"] if _is_mapping(batches[0]) else batch
            with model.trace(inputs):
                lora.attach()
                output = forward(model, batch) if forward is not None else _logits(model)
                loss = loss_fn(output, batch)
                losses.append(loss.detach().item())
                loss.backward()
            opt.step()
            opt.zero_grad()
            if checkpoint_every:
                with session.cond((step + 1) % checkpoint_every == 0):
                    checkpoints.append(raysight.apply(_copies, lora.parameters()))
        trained = raysight.apply(_copies, lora.parameters()).save()  # where it ran: the weights come back
    names = list(lora.weights())
    lora.load_weights(dict(zip(names, trained.value)))
    steps = list(range(len(losses.value)))
    metrics = pa.table({"step": pa.array(steps, pa.int64()), "loss": pa.array(losses.value, pa.float64())})
    saved_at = [s for s in steps if checkpoint_every and (s + 1) % checkpoint_every == 0]
    rows = [(s, name, t) for s, copies in zip(saved_at, checkpoints.value) for name, t in zip(names, copies)]
    return TrainResult(metrics=metrics, weights=lora.to_arrow(), checkpoints=_weights_table(rows))


def _weights_table(rows: list[tuple[Optional[int], str, torch.Tensor]], with_step: bool = True) -> Any:
    """Adapter matrices as rows: (step,) name, shape, dtype and the values (flattened, float32)."""
    import pyarrow as pa

    columns = {
        "name": pa.array([name for _, name, _ in rows], pa.string()),
        "shape": pa.array([list(t.shape) for _, _, t in rows], pa.list_(pa.int64())),
        "dtype": pa.array([str(t.dtype).removeprefix("torch.") for _, _, t in rows], pa.string()),
        "values": pa.array([t.float().flatten().tolist() for _, _, t in rows], pa.list_(pa.float64())),
    }
    if with_step:
        columns = {"step": pa.array([s for s, _, _ in rows], pa.int64()), **columns}
    return pa.table(columns)


def _copies(parameters: list[Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def _logits(model: Any) -> Any:
    output = model.output
    return output.logits if hasattr(model._module, "config") else output


def _is_mapping(value: Any) -> bool:
    return isinstance(value, dict) and "input" in value


def _linear_dims(module: torch.nn.Module, path: str) -> tuple[int, int]:
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if d_in is None or d_out is None:
        raise ValueError(
            f"{path} ({type(module).__name__}) has no in_features/out_features; give dims=(in, out) for LoRA on it"
        )
    return int(d_in), int(d_out)

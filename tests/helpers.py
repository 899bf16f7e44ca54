"""Tiny torch models built with a fixed seed, and helpers that compute oracles with plain PyTorch (imported by
tests as ``from helpers import ...``; the fixtures that use them are in conftest.py).

Every oracle here runs the *torch* module directly (or with a hand-written forward hook), never raysight.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn


# -- tiny models ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(5, 10)
        self.layer2 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(x))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x)) + x


class Stack(nn.Module):
    """embed -> ModuleList of 3 residual blocks -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.layers = nn.ModuleList([Block(6) for _ in range(3)])
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class Pair(nn.Module):
    """A module that returns a tuple (hidden, gate), both with the batch as first dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        return h, torch.tanh(h)


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = self.pair(x)
        return self.head(h * g)


class Scaler(nn.Module):
    def forward(self, h: torch.Tensor, scale: float = 1.0, mask: Any = None) -> torch.Tensor:
        out = h * scale
        if mask is not None:
            out = out * mask
        return out


class KwNet(nn.Module):
    """forward takes keyword arguments and passes them on to a submodule as keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scaler = Scaler()

    def forward(self, x: torch.Tensor, scale: float = 1.0, mask: Any = None) -> torch.Tensor:
        return self.scaler(self.lin(x), scale=scale, mask=mask)


class AutoEncoder(nn.Module):
    """forward(x) = decode(encode(x)); ``encode`` and ``decode`` are methods of their own (``trace(method=...)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 3)
        self.dec = nn.Linear(3, 5)

    def encode(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.tanh(self.enc(x)) * scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# -- oracle helpers ------------------------------------------------------------------------------------------
def capture(root: nn.Module, module: nn.Module, *args: Any, **kwargs: Any) -> dict:
    """Run ``root(*args, **kwargs)`` with a plain forward hook on ``module``; return its args, kwargs, output and
    the root's output."""
    seen: dict = {}

    def hook(mod: nn.Module, a: tuple, kw: dict, out: Any) -> None:
        seen.setdefault("args", a)
        seen.setdefault("kwargs", kw)
        seen.setdefault("output", out)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        seen["root"] = root(*args, **kwargs)
    finally:
        handle.remove()
    return seen


def run_with_hook(root: nn.Module, module: nn.Module, fn: Callable[[Any], Any], *args: Any) -> Any:
    """Run ``root(*args)`` with a forward hook on ``module`` that returns ``fn(output)`` (None keeps it)."""
    handle = module.register_forward_hook(lambda mod, a, out: fn(out))
    try:
        return root(*args)
    finally:
        handle.remove()


class CallCounter:
    """Counts forward calls of some modules with plain forward hooks (removed on exit)."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.counts = [0] * len(modules)
        self._handles: list = []

    def __enter__(self) -> "CallCounter":
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._make(i)))
        return self

    def _make(self, i: int) -> Callable:
        def hook(mod: nn.Module, a: tuple, out: Any) -> None:
            self.counts[i] += 1

        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __getitem__(self, i: int) -> int:
        return self.counts[i]


def assert_no_hooks(root: nn.Module) -> None:
    for name, m in root.named_modules():
        assert not m._forward_hooks, f"forward hook left on {name or 'root'}: {dict(m._forward_hooks)}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name or 'root'}: {dict(m._forward_pre_hooks)}"
        flags = getattr(m, "_forward_pre_hooks_with_kwargs", None)
        assert not flags, f"pre-hook kwargs flag left on {name or 'root'}: {dict(flags)}"
        assert not hasattr(m.__dict__.get("forward"), "_raysight_forward"), f"a run's forward left on {name or 'root'}"


@contextlib.contextmanager
def unchanged(root: nn.Module) -> Iterator[None]:
    """Assert on exit that no parameter or buffer of ``root`` changed and no hook is left."""
    before = {k: v.detach().clone() for k, v in root.state_dict().items()}
    yield
    after = root.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert_no_hooks(root)


def notes_text(exc: BaseException) -> str:
    return str(exc) + "\n" + "\n".join(getattr(exc, "__notes__", []) or [])


def layer1_output_grad(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    """Oracle: the gradient of sum(mlp(x)) at layer1's output, by a hand-written tensor hook."""
    captured = {}

    def hook(module: Any, args: Any, out: torch.Tensor) -> None:
        out.register_hook(lambda g: captured.setdefault("g", g.clone()))

    handle = mlp.layer1.register_forward_hook(hook)
    try:
        mlp(x).sum().backward()
    finally:
        handle.remove()
    mlp.zero_grad(set_to_none=True)
    return captured["g"]


# -- models called several times, BatchNorm, and counting real (non-fake) forward calls -----------------------
class Cell(nn.Module):
    """A container with a child: ``tanh(lin(x))``. Called several times by :class:`Loop`."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


class Loop(nn.Module):
    """The same ``cell`` applied ``STEPS`` times, then ``head``."""

    STEPS = 3

    def __init__(self) -> None:
        super().__init__()
        self.cell = Cell(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.STEPS):
            x = self.cell(x)
        return self.head(x)


class RNNLike(nn.Module):
    """An Elman-style recurrence over the time dimension of ``x`` (batch, time, 3): ``inp`` and ``rec`` run once per
    step; ``head`` once at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.rec = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 5)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.head(h)


class BNNet(nn.Module):
    """Linear -> BatchNorm1d -> Linear; in train mode a forward pass updates the running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.lin(x)))


def _is_real(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, torch.Tensor):
        return not isinstance(value, FakeTensor) and value.device.type != "meta"
    if isinstance(value, (tuple, list)):
        return any(_is_real(v) for v in value)
    if isinstance(value, dict):
        return any(_is_real(v) for v in value.values())
    return False


class RealCallCounter(CallCounter):
    """Like :class:`CallCounter`, but counts only calls that computed real values (not a fake/meta scan pass)."""

    def _make(self, i: int) -> Callable:
        def hook(mod: nn.Module, a: tuple, out: Any) -> None:
            if _is_real(out):
                self.counts[i] += 1

        return hook


def all_calls_outputs(root: nn.Module, module: nn.Module, *args: Any) -> tuple[list, Any]:
    """Run ``root(*args)`` recording (a detached clone of) ``module``'s output at every call."""
    outs: list = []
    handle = module.register_forward_hook(lambda mod, a, out: outs.append(out.detach().clone()))
    try:
        root_out = root(*args)
    finally:
        handle.remove()
    return outs, root_out


def run_with_call_hook(root: nn.Module, module: nn.Module, fn: Callable[[int, Any], Any], *args: Any) -> Any:
    """Run ``root(*args)`` with a forward hook on ``module`` that returns ``fn(call_index, output)`` (None keeps it)."""
    counter = [0]

    def hook(mod: nn.Module, a: tuple, out: Any) -> Any:
        i = counter[0]
        counter[0] += 1
        return fn(i, out)

    handle = module.register_forward_hook(hook)
    try:
        return root(*args)
    finally:
        handle.remove()


def assert_extracted_blocks_match_hf(parquet_dir: Any, n_rows: int, block: int = 1) -> None:
    """The Parquet output of ``jobs/extract.py`` on the embedded tiny checkpoint holds each id ``0..n_rows-1`` once,
    and each row's ``h<block>`` equals that block's output in plain transformers (a forward hook), prompt by prompt."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raysight.data import to_tensors
    from raysight.models.tiny import tiny_lm_path

    table = pq.read_table(str(parquet_dir)).sort_by("id")
    assert table.column("id").to_pylist() == list(range(n_rows))
    path = str(tiny_lm_path())
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    seen: list = []
    hf.transformer.h[block].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    for text, hidden in zip(table.column("text").to_pylist(), to_tensors(table, f"h{block}")):
        with torch.no_grad():
            hf(**tokenizer(text, return_tensors="pt"))
        assert torch.allclose(hidden, seen.pop()[0], atol=1e-5)

"""Gradients: ``x.grad`` read, edited or replaced during the backward pass recorded after it.

A GRAD node followed (anywhere later in program order) by a ``backward()`` becomes a stream of its own — the GRAD
node and the nodes that depend on it — run inside a tensor hook during that backward pass. A view (an invoke's
rows, ``output[0]``) also hooks its base, since the loss often depends on the base only. Without a later backward
``x.grad`` is the plain attribute (``retain_grad``). A mixin of :class:`~raysight.runtime.interpreter.Interleaver`.
"""

from __future__ import annotations

from typing import Any

import torch

from raysight.graph.node import CALL_FUNCTION, CALL_METHOD, PARAM, READ, Node
from raysight.errors import InterventionError
from raysight.runtime.state import UNSET, Stream, annotate, same_view, walk


class Gradients:
    """Gradient methods of the Interleaver (it supplies env, streams, _set, _load, _run_body)."""

    def set_grad(self, node: Node, stream: Stream, event: Any) -> None:
        """``x.grad = g``. Inside ``x``'s gradient hook (``g`` computed from ``x.grad``) it replaces the flowing
        gradient. Otherwise, for a tensor on the autograd graph with a backward pass recorded later, it arms a hook
        that replaces ``x``'s gradient with ``g`` during that pass (later ``.grad`` reads see ``g``); a leaf (a
        parameter, an input) just gets its ``.grad`` attribute set, as in plain PyTorch."""
        tensor, grad = self._load(node.args)
        tensor = self._own_parameter(node.args[0], tensor)
        key = _grad_key(tensor)
        overrides = self.grad_overrides
        if key in overrides:  # inside that tensor's gradient hook: replaces the flowing gradient
            _check_grad(grad, overrides[key], node)
            overrides[key] = grad
        elif isinstance(tensor, torch.Tensor) and tensor.requires_grad and not tensor.is_leaf and (
            self._backward_after(node)
        ):
            self._watch_grad(tensor, lambda mine: _check_grad(grad, mine, node), node, node.args[0])
        else:
            tensor.grad = grad
        return None

    # -- arming ------------------------------------------------------------------------------------------
    def _arm_grad(self, node: Node, body: list[Node], stream: Stream) -> None:
        """``x.grad``: if a backward() is recorded after it, run the GRAD node and what depends on it inside a hook
        on ``x`` during that backward pass; otherwise it is the plain ``x.grad`` attribute (``retain_grad``)."""
        source = node.args[0]
        tensor = self._own_parameter(source, self._load(source))  # a value, or a tensor saved by an earlier trace
        if not isinstance(source, Node):
            source = _Constant(tensor)
        if not isinstance(tensor, torch.Tensor):
            raise annotate(
                InterventionError(
                    f"`.grad` of {_what(source)} cannot be observed: it is a {type(tensor).__name__}, not a tensor. "
                    "Take the tensor first (e.g. `.output[0].grad` for a module that returns a tuple)."
                ),
                node,
            )
        if not self._backward_after(node):
            if not tensor.is_leaf and not tensor.retains_grad:  # torch keeps no .grad for it: None, and a warning
                raise annotate(
                    InterventionError(
                        f"`.grad` of {_what(source)} is never computed: no backward() comes after it in the program. "
                        "Read `.grad` before the `loss.backward()` whose gradient you want, or call `.retain_grad()` "
                        "on the value before a backward pass to read `.grad` after it."
                    ),
                    node,
                )
            self._set(node, tensor.grad)
            return
        position = body.index(node)
        owned = {node.index}
        closure = [node]
        for other in body[position + 1 :]:
            if other.index not in stream.moved and any(d.index in owned for d in other.deps):
                owned.add(other.index)
                closure.append(other)
        stream.moved |= owned
        if not tensor.requires_grad:
            raise annotate(
                InterventionError(
                    f"`.grad` of {_what(source)} cannot be observed: the value does not require grad. Set "
                    "`.requires_grad = True` on it (or on an earlier value) inside the trace first."
                ),
                node,
            )
        grad_stream = Stream(f"{stream.label} (gradient of {_what(source)})", None)
        armed = (node, grad_stream)
        if type(self.armed) is tuple:  # the first gradient of this run: its own lists (the class has empty ones)
            self.armed, self.grad_overrides = [], {}
        self.armed.append(armed)
        key = _grad_key(tensor)
        # In a region of .all() / .iter[...] (one step per call), what the closure reads from outside it is this
        # call's: taken now, or at the step's end for what the step computes later; by the time the backward pass
        # reaches this call, later steps have rebound those values.
        env = self.env
        captured: list = []
        if stream.captures is not None:
            captured = [[d.index, env[d.index]] for d in {d for n in closure for d in n.deps if d.index not in owned}]
            stream.captures.extend(captured)

        def run(mine: torch.Tensor) -> torch.Tensor:
            self.armed.remove(armed)
            now = [(i, env[i]) for i, _ in captured]
            for i, value in captured:
                if value is not UNSET:
                    env[i] = value
            self._set(node, mine)
            self.grad_overrides[key] = mine
            grad_stream.gen = self._run_body(closure[1:], grad_stream)
            self.streams.append(grad_stream)
            try:
                next(grad_stream.gen)
            except StopIteration:
                grad_stream.done = True
            finally:
                if grad_stream.done:
                    for i, value in now:
                        env[i] = value
            return self.grad_overrides.pop(key)

        self._watch_grad(tensor, run, node, source)

    def _own_parameter(self, source: Any, value: Any) -> Any:
        """``model.layer.weight.grad``: the gradient of the model's parameter itself (the value a trace reads is a
        copy, which no loss depends on)."""
        if type(source) is Node and source.op is PARAM:
            path, attr = source.target
            own = getattr(self.module_at(path), attr, None)
            if isinstance(own, torch.Tensor) and own.is_leaf:
                return own
        return value

    def _watch_grad(self, tensor: torch.Tensor, fn: Any, node: Node, source: Any) -> None:
        """Hook ``tensor``, and its base when it is a view (an invoke's rows, ``output[0]``: often not itself on the
        loss's path, its base is): the first of them the backward pass reaches calls ``fn(gradient of tensor)``,
        which returns the gradient to go on with (from the base: the view's elements of its gradient, as a view,
        so in-place edits edit the base's gradient)."""
        base = tensor._base if tensor._base is not None and tensor._base.requires_grad else None
        handles: list = []

        def gradient_of_view(grad: torch.Tensor) -> torch.Tensor:
            for handle in handles:
                handle.remove()
            return fn(grad)

        def gradient_of_base(grad: torch.Tensor) -> torch.Tensor:
            for handle in handles:
                handle.remove()
            grad = grad if grad.stride() == base.stride() else grad.contiguous()
            if grad.stride() != base.stride():
                raise annotate(InterventionError(f"the gradient of {_what(source)} cannot be taken from its base "
                                                 "tensor's gradient (different memory layout)"), node)  # fmt: skip
            offset = tensor.storage_offset() - base.storage_offset()
            mine = grad.as_strided(tensor.shape, tensor.stride(), grad.storage_offset() + offset)
            new = fn(mine)
            if same_view(new, mine):
                return grad
            full = grad.clone()
            full.as_strided(tensor.shape, tensor.stride(), full.storage_offset() + offset).copy_(new)
            return full

        handles.append(tensor.register_hook(gradient_of_view))
        if base is not None:
            handles.append(base.register_hook(gradient_of_base))

    def _backward_indices(self) -> list[int]:
        """The indices of the backward() calls recorded in the graph (found once per run)."""
        if self._backwards is None:
            self._backwards = [
                n.index
                for n in self.nodes
                if (n.op is CALL_METHOD and n.target == "backward")
                or (n.op is CALL_FUNCTION and n.target is torch.autograd.backward)
            ]
        return self._backwards

    def _backward_after(self, node: Node) -> bool:
        """Is a backward pass recorded after ``node`` (edits come before the trace's own nodes)?"""
        backwards = self._backward_indices()
        if node.index >= self.edit_start:
            return any(i < self.edit_start or i > node.index for i in backwards)
        return any(node.index < i < self.edit_start for i in backwards)

    def _backward_after_trace(self) -> bool:
        """(A trace of a session) Is a backward pass recorded after this trace, later in the session?"""
        end = max(n.index for stream in self.streams for n in walk(stream.body))
        return any(end < i < self.edit_start for i in self._backward_indices())


class _Constant:
    """Stands in for a node in messages about a tensor that came into the graph as a value."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.name = f"a {type(value).__name__} saved by an earlier run"
        self.source = "an earlier trace"


def _what(source: Any) -> str:
    """A value in an error message: the module location of a read (``model.layer1.output``), else its node."""
    if type(source) is Node and source.op is READ:
        return source.target.describe()
    if type(source) is Node and source.op is PARAM:
        return source.describe_target()
    return source.name


def _check_grad(new: Any, current: torch.Tensor, node: Node) -> Any:
    """A gradient written with ``x.grad = new`` must have the shape of the gradient it replaces."""
    if isinstance(new, torch.Tensor) and isinstance(current, torch.Tensor) and new.shape != current.shape:
        raise annotate(
            InterventionError(
                f"`.grad` of {_what(node.args[0])} was set to a tensor of shape {tuple(new.shape)}, but its gradient "
                f"has shape {tuple(current.shape)}"
            ),
            node,
        )
    return new


def _grad_key(tensor: Any) -> Any:
    """Which tensor a gradient belongs to: several reads of one module give the same tensor (or, in an invoke,
    views of the same rows), so the key is its memory, not the node that produced it."""
    if isinstance(tensor, torch.Tensor):
        return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
    return ("value", id(tensor))



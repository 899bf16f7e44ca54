"""Splitting a session by its data dependencies (graph/passes.py, no Ray): which top-level nodes form a part, what
each part takes from earlier ones, and which sessions stay whole."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from helpers import MLP

import raysight
from raysight.backends.base import Request, using
from raysight.graph.passes import split_session


class Keep:
    """A backend that keeps the session's graph instead of running it."""

    graph: Any = None

    def __call__(self, model: Any, request: Request) -> dict:
        self.graph = request.graph
        return {}


def recorded(model: Any, body: Callable[[Any], None]) -> Any:
    keep = Keep()
    with using(keep):
        with model.session() as session:
            body(session)
    return keep.graph


def one_place(model: Any) -> str:
    return "pool"


def test_traces_that_share_nothing_are_separate_parts(mlp: MLP) -> None:
    model, x = raysight.NNsight(mlp), torch.randn(2, 5)

    def body(session: Any) -> None:
        with model.trace(x):
            model.output.save()
        with model.trace(x + 1):
            model.output.save()

    parts = split_session(recorded(model, body), one_place)
    assert len(parts) == 2
    assert all(not p.needs and not p.after and not p.exports for p in parts)


def test_a_trace_that_uses_an_earlier_value_runs_with_it(mlp: MLP) -> None:
    model, x = raysight.NNsight(mlp), torch.randn(2, 5)

    def body(session: Any) -> None:
        with model.trace(x):
            h = model.layer1.output
        with model.trace(h[:, :5]):
            model.output.save()

    graph = recorded(model, body)
    parts = split_session(graph, one_place)
    assert len(parts) == 1 and parts[0].nodes == [n.index for n in graph.body]


def test_models_placed_apart_cut_a_chain_into_parts_that_pass_values(mlp: MLP) -> None:
    torch.manual_seed(1)
    a, b, x = raysight.NNsight(mlp), raysight.NNsight(MLP()), torch.randn(2, 5)
    seen = {}

    def body(session: Any) -> None:
        with a.trace(x):
            seen["h"] = a.layer1.output[:, :5]
        with b.trace(seen["h"]):
            seen["out"] = b.output.save()

    graph = recorded(a, body)
    parts = split_session(graph, lambda m: "A" if m is a else "B")
    assert [p.label for p in parts] == ["A", "B"]
    first, second = parts
    h_index = seen["h"].node.index
    assert first.exports == {h_index} and second.needs == {h_index} and second.after == {0}
    assert list(second.models.values()) == [b]


def test_a_training_session_stays_whole(mlp: MLP) -> None:
    model, x = raysight.NNsight(mlp), torch.randn(2, 5)

    def body(session: Any) -> None:
        weight = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([weight], lr=0.1)
        with model.trace(x):
            loss = (model.output + weight).sum()
            loss.backward()
        opt.step()
        with model.trace(x + 1):
            model.output.save()

    parts = split_session(recorded(model, body), one_place)
    assert len(parts) == 1


@pytest.mark.parametrize("switch", ["train", "eval", "requires_grad_", "zero_grad"])
def test_a_session_that_changes_the_models_state_stays_whole(mlp: MLP, switch: str) -> None:
    """``model.train()`` (``eval``, ``requires_grad_``, ``zero_grad``) between independent traces changes the served
    model itself: the traces after it must run where it ran."""
    model, x = raysight.NNsight(mlp), torch.randn(2, 5)

    def body(session: Any, switch: str = "") -> None:
        with model.trace(x):
            model.output.save()
        if switch:
            getattr(model.layer1, switch)()
        with model.trace(x + 1):
            model.output.save()

    assert len(split_session(recorded(model, body), one_place)) == 2  # (independent traces split)
    assert len(split_session(recorded(model, lambda s: body(s, switch)), one_place)) == 1


def test_a_session_that_stops_itself_stays_whole_but_a_loop_stop_does_not(mlp: MLP) -> None:
    model, x = raysight.NNsight(mlp), torch.randn(2, 5)

    def stops(session: Any) -> None:
        with model.trace(x):
            model.output.save()
        session.stop()
        with model.trace(x + 1):
            model.output.save()

    def loop_stops(session: Any) -> None:
        with model.trace(x):
            model.output.save()
        with session.iter([1, 2, 3]) as item:
            with session.cond(item == 2):
                session.stop()
        with model.trace(x + 1):
            model.output.save()

    assert len(split_session(recorded(model, stops), one_place)) == 1
    assert len(split_session(recorded(model, loop_stops), one_place)) == 2  # the loop runs no model: with part 0


def test_values_that_run_no_model_go_with_the_first_part(mlp: MLP) -> None:
    model, x = raysight.NNsight(mlp), torch.randn(2, 5)

    def body(session: Any) -> None:
        with model.trace(x):
            model.output.save()
        raysight.list([1, 2]).save()
        with model.trace(x + 1):
            model.output.save()

    graph = recorded(model, body)
    parts = split_session(graph, one_place)
    assert len(parts) == 2
    assert sorted(parts[0].nodes + parts[1].nodes) == [n.index for n in graph.body]
    assert graph.body[1].index in parts[0].nodes


def test_a_value_changed_by_a_later_part_is_taken_from_that_part(mlp: MLP) -> None:
    torch.manual_seed(1)
    a, b, x = raysight.NNsight(mlp), raysight.NNsight(MLP()), torch.randn(2, 5)
    seen = {}

    def body(session: Any) -> None:
        seen["l"] = raysight.list()
        with a.trace(x):
            seen["l"].append(a.output)
        with b.trace(x):
            seen["l"].append(b.output)
        with a.trace(x):
            raysight.apply(len, seen["l"]).save()

    parts = split_session(recorded(a, body), lambda m: "A" if m is a else "B")
    assert [p.label for p in parts] == ["A", "B", "A"]
    index = seen["l"].node.index
    assert parts[1].after == {0} and parts[2].after == {1}  # the third part waits for the second's list
    assert index in parts[1].exports and index in parts[2].needs


def test_a_session_that_changes_a_tensor_of_the_client_in_place_stays_whole(mlp: MLP) -> None:
    model, x, buffer = raysight.NNsight(mlp), torch.randn(2, 5), torch.zeros(2)

    def body(session: Any) -> None:
        with model.trace(x):
            raysight.apply(torch.Tensor.add_, buffer, model.output[:, 0])
        with model.trace(x + 1):
            (model.output + buffer).save()

    assert len(split_session(recorded(model, body), one_place)) == 1

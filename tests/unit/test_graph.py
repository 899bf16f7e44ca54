"""The graph layer on its own: nodes, dependencies, program order and a readable str(graph)."""

from __future__ import annotations

import operator

import torch

import raysight
from raysight import Graph, Location, Op


def _small_graph() -> Graph:
    g = Graph()
    read = g.add(Op.READ, Location("layer1", "output"))
    added = g.add(Op.CALL_FUNCTION, operator.add, (read, 1))
    cond = g.add(Op.COND, None, (added,))
    g.enter(cond)
    inner = g.add(Op.CALL_METHOD, "sum", (added,), {"dim": 0})
    g.exit()
    g.add(Op.WRITE, Location("layer2", "input"), (inner,))
    return g


def test_str_graph_lists_every_op_in_program_order_one_per_line():
    g = _small_graph()
    text = str(g)
    lines = [line for line in text.splitlines() if "%" in line]
    assert len(lines) == len(g.nodes) == 5
    expected = ["read", "call_function", "cond", "call_method", "write"]
    for line, op, node in zip(lines, expected, g.walk()):
        assert op in line
        assert f"%{node.index}" in line


def test_str_graph_names_targets_and_arguments():
    text = str(_small_graph())
    assert "layer1.output" in text
    assert "layer2.input" in text
    assert "add" in text
    assert "sum" in text
    assert "dim" in text
    # the add node refers to the read node by name
    add_line = next(line for line in text.splitlines() if "add" in line)
    assert "%0" in add_line


def test_str_graph_indents_the_body_of_a_cond():
    lines = [line for line in str(_small_graph()).splitlines() if "%" in line]
    indent = [len(line) - len(line.lstrip()) for line in lines]
    cond_i = next(i for i, line in enumerate(lines) if "cond" in line)
    assert indent[cond_i + 1] > indent[cond_i]  # the method call inside the cond
    assert indent[cond_i + 2] == indent[cond_i]  # the write after the block


def test_walk_descends_into_bodies_in_program_order():
    g = _small_graph()
    assert [n.index for n in g.walk()] == list(range(len(g.nodes)))
    assert [n.index for n in g.body] == [0, 1, 2, 4]


def test_node_deps_are_found_inside_nested_arguments_once():
    g = Graph()
    a = g.add(Op.READ, Location("a", "output"))
    b = g.add(Op.READ, Location("b", "output"))
    c = g.add(Op.CALL_FUNCTION, torch.cat, ([a, b, a],), {"dim": slice(None, b)})
    assert {d.index for d in c.deps} == {a.index, b.index}
    assert len(c.deps) == 2
    assert a.num_users == 1 and b.num_users == 1


def test_graph_locations_are_the_reads_and_writes():
    g = _small_graph()
    assert g.locations() == {Location("layer1", "output"), Location("layer2", "input")}


def test_str_graph_of_a_recorded_trace_lists_its_ops(model, mlp, x):
    with model.trace(x) as tracer:
        h = model.layer1.output
        y = (h * 2).save()
        model.layer2.output[:] = 0
    text = str(tracer.graph)
    assert "layer1.output" in text
    assert "mul" in text
    assert "setitem" in text
    assert "[saved]" in text or "saved" in text
    assert torch.allclose(y, mlp.layer1(x) * 2)


def test_location_describe_names_module_value_and_call():
    assert "layer1" in str(Location("layer1", "output")) and "output" in str(Location("layer1", "output"))
    assert "1" in str(Location("layer1", "input", 1))
    assert raysight.Location("", "output").path == ""


def test_recorded_nodes_know_the_users_line_and_leaf_nodes_share_the_class_defaults(model, x):
    import inspect

    from raysight.graph.node import SourceLine

    with model.trace(x) as tracer:
        line = inspect.currentframe().f_lineno + 1
        hidden = model.layer1.output
        doubled = hidden * 2
    read, mul = tracer.graph.nodes[1], tracer.graph.nodes[2]
    assert read.op is Op.READ and read.target == Location("layer1", "output", 0)
    assert isinstance(read.source, SourceLine)
    assert (read.source.filename, read.source.lineno) == (__file__, line)
    assert read.source.text() == "hidden = model.layer1.output"
    assert mul.source.lineno == line + 1
    assert read.args == () and read.kwargs == {} and read.deps == () and read.body is None
    assert mul.deps == (read,) and read.num_users == 1 and not read.saved
    assert hidden.node is read and doubled.node is mul

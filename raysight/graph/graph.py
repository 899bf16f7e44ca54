"""Graph: the ordered nodes of one trace (or session), with nested bodies for conditions and invokes.

Every node of a graph, at any nesting depth, is in ``graph.nodes`` at position ``node.index``; ``graph.body`` is
the top-level list, and a COND or INVOKE node holds its own list in ``node.body``. Program order is index order.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from raysight.graph.node import READ, WRITE, Location, Node, Op, SourceLine


class Graph:
    """An intervention graph under construction or ready to run."""

    __slots__ = ("nodes", "body", "_stack")

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.body: list[Node] = []
        self._stack: list[list[Node]] = [self.body]

    # -- building -------------------------------------------------------------------------------------------
    def add(
        self,
        op: Op,
        target: Any = None,
        args: tuple = (),
        kwargs: Optional[dict] = None,
        source: Optional[SourceLine] = None,
        body: Optional[list] = None,
    ) -> Node:
        node = Node(len(self.nodes), op, target, args, kwargs, body, source)
        self.nodes.append(node)
        self._stack[-1].append(node)
        return node

    def enter(self, node: Node) -> None:
        """Record the following nodes into ``node.body`` until :meth:`exit`."""
        if node.body is None:
            node.body = []
        self._stack.append(node.body)

    def exit(self) -> None:
        if len(self._stack) == 1:
            raise RuntimeError("Graph.exit() without a matching enter()")
        self._stack.pop()

    @property
    def current_body(self) -> list[Node]:
        """The list new nodes are appended to."""
        return self._stack[-1]

    @property
    def depth(self) -> int:
        return len(self._stack) - 1

    # -- inspecting -----------------------------------------------------------------------------------------
    def walk(self, body: Optional[list] = None) -> Iterator[Node]:
        """Every node in program order, descending into bodies."""
        for node in self.body if body is None else body:
            yield node
            if node.body is not None:
                yield from self.walk(node.body)

    def locations(self) -> set[Location]:
        """The module locations the graph reads or writes (the hooks a run needs)."""
        return {n.target for n in self.nodes if n.op is READ or n.op is WRITE}

    @property
    def saved(self) -> list[Node]:
        return [n for n in self.nodes if n.saved]

    def __len__(self) -> int:
        return len(self.nodes)

    def __str__(self) -> str:
        lines: list[str] = []

        def emit(body: list, indent: str) -> None:
            for node in body:
                where = f"  # {node.source}" if node.source else ""
                lines.append(f"{indent}{node.format()}{where}")
                if node.body is not None:
                    emit(node.body, indent + "    ")

        emit(self.body, "")
        return "graph(\n" + "\n".join("  " + line for line in lines) + "\n)"

    def __repr__(self) -> str:
        return f"<Graph with {len(self.nodes)} nodes>"

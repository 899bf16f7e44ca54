"""The intervention graph: plain data describing what to read, compute and write during a forward pass.

Nothing here knows about hooks, models or Ray; ``raysight.runtime`` runs a graph, ``raysight.tracing`` builds one.
"""

from raysight.graph.graph import Graph
from raysight.graph.node import Location, Node, Op
from raysight.graph.proxy import Proxy

__all__ = ["Graph", "Location", "Node", "Op", "Proxy"]

"""raysight: read and edit the internals of PyTorch models with the nnsight programming model, locally or on Ray.

    import raysight
    model = raysight.NNsight(torch_module)
    with model.trace(x):
        hidden = model.layer1.output.save()

Importing raysight patches nothing and starts nothing; it imports neither ray nor transformers.
"""

from raysight.config import CONFIG
from raysight.errors import (
    InterventionError,
    MissedProviderError,
    OutOfOrderError,
    RaysightError,
    RemoteExecutionError,
    StructureError,
    TimeLimitError,
    TraceError,
)
from raysight.envoy import Envoy
from raysight.graph import Graph, Location, Node, Op, Proxy
from raysight.models.nnsight import NNsight
from raysight.tracing.control import (
    apply,
    bool,
    bytearray,
    bytes,
    complex,
    cond,
    dict,
    float,
    int,
    iter,
    list,
    local,
    log,
    set,
    stop,
    str,
    trace,
    tuple,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # LanguageModel imports transformers: load it only when asked for, so `import raysight` stays light.
    if name == "LanguageModel":
        from raysight.models.language import LanguageModel

        return LanguageModel
    if name in ("init", "serve", "pools"):  # Ray: imported when first used
        import raysight.backends.ray as ray_backend

        return getattr(ray_backend, name)
    if name in ("train", "data", "util"):
        import importlib

        return importlib.import_module(f"raysight.{name}")
    if name == "extract":
        from raysight.data.extract import extract

        return extract
    raise AttributeError(f"module 'raysight' has no attribute {name!r}")

__all__ = [
    "NNsight", "LanguageModel", "Envoy", "CONFIG", "init", "serve", "pools", "extract", "Proxy", "Graph", "Node", "Op",
    "Location", "apply", "log", "stop", "cond", "iter", "trace", "local",
    "list", "dict", "tuple", "set", "int", "float", "str", "bool", "bytes", "bytearray", "complex",
    "RaysightError", "TraceError", "OutOfOrderError", "InterventionError", "StructureError", "MissedProviderError",
    "RemoteExecutionError", "TimeLimitError",
]  # fmt: skip

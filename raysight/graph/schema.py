"""The wire schema: the pydantic models a request and a reply are validated against, its version, and the limits a
server enforces. Documented in ``docs/wire-format.md``; ``serialize.py`` encodes to it and ``decoding.py`` decodes
from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from raysight.errors import RaysightError

SCHEMA_VERSION = 4  # 2: tensors carry an `id`; 3: `model_param` / `model_module` reference the server's own
# objects; 4: each model carries the client's `training` modes and `frozen` parameters


class WireError(RaysightError, ValueError):
    """A payload that cannot be accepted: malformed, too large, of another version, or not allowed."""


@dataclass
class Limits:
    """What a server accepts: request size, saved bytes per run, and wall time per run."""

    max_request_bytes: int = 256 * 1024**2
    max_saved_bytes: int = 4 * 1024**3
    max_seconds: Optional[float] = None

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0 or self.max_saved_bytes <= 0:
            raise ValueError("Limits: sizes must be positive byte counts")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("Limits: max_seconds must be positive (or None for no limit)")


# -- the schema ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WireSource(_Strict):
    file: str
    line: int
    function: str


class WireNode(_Strict):
    op: str
    target: Any = None
    args: Any = None
    kwargs: Any = None
    body: Optional[list[int]] = None
    saved: bool = False
    source: Optional[WireSource] = None


class WireGraph(_Strict):
    nodes: list[WireNode]
    body: list[int]


class WireInvoke(_Strict):
    args: Any
    kwargs: Any
    batch_size: int


class WireModel(_Strict):
    """A model the request runs on, by the id the server knows it under, with the client's persistent edits."""

    id: str
    edits: list[WireGraph] = []
    # the paths of the modules in training mode on the client ("" the root); the others run in eval mode. None:
    # the server's own modes
    training: Optional[list[str]] = None
    # the names of the parameters that do not require grad on the client (a frozen base model); the others do.
    # None: the server's own flags
    frozen: Optional[list[str]] = None


class WireRequest(_Strict):
    version: int
    method: str
    graph: WireGraph
    invokes: list[WireInvoke]
    forward_kwargs: Any
    model: int  # index into models (-1: a session, whose traces name their models)
    models: list[WireModel]


class WireResult(_Strict):
    version: int
    saved: dict[int, Any]
    logs: list[str] = []

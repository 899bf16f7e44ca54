"""The exception tree of raysight.

Every error is a small, picklable class (plain ``args``), so it can cross a process or a Ray boundary intact.
Messages name what went wrong, where (a module path, an invoke, a user source line) and what to do instead.
"""

from __future__ import annotations

__all__ = [
    "RaysightError",
    "TraceError",
    "OutOfOrderError",
    "InterventionError",
    "StructureError",
    "MissedProviderError",
    "TimeLimitError",
    "RemoteExecutionError",
]


class RaysightError(Exception):
    """Base class of every error raysight raises on its own account."""


class TraceError(RaysightError):
    """The code inside a ``with model.trace(...)`` block cannot be recorded as written."""


class OutOfOrderError(RaysightError):
    """An invoke read a module after a module that runs later in the forward pass had already fired."""


class InterventionError(RaysightError):
    """An intervention was given a value it cannot apply (wrong structure, never-produced value, ...)."""


class StructureError(InterventionError, TypeError):
    """A value assigned to ``.output``/``.input`` does not have the structure of the value it replaces."""


class MissedProviderError(RaysightError):
    """A module location the graph waits on fired fewer times than the graph asked for."""


class TimeLimitError(RaysightError):
    """A run went past the time limit of the server that ran it."""


class RemoteExecutionError(RaysightError):
    """An intervention failed where the graph ran (another process, an actor). ``wrap`` keeps the original type
    too, so ``except IndexError`` works as it would locally."""

    @classmethod
    def wrap(cls, exc: BaseException) -> "RemoteExecutionError":
        message = f"{type(exc).__name__}: {exc}"
        wrapped: RemoteExecutionError
        try:
            both = type(f"Remote{type(exc).__name__}", (cls, type(exc)), {"__init__": Exception.__init__,
                                                                        "__str__": Exception.__str__})
            wrapped = both(message)
        except TypeError:  # a type that cannot be subclassed or built from a message
            wrapped = cls(message)
        for note in getattr(exc, "__notes__", []):  # the user's line that created the failing node
            if hasattr(wrapped, "add_note"):
                wrapped.add_note(note)
        return wrapped

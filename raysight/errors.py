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
        wrapped = cls._of_type(type(exc), f"{type(exc).__name__}: {exc}")
        for note in getattr(exc, "__notes__", []):  # the user's line that created the failing node
            _add_note(wrapped, note)
        return wrapped

    @classmethod
    def rebuild(cls, info: dict) -> BaseException:
        """The client's side of an error reported by an actor (``{"module", "name", "message", "notes",
        "traceback"}``): raysight's own errors come back as themselves, others as a RemoteExecutionError that is
        also of the original type; the user's line and the remote traceback are notes."""
        kind = _import_type(info.get("module", ""), info.get("name", ""))
        message = info.get("message", "")
        exc: BaseException
        if kind is not None and issubclass(kind, RaysightError):
            try:
                exc = kind(message)
            except Exception:
                exc = cls(message)
        else:
            exc = cls._of_type(kind if kind is not None and issubclass(kind, Exception) else None, message)
        for note in info.get("notes", []):
            _add_note(exc, note)
        if info.get("traceback"):
            _add_note(exc, "raysight: the traceback where it ran:\n" + info["traceback"].rstrip())
        return exc

    @classmethod
    def _of_type(cls, kind: "type | None", message: str) -> "RemoteExecutionError":
        if kind is None or issubclass(cls, kind):
            return cls(message)
        try:
            both = type(f"Remote{kind.__name__}", (cls, kind), {"__init__": Exception.__init__,
                                                                "__str__": Exception.__str__})
            return both(message)
        except TypeError:  # a type that cannot be subclassed or built from a message
            return cls(message)


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    elif exc.args and isinstance(exc.args[0], str):  # Python 3.10
        exc.args = (f"{exc.args[0]}\n{note}", *exc.args[1:])


def _import_type(module: str, qualname: str) -> "type | None":
    import importlib

    try:
        obj: object = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None

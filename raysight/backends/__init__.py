"""Backends run a recorded request and return the saved values: in this process, or (later) on a Ray actor."""

from raysight.backends.base import Backend, InvokeInputs, Request, current_default, using
from raysight.backends.local import LocalBackend

__all__ = ["Backend", "InvokeInputs", "LocalBackend", "Request", "current_default", "using"]

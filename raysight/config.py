"""``raysight.CONFIG``: nnsight 0.4's settings object (``CONFIG.APP.*``, ``CONFIG.API.*``), so scripts written for
it run unchanged, with what each setting means in raysight:

* ``APP.REMOTE_LOGGING`` (True): what ``tracer.log`` prints where a graph runs remotely (a Ray actor, the wire
  format) is printed on the client. False keeps those lines off the client; a local run prints as always.
* ``APP.LOGGING`` (False): True shows raysight's own log records (the ``raysight`` logger, INFO and up) on stderr.
* ``APP.DEBUG`` (True): accepted either way; raysight's errors always name the failing operation and your line.
* ``APP.CONTROL_FLOW_HANDLING`` and ``APP.FRAME_INJECTION`` (False): raysight never rewrites your frames or turns
  ``if proxy:`` / ``for x in proxy:`` into graph control flow (use ``tracer.cond`` / ``session.iter``), which is
  what nnsight 0.4 does with both set to False; setting either to True is an error saying so.
* ``APP.GLOBAL_TRACING`` (True): the module-level API (``raysight.apply``, ``log``, ``cond``, ...) always works.
* ``API.*`` and ``set_default_api_key``: NDIF's host and key. raysight talks to a Ray cluster
  (``raysight.init(address=...)``), never to NDIF: the values are kept and unused.

Settings last for the process: ``CONFIG.save()`` (which in nnsight writes them into its installed package) writes
nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional


class _Settings:
    """A section of settings: a fixed set of names with defaults; a misspelt name is an error, not a new attribute."""

    _section = ""
    _defaults: dict[str, Any] = {}

    def __init__(self) -> None:
        for name, value in self._defaults.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._defaults:
            raise AttributeError(f"CONFIG.{self._section} has no setting {name!r}; its settings are "
                                 f"{', '.join(self._defaults)}")  # fmt: skip
        check = getattr(self, f"_set_{name}", None)
        if check is not None:
            check(value)
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"{self._section}({', '.join(f'{k}={getattr(self, k)!r}' for k in self._defaults)})"


def _fixed(name: str, allowed: bool, why: str) -> Callable[[Any, Any], None]:
    def check(self: Any, value: Any) -> None:
        if bool(value) != allowed:
            raise ValueError(f"CONFIG.APP.{name} = {value!r}: raysight {why}")

    return check


_NO_REWRITING = ("never rewrites frames or source (SPEC §9): record control flow with `with tracer.cond(pred):` "
                 "and loops with `with session.iter(items) as item:`; saved proxies already behave as their values "
                 "after the trace")  # fmt: skip


class AppConfig(_Settings):
    _section = "APP"
    _defaults = {"LOGGING": False, "REMOTE_LOGGING": True, "DEBUG": True, "CONTROL_FLOW_HANDLING": False,
                 "FRAME_INJECTION": False, "GLOBAL_TRACING": True}  # fmt: skip
    _handler: Optional[logging.Handler] = None
    _level = logging.NOTSET  # the raysight logger's level before LOGGING turned on

    _set_CONTROL_FLOW_HANDLING = _fixed("CONTROL_FLOW_HANDLING", False, _NO_REWRITING)
    _set_FRAME_INJECTION = _fixed("FRAME_INJECTION", False, _NO_REWRITING)
    _set_GLOBAL_TRACING = _fixed("GLOBAL_TRACING", True, "keeps its module-level API (raysight.apply, log, cond, "
                                 "iter, stop, the builtins) on; use it only inside a trace or session")  # fmt: skip

    def _set_LOGGING(self, value: Any) -> None:
        log = logging.getLogger("raysight")
        if value and AppConfig._handler is None:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
            log.addHandler(handler)
            AppConfig._handler, AppConfig._level = handler, log.level
            if log.level == logging.NOTSET or log.level > logging.INFO:
                log.setLevel(logging.INFO)
        elif not value and AppConfig._handler is not None:
            log.removeHandler(AppConfig._handler)
            log.setLevel(AppConfig._level)
            AppConfig._handler = None


class ApiConfig(_Settings):
    _section = "API"
    _defaults = {"HOST": "ndif.dev", "SSL": True, "FORMAT": "json", "ZLIB": True, "APIKEY": None, "JOB_ID": None}


class Config:
    """``raysight.CONFIG``; see the module docstring."""

    def __init__(self) -> None:
        self.API = ApiConfig()
        self.APP = AppConfig()

    def set_default_api_key(self, apikey: str) -> None:
        """nnsight's NDIF key: kept in ``CONFIG.API.APIKEY``; raysight does not use it."""
        self.API.APIKEY = apikey

    def set_default_app_debug(self, debug: bool) -> None:
        self.APP.DEBUG = debug

    def save(self) -> None:
        """Accepted for nnsight scripts: raysight's settings last for the process and are not written anywhere."""

    def __repr__(self) -> str:
        return f"CONFIG({self.API!r}, {self.APP!r})"


CONFIG = Config()

"""Small helpers of nnsight 0.4's ``nnsight.util`` that user code imports."""

from __future__ import annotations

from typing import Any

import torch


class WrapperModule(torch.nn.Module):
    """A module that returns its input: a hook point to attach to a model (``envoy.point = WrapperModule()``) and call
    in a trace (``envoy.point(h, hook=True)``) or in a forward. One positional argument comes back as itself, several
    as a tuple; keyword arguments are ignored (as nnsight 0.4's)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if len(args) == 1 else args

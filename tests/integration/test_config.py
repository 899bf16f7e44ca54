"""``raysight.CONFIG``, nnsight 0.4's settings object: the settings that change what raysight does (remote
``tracer.log`` lines on the client, raysight's own log records), the ones fixed by its design (no frame or control
flow rewriting) and NDIF's, kept and unused."""

from __future__ import annotations

import pytest
import torch

from raysight import CONFIG

pytestmark = pytest.mark.usefixtures("restore_config")  # (tests/conftest.py)


def test_remote_logging_off_keeps_remote_log_lines_off_the_client(model, mlp, x, capsys, backend):
    h = mlp.layer1(x)
    print("sum:", h.sum())
    want = capsys.readouterr().out
    with model.trace(x) as tracer:
        tracer.log("sum:", model.layer1.output.sum())
    assert capsys.readouterr().out == want  # on by default, on every backend
    CONFIG.APP.REMOTE_LOGGING = False
    with model.trace(x) as tracer:
        tracer.log("sum:", model.layer1.output.sum())
        out = model.layer1.output.save()
    printed = capsys.readouterr().out
    assert printed == ("" if backend != "local" else want)  # a local run prints as always
    torch.testing.assert_close(out.value, h)  # the run itself is unchanged


@pytest.mark.local_only
def test_nnsight_scripts_settings_run_unchanged(model, mlp, x):
    """The conditionals / iterator / 0.4 guide notebooks start with these lines; raysight already behaves as they
    ask (no control-flow or frame rewriting)."""
    CONFIG.APP.CONTROL_FLOW_HANDLING = False
    CONFIG.APP.FRAME_INJECTION = False
    CONFIG.APP.DEBUG = False
    CONFIG.set_default_api_key("KEY")
    CONFIG.save()
    assert CONFIG.API.APIKEY == "KEY" and CONFIG.APP.DEBUG is False
    with model.trace(x) as tracer:
        with tracer.cond(model.layer1.output.sum() > -1e9):
            out = model.layer1.output.save()
    torch.testing.assert_close(out.value, mlp.layer1(x))

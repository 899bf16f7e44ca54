"""``raysight.CONFIG`` on its own: fixed settings refuse what raysight does not do, misspelt names are errors, and
``LOGGING`` shows raysight's log records (the settings used with a model are in tests/integration/test_config.py)."""

from __future__ import annotations

import logging

import pytest

from raysight import CONFIG

pytestmark = pytest.mark.usefixtures("restore_config")  # (tests/conftest.py)


@pytest.mark.parametrize("name", ["CONTROL_FLOW_HANDLING", "FRAME_INJECTION"])
def test_turning_on_rewriting_is_an_error_naming_the_alternative(name):
    with pytest.raises(ValueError, match=r"never rewrites frames.*tracer\.cond.*session\.iter"):
        setattr(CONFIG.APP, name, True)
    assert getattr(CONFIG.APP, name) is False


def test_global_tracing_cannot_be_turned_off():
    with pytest.raises(ValueError, match="module-level API"):
        CONFIG.APP.GLOBAL_TRACING = False
    assert CONFIG.APP.GLOBAL_TRACING is True


def test_a_misspelt_setting_is_an_error_listing_the_settings():
    with pytest.raises(AttributeError, match=r"CONFIG\.APP has no setting 'REMOTE_LOGING'.*REMOTE_LOGGING"):
        CONFIG.APP.REMOTE_LOGING = False
    with pytest.raises(AttributeError, match=r"CONFIG\.API has no setting 'KEY'.*APIKEY"):
        CONFIG.API.KEY = "x"


def test_logging_shows_raysights_log_records_on_stderr(capsys):
    log = logging.getLogger("raysight.test_config")
    before = logging.getLogger("raysight").level
    log.info("hidden")
    assert "hidden" not in capsys.readouterr().err
    CONFIG.APP.LOGGING = True
    log.info("shown %d", 7)
    assert "raysight.test_config INFO: shown 7" in capsys.readouterr().err
    CONFIG.APP.LOGGING = False
    assert logging.getLogger("raysight").level == before
    log.warning("after")
    assert "raysight.test_config WARNING: after" not in capsys.readouterr().err


def test_config_is_the_same_object_as_raysight_config():
    import raysight.config

    assert raysight.CONFIG is raysight.config.CONFIG is CONFIG
    assert "REMOTE_LOGGING=True" in repr(CONFIG)

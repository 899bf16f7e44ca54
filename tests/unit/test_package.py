"""Package-level guarantees: a light import and picklable errors."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import raysight

ERROR_TYPES = [
    raysight.RaysightError,
    raysight.TraceError,
    raysight.OutOfOrderError,
    raysight.InterventionError,
    raysight.StructureError,
    raysight.MissedProviderError,
]


def test_import_raysight_does_not_import_ray_or_transformers():
    code = (
        "import sys, raysight\n"
        "raysight.init, raysight.serve, raysight.pools  # the Ray door itself imports ray only when called\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'transformers'))\n"
        "print(repr(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("cls", ERROR_TYPES, ids=lambda c: c.__name__)
def test_error_pickle_round_trip_keeps_type_and_message(cls):
    err = cls("model.layer1.output: something specific went wrong")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err)
    assert back.args == err.args


def test_structure_error_is_also_a_type_error():
    assert issubclass(raysight.StructureError, TypeError)


def test_raised_runtime_error_pickles_with_its_notes(model, x):
    with pytest.raises(raysight.OutOfOrderError) as info:
        with model.trace(x):
            model.layer2.output.save()
            model.layer1.output.save()
    err = info.value
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is raysight.OutOfOrderError
    assert str(back) == str(err)
    assert getattr(back, "__notes__", None) == getattr(err, "__notes__", None)


def test_raised_structure_error_pickles(model, x):
    import torch

    with pytest.raises(raysight.StructureError) as info:
        with model.trace(x):
            model.layer1.output = (torch.zeros(2, 10),)
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is raysight.StructureError
    assert str(back) == str(info.value)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_an_error_reported_by_an_actor_is_rebuilt_with_its_type_and_notes():
    from raysight.distributed.actor import error_info

    try:
        try:
            [][1]
        except IndexError as exc:
            exc.add_note("raysight: while running %3, created at x.py:7")
            raise raysight.RemoteExecutionError.wrap(exc) from exc
    except raysight.RemoteExecutionError as remote:
        info = error_info(remote)
    back = raysight.RemoteExecutionError.rebuild(pickle.loads(pickle.dumps(info)))
    assert isinstance(back, IndexError) and isinstance(back, raysight.RemoteExecutionError)
    assert "list index out of range" in str(back)
    assert back.__notes__[0] == "raysight: while running %3, created at x.py:7"
    assert "traceback where it ran" in back.__notes__[-1]
    own = raysight.RemoteExecutionError.rebuild(error_info(raysight.OutOfOrderError("model.a.output was read")))
    assert type(own) is raysight.OutOfOrderError and str(own) == "model.a.output was read"
    unknown = raysight.RemoteExecutionError.rebuild({"module": "nowhere", "name": "Gone", "message": "m"})
    assert type(unknown) is raysight.RemoteExecutionError

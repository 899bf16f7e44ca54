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

"""A real crash: the process running an extraction dies (``os._exit``) in the middle of its third batch; a new
process resumes the same extraction, and the output holds every input row exactly once with the right values."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
import torch

from raysight.data import to_tensor

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, raysight
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    torch.save(net.state_dict(), sys.argv[2] + ".weights")
    g = torch.Generator().manual_seed(3)
    rows = [{"x": torch.randn(5, generator=g).tolist()} for _ in range(11)]
    crash = sys.argv[3] == "crash"

    def preprocess(batch):
        if crash and any(abs(x[0] - rows[7]["x"][0]) < 1e-12 for x in batch["x"]):
            os._exit(17)  # the whole process goes, mid-extraction
        return {"x": torch.tensor(batch["x"])}

    def fn(model, batch):
        with model.trace(batch["x"]):
            return {"out": model.output}

    raysight.extract(raysight.NNsight(net), rows, fn, output=sys.argv[1], batch_size=3, remote=False,
                     preprocess=preprocess, progress=False)
    torch.save(torch.tensor([r["x"] for r in rows]), sys.argv[2] + ".inputs")
    """
)


@pytest.mark.slow
def test_an_extraction_killed_mid_way_resumes_in_a_new_process(tmp_path: pathlib.Path) -> None:
    script, out, stem = tmp_path / "job.py", tmp_path / "out", str(tmp_path / "saved")
    script.write_text(SCRIPT)
    env = {**os.environ, "RAY_ADDRESS": ""}
    crashed = subprocess.run([sys.executable, str(script), str(out), stem, "crash"], env=env, capture_output=True,
                             timeout=300)  # fmt: skip
    assert crashed.returncode == 17, crashed.stderr.decode()[-2000:]
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-000000.parquet", "part-000001.parquet"]
    resumed = subprocess.run([sys.executable, str(script), str(out), stem, "resume"], env=env, capture_output=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.column("id").to_pylist() == list(range(11))
    net = torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    net.load_state_dict(torch.load(stem + ".weights"))
    with torch.no_grad():
        assert torch.allclose(to_tensor(table, "out"), net(torch.load(stem + ".inputs")), atol=1e-6)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

"""The ``raysight`` command (SPEC §8 "Cluster jobs") against a real Ray head started with ``ray start`` for this
module, and the cluster configs in cluster/. Jobs are real: tiny scripts written to tmp_path, and jobs/extract.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import assert_extracted_blocks_match_hf

from raysight import cli

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")
PORT_OPTIONS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                "--node-manager-port", "--object-manager-port")  # fmt: skip

SCRIPT = """\
import argparse, sys
parser = argparse.ArgumentParser()
parser.add_argument("--flag")
args = parser.parse_args()
print("sum =", sum(range(10)))
print("flag =", args.flag)
print("prefix =", sys.prefix)
"""


# -- helpers ----------------------------------------------------------------------------------------------------
def run_cli(*argv: str) -> tuple[int, str, str]:
    """``raysight ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def run_command(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m raysight ARGV`` in a subprocess (what a user's shell sees, exit code and tracebacks included)."""
    return subprocess.run([sys.executable, "-m", "raysight", *argv], capture_output=True, text=True, timeout=timeout)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports nobody listens on now (bound together, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def write_script(directory: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = directory / name
    path.write_text(text)
    return path


def head_processes(session_id: int, temp_dir: str) -> list[Any]:
    """The processes of the head: those of the session ``ray start`` ran in, those whose command line names its temp
    dir, and every descendant of these (job drivers start sessions of their own under the job supervisor)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(proc.pid) == session_id or temp_dir in " ".join(proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                found.update({child.pid: child for child in proc.children(recursive=True)})
    found.pop(os.getpid(), None)
    return list(found.values())


def kill_head(session_id: int, temp_dir: str) -> list[str]:
    """SIGTERM the head's processes, then SIGKILL what is left (looking again each round, for a worker the raylet
    started meanwhile); the survivors (none, normally)."""
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        procs = [p for p in head_processes(session_id, temp_dir) if _alive(p)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        psutil.wait_procs(procs, timeout=5)
    return [f"{p.pid} {p.name()}" for p in head_processes(session_id, temp_dir) if _alive(p)]


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie is dead; its parent (init here) reaps it later
    except psutil.Error:
        return False


# -- the head ---------------------------------------------------------------------------------------------------
HEAD_GCS: dict[str, str] = {}  # job server URL of a head -> its GCS address


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    """The job server URL of a real Ray head (``ray start --head`` in a subprocess, 2 CPUs) for this module.

    It must not disturb the rest of the test session, which runs its own in-process cluster (tests/conftest.py):
    - its own ``--temp-dir`` (short, under /tmp: Unix socket paths are limited to ~107 bytes), so the
      ``ray_current_cluster`` file it writes is not /tmp/ray's and a later ``ray.init()`` without an address still
      starts a cluster of its own instead of joining this head;
    - a free port for every listener Ray would otherwise put on a fixed default (6379, 8265, 10001, 52365, ...);
    - no RAY_ADDRESS, and the venv's bin first on PATH so that a job's ``python`` is this interpreter.

    Stopping it: ``ray stop`` kills every Ray process on the machine (the session's in-process cluster, and other
    users' heads on a shared machine), so it is not used. ``ray start`` runs in a new session
    (``start_new_session``); every process it starts (gcs_server, raylet, dashboard, agents, workers) keeps that
    session id (workers change their process group, not their session), and job drivers, which start sessions of
    their own, are descendants of a worker. Teardown signals exactly those, plus anything whose command line names
    the temp dir, SIGTERM then SIGKILL, and fails if one survives.
    """
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    temp_dir = tempfile.mkdtemp(prefix="rscli-", dir="/tmp")
    ports = free_ports(len(PORT_OPTIONS))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    command = [RAY, "start", "--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
               "--disable-usage-stats", f"--temp-dir={temp_dir}", "--object-store-memory=200000000",
               *(f"{option}={port}" for option, port in zip(PORT_OPTIONS, ports))]  # fmt: skip
    start = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{ports[1]}"
        HEAD_GCS[url] = f"127.0.0.1:{ports[0]}"  # what a driver (raysight serve/pools/unserve) connects to
        try:
            output, _ = start.communicate(timeout=120)
            problem = f"`ray start` exited with {start.returncode}: {output[-2000:]}" if start.returncode else ""
            problem = problem or _wait(url)
        except subprocess.TimeoutExpired:
            problem = "`ray start` did not return within 120 s"
        if problem:
            pytest.skip(f"cannot start a Ray head with its dashboard here: {problem}")
        yield url
    finally:
        start.kill()
        survivors = kill_head(start.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes of the test head survived SIGKILL: {survivors}"


def _wait(url: str, timeout: float = 90) -> str:
    """Nothing when the job server at ``url`` answers within ``timeout`` seconds, else why not."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cli.connect(url)
            return ""
        except cli.UsageError as e:
            if time.monotonic() > deadline:
                return f"the job server at {url} did not answer within {timeout:g} s ({e})"
            time.sleep(1)


@pytest.fixture(scope="module")
def finished_job(head: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny script submitted with arguments and followed to its end: exit code, printed id, output."""
    directory = tmp_path_factory.mktemp("job")
    write_script(directory, "compute.py", SCRIPT)
    code, out, err = run_cli("submit", "--address", head, "--working-dir", str(directory), "compute.py",
                             "--", "--flag", "two words")  # fmt: skip
    return {"code": code, "id": out.splitlines()[0] if out else "", "out": out, "err": err}


def status_of(head: str, job_id: str) -> str:
    code, out, err = run_cli("status", job_id, "--address", head)
    assert code == 0, err
    return out.split(":", 1)[1].split()[0]


# -- a job that succeeds ----------------------------------------------------------------------------------------
def test_submit_prints_the_job_id_follows_the_logs_and_exits_0(finished_job: dict[str, Any]) -> None:
    assert finished_job["code"] == 0, finished_job
    assert finished_job["id"].startswith("raysubmit_")
    assert "sum = 45" in finished_job["out"]
    assert "flag = two words" in finished_job["out"]  # the arguments travel shell-quoted
    assert "SUCCEEDED" in finished_job["err"]


def test_the_job_runs_with_the_python_of_the_environment_that_started_the_head(finished_job: dict[str, Any]) -> None:
    assert f"prefix = {sys.prefix}\n" in finished_job["out"]


def test_status_of_a_finished_job_is_succeeded(head: str, finished_job: dict[str, Any]) -> None:
    assert status_of(head, finished_job["id"]) == "SUCCEEDED"


def test_jobs_lists_the_job_with_its_status_and_entrypoint(head: str, finished_job: dict[str, Any]) -> None:
    code, out, err = run_cli("jobs", "--address", head)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATUS", "START", "ENTRYPOINT"]
    row = next(r for r in rows if r.startswith(finished_job["id"]))
    assert "SUCCEEDED" in row and "python compute.py --flag 'two words'" in row


def test_logs_prints_the_output_of_the_job(head: str, finished_job: dict[str, Any]) -> None:
    code, out, err = run_cli("logs", finished_job["id"], "--address", head)
    assert code == 0, err
    assert "sum = 45" in out and "flag = two words" in out


def test_logs_follow_of_a_finished_job_prints_it_and_returns(head: str, finished_job: dict[str, Any]) -> None:
    code, out, err = run_cli("logs", "--follow", finished_job["id"], "--address", head)
    assert code == 0, err
    assert "sum = 45" in out


def test_ray_address_names_the_head_when_there_is_no_option(head: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("RAY_ADDRESS", head)
    code, out, err = run_cli("jobs")
    assert code == 0, err
    assert "SUCCEEDED" in out


def test_the_option_wins_over_ray_address(head: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{free_ports(1)[0]}")  # Ray's client alone would take this
    code, _, err = run_cli("jobs", "--address", head)
    assert code == 0, err


def test_the_console_script_lists_jobs(head: str, finished_job: dict[str, Any]) -> None:
    script = os.path.join(BIN, "raysight")
    if not os.path.exists(script):
        pytest.skip("the raysight console script is not installed: pip install -e .")
    done = subprocess.run([script, "jobs", "--address", head], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert finished_job["id"] in done.stdout


# -- failing, stopped, unknown jobs -----------------------------------------------------------------------------
def test_a_failing_job_exits_1_and_its_logs_hold_the_traceback(head: str, tmp_path: pathlib.Path) -> None:
    write_script(tmp_path, "fail.py", "raise ValueError('the answer is not 42')\n")
    code, out, _ = run_cli("submit", "--address", head, "--working-dir", str(tmp_path), "fail.py")
    assert code == 1
    assert "Traceback" in out and "ValueError: the answer is not 42" in out
    assert status_of(head, out.splitlines()[0]) == "FAILED"


def test_stop_stops_a_running_job(head: str, tmp_path: pathlib.Path) -> None:
    write_script(tmp_path, "sleep.py", "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    code, out, err = run_cli("submit", "--no-wait", "--address", head, "--working-dir", str(tmp_path), "sleep.py")
    assert code == 0, err
    job_id = out.strip()
    deadline = time.monotonic() + 60
    while status_of(head, job_id) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    code, out, err = run_cli("stop", job_id, "--address", head)
    assert code == 0, err
    assert "STOPPED" in out
    assert status_of(head, job_id) == "STOPPED"


def test_an_unknown_job_id_is_a_clear_error(head: str) -> None:
    code, _, err = run_cli("status", "raysubmit_nosuchjob", "--address", head)
    assert code == 2
    assert "no job raysubmit_nosuchjob" in err and "raysight jobs" in err


@pytest.mark.slow
def test_submit_runs_jobs_extract_py_from_the_repository(head: str, tmp_path: pathlib.Path) -> None:
    import pyarrow.dataset

    output = tmp_path / "out"
    code, out, _ = run_cli("submit", "--address", head, "--working-dir", str(REPO), "jobs/extract.py",
                             "--", "--rows", "8", "--batch-size", "4", "--output", str(output), "--local")  # fmt: skip
    assert code == 0, out[-3000:]
    assert pyarrow.dataset.dataset(str(output), format="parquet").count_rows() == 8


def test_a_job_runs_on_the_shared_pool_raysight_serve_keeps(head: str, tmp_path: pathlib.Path) -> None:
    """The whole workflow through the Jobs API: `raysight serve` a checkpoint on the head, submit jobs/extract.py
    with --pool (the job attaches; it loads nothing), list the pool, unserve it."""
    gcs = HEAD_GCS[head]
    served = run_command("serve", "tiny", "--name", "jobpool", "--num-cpus", "0.5", "--ray-address", gcs,
                         timeout=300)  # fmt: skip
    assert served.returncode == 0, served.stdout + served.stderr[-3000:]
    try:
        output = tmp_path / "acts"
        job_args = ["--pool", "jobpool", "--rows", "5", "--layers", "1", "--output", str(output)]
        code, out, _ = run_cli("submit", "--address", head, "--working-dir", str(REPO), "jobs/extract.py", "--",
                               *job_args)  # fmt: skip
        assert code == 0, out[-3000:]
        listed = run_command("pools", "--ray-address", gcs)
        assert listed.returncode == 0 and listed.stdout.split("\n")[1].split()[:2] == ["jobpool", "1"], listed.stdout
    finally:
        stopped = run_command("unserve", "jobpool", "--ray-address", gcs)
    assert stopped.returncode == 0 and "pool jobpool shut down" in stopped.stdout, stopped.stderr[-3000:]
    assert run_command("pools", "--ray-address", gcs).stdout.strip() == "no shared pools"
    assert_extracted_blocks_match_hf(output, 5)


# -- errors before any job runs ---------------------------------------------------------------------------------
def test_a_missing_script_exits_2_naming_it(tmp_path: pathlib.Path) -> None:
    code, _, err = run_cli("submit", "--address", "http://127.0.0.1:1", "--working-dir", str(tmp_path), "nope.py")
    assert code == 2
    assert "nope.py" in err and str(tmp_path) in err and "--working-dir" in err


def test_a_script_outside_the_working_dir_exits_2(tmp_path: pathlib.Path) -> None:
    (tmp_path / "wd").mkdir()
    outside = write_script(tmp_path, "outside.py", "print(1)\n")
    code, _, err = run_cli("submit", "--working-dir", str(tmp_path / "wd"), str(outside))
    assert code == 2
    assert str(outside) in err and "outside the working dir" in err


def test_an_unreachable_address_exits_2_naming_it_without_a_traceback() -> None:
    address = f"http://127.0.0.1:{free_ports(1)[0]}"
    done = run_command("jobs", "--address", address)
    assert done.returncode == 2
    assert address in done.stderr and "ray start --head" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_env_must_be_key_value(tmp_path: pathlib.Path) -> None:
    write_script(tmp_path, "s.py", "print(1)\n")
    code, _, err = run_cli("submit", "--working-dir", str(tmp_path), "--env", "NOEQUALS", "s.py")
    assert code == 2 and "NOEQUALS" in err


def test_the_address_comes_from_the_option_then_ray_address_then_the_local_default(monkeypatch: Any) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert cli.resolve_address(None) == "http://10.0.0.5:8265"
    assert cli.resolve_address("https://head:443/") == "https://head:443"


@pytest.mark.parametrize("address", ["auto", "ray://head:10001"])
def test_a_ray_init_address_is_refused_with_the_fix(address: str) -> None:
    code, _, err = run_cli("jobs", "--address", address)
    assert code == 2
    assert repr(address) in err and "--address http://HEAD:8265" in err


# -- serve / pools / unserve (the scenarios on a real head: tests/distributed/test_shared_pools.py) --------------
def test_pool_commands_connect_to_the_option_then_a_gcs_ray_address_then_the_local_head(monkeypatch: Any) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.ray_address(None) == "auto"  # never None: that would start a cluster that dies with the command
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cli.ray_address(None) == "10.0.0.5:6379"
    assert cli.ray_address("head:6380") == "head:6380"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")  # set for the job commands: not a driver's address
    assert cli.ray_address(None) == "auto"


def test_a_dashboard_url_as_the_ray_address_exits_2_with_the_fix() -> None:
    code, _, err = run_cli("pools", "--ray-address", "http://127.0.0.1:8265")
    assert code == 2
    assert "dashboard URL" in err and "HOST:6379" in err


def test_serving_a_checkpoint_that_is_not_there_exits_2_naming_it(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    code, _, err = run_cli("serve", str(missing), "--name", "x")
    assert code == 2
    assert str(missing) in err and "save_pretrained" in err
    assert len(err.strip().splitlines()) == 1


def test_the_upload_leaves_out_venv_git_and_bytecode(tmp_path: pathlib.Path) -> None:
    args = cli.build_parser().parse_args(["submit", "--exclude", "data/", "--pip", "einops", "--env", "A=1=2", "s.py"])
    env = cli.runtime_env_for(args, tmp_path)
    assert env == {"working_dir": str(tmp_path), "excludes": [".venv", ".git", "**/__pycache__", "data/"],
                   "pip": ["einops"], "env_vars": {"A": "1=2"}}  # fmt: skip


# -- extract and the package door -------------------------------------------------------------------------------
def test_extract_hands_every_argument_to_jobs_extract_py() -> None:
    done = run_command("extract", "--help")
    assert done.returncode == 0, done.stderr
    assert "--rows" in done.stdout and "--batch-size" in done.stdout  # jobs/extract.py's own help


def test_extract_without_the_repository_says_where_it_looked(tmp_path: pathlib.Path) -> None:
    shutil.copytree(REPO / "raysight", tmp_path / "site" / "raysight", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # a copy of the package with no jobs/ beside it
    done = subprocess.run([sys.executable, "-m", "raysight", "extract"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert str(tmp_path / "site" / "jobs" / "extract.py") in done.stderr and "pip install -e ." in done.stderr


def test_importing_the_cli_does_not_import_ray() -> None:
    code = "import sys, raysight.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


def test_pyproject_declares_the_console_script() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["raysight"] == "raysight.cli:main"


# -- cluster/ ---------------------------------------------------------------------------------------------------
def test_the_cluster_launcher_yaml_follows_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler
    import yaml

    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    schema = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("raysight" in c for c in config["setup_commands"])


def test_the_kuberay_rayjob_runs_jobs_extract_py_with_a_gpu_worker_group() -> None:
    import yaml

    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    assert "jobs/extract.py" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"]


def test_local_sh_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(REPO / "cluster" / "local.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

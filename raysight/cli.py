"""The ``raysight`` command: submit, list, follow and stop Ray jobs through the Ray Jobs API, or extract here.

    raysight submit jobs/extract.py -- --model /models/gpt2 --data prompts.parquet   # prints the id, follows logs
    raysight submit --no-wait --pip einops --env HF_HOME=/cache jobs/extract.py    # options before SCRIPT
    raysight jobs                          # newest first
    raysight logs JOB_ID [--follow]
    raysight status JOB_ID
    raysight stop JOB_ID                   # waits until the job is STOPPED
    raysight extract --rows 8 --local      # jobs/extract.py's main() in this process
    raysight serve /models/gpt2 --name gpt2 --replicas 2 --num-gpus 1   # a shared pool, kept after this exits
    raysight pools                         # the shared pools of the cluster
    raysight unserve gpt2                  # stop one, for every driver

Every job command talks HTTP to the job server of a head's dashboard: ``--address``, else ``RAY_ADDRESS``, else
http://127.0.0.1:8265 (``HOST:PORT`` means http://HOST:PORT, the dashboard, not the GCS port). ``submit`` uploads
the working dir (default: the current directory, without .venv, .git and __pycache__) and runs ``python SCRIPT
ARGS`` from it on the cluster. ``serve``, ``pools`` and ``unserve`` connect to the cluster as a Ray driver instead:
``--ray-address`` (its GCS address, HOST:6379), else ``RAY_ADDRESS`` when it is not a dashboard URL, else the head
started on this machine; they never start a cluster of their own (a pool would die with it). Ray is imported inside
the commands, so importing this module stays light. Exit codes: 0 done (the job SUCCEEDED), 1 the job FAILED or was
STOPPED, 2 an error the user can fix (no cluster at the address, an unknown job, a script outside the working dir),
reported in one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import logging
import os
import pathlib
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never worth uploading: a virtualenv (hundreds of MB), git history, bytecode. Ray also skips what .gitignore lists.
DEFAULT_EXCLUDES = (".venv", ".git", "**/__pycache__")
START_HEAD = "start a head with `ray start --head --dashboard-host 127.0.0.1` or pass --address"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class UsageError(Exception):
    """Something the user can fix; ``main`` prints it as one line on stderr and exits with 2."""


# -- addresses and the client ----------------------------------------------------------------------------------
def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_ADDRESS``, else the local dashboard, as an http(s) URL (http:// when none is given;
    Ray's own client would take a bare HOST:PORT for a GCS address and look the dashboard up there)."""
    chosen = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).rstrip("/")
    url = chosen if "://" in chosen else f"http://{chosen}"
    if chosen in ("auto", "local") or not url.startswith(("http://", "https://")):  # ray.init's addresses
        raise UsageError(f"{chosen!r} is not the address of a job server (the Jobs API is the dashboard's HTTP "
                         "server): pass --address http://HEAD:8265")  # fmt: skip
    return url


def _local_token_headers(address: str) -> dict[str, str]:
    """The local Ray auth token for a head on this machine. `ray start` turns token auth on when ~/.ray/auth_token
    exists, but the job client sends the token only when RAY_AUTH_MODE=token; like `ray.init` for a cluster it finds
    locally, send it to a loopback address, and to another host only when RAY_AUTH_MODE says so."""
    import urllib.parse

    if os.environ.get("RAY_AUTH_MODE") or urllib.parse.urlsplit(address).hostname not in LOOPBACK:
        return {}
    loader = _token_loader()
    return dict(loader.get_token_for_http_header()) if loader is not None else {}


def _token_loader() -> Any:
    """Ray's loader of the local auth token when there is one (recent Ray; older releases have no token auth)."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        return loader if loader.has_token(ignore_auth_mode=True) else None
    except (ImportError, AttributeError, TypeError):
        return None


@contextlib.contextmanager
def _api_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn what the Jobs API raises into one-line messages that name the address (or the job) and the fix."""
    import ray.exceptions

    AuthenticationError = getattr(ray.exceptions, "AuthenticationError", _NeverRaised)  # (older Ray has no tokens)
    try:
        yield
    except AuthenticationError:
        raise UsageError(f"the Ray cluster at {address} requires a token: export RAY_AUTH_MODE=token and "
                         "RAY_AUTH_TOKEN (or put the token in ~/.ray/auth_token)") from None  # fmt: skip
    except OSError as e:  # requests' and aiohttp's connection errors are OSErrors
        logger.debug("connection to %s failed: %r", address, e)
        raise UsageError(f"cannot reach the Ray job server at {address} (a head's dashboard, port 8265 by default): "
                         f"{START_HEAD}") from None  # fmt: skip
    except (RuntimeError, ValueError) as e:
        if job_id is not None and "status code 404" in str(e):
            raise UsageError(f"no job {job_id} at {address} (`raysight jobs` lists them)") from None
        raise UsageError(f"the Ray job server at {address} refused the request: {_one_line(e)}") from None


class _NeverRaised(Exception):
    pass


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


@contextlib.contextmanager
def _hidden_env(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for the resolved address (its constructor checks the server answers)."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    named = f"{url} (from RAY_ADDRESS)" if address is None and os.environ.get("RAY_ADDRESS") else url
    # The client replaces the address it is given by RAY_API_SERVER_ADDRESS or RAY_ADDRESS: hide them, so that
    # --address wins (RAY_ADDRESS is already in `url` when there is no --address).
    with _api_errors(named), _hidden_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        try:
            return JobSubmissionClient(url, headers=_local_token_headers(url))
        except (RuntimeError, ValueError) as e:  # a server that is not Ray's job server
            raise UsageError(f"{named} is not the address of a Ray job server ({_one_line(e)}): pass --address "
                             "http://HEAD:8265, the head's dashboard") from None  # fmt: skip


# -- submit -----------------------------------------------------------------------------------------------------
def script_in(working_dir: pathlib.Path, script: str) -> str:
    """SCRIPT as a path relative to the working dir (where the job starts); it must exist inside it."""
    given = pathlib.Path(script)
    candidates = [given] if given.is_absolute() else [working_dir / given, pathlib.Path.cwd() / given]
    for path in (c.resolve() for c in candidates):
        if path.is_file():
            if not path.is_relative_to(working_dir):
                raise UsageError(f"{path} is outside the working dir {working_dir} that the job uploads: "
                                 "pass --working-dir with a directory that holds it")  # fmt: skip
            return path.relative_to(working_dir).as_posix()
    raise UsageError(f"script {script} not found in the working dir {working_dir}: pass a path inside it "
                     "(relative to it or to the current directory) or set --working-dir")  # fmt: skip


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; a pair without ``=`` is a usage error."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def runtime_env_for(args: argparse.Namespace, working_dir: pathlib.Path) -> dict[str, Any]:
    """The job's runtime_env: the working dir to upload (minus the excludes), pip packages, environment variables."""
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": [*DEFAULT_EXCLUDES, *args.exclude]}
    if args.pip:
        env["pip"] = list(args.pip)
    if args.env:
        env["env_vars"] = parse_env(args.env)
    return env


def cmd_submit(args: argparse.Namespace) -> int:
    working_dir = pathlib.Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise UsageError(f"--working-dir {working_dir} is not a directory")
    script = script_in(working_dir, args.script)
    script_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    entrypoint = shlex.join(["python", script, *script_args])
    runtime_env = runtime_env_for(args, working_dir)
    client = connect(args.address)
    with _api_errors(client.get_address()):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.job_id)
    logger.info("submitted %s: %s", job_id, entrypoint)
    print(job_id, flush=True)
    if args.no_wait:
        return 0
    status = follow(client, job_id)
    print(f"job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


# -- following a job --------------------------------------------------------------------------------------------
def follow(client: Any, job_id: str) -> str:
    """Print the job's logs as they come until it ends; return its final status. The log stream is a websocket;
    when it breaks, or closes while the job still runs, poll the logs instead (printing only what is new)."""
    import asyncio

    import aiohttp

    printed = 0

    async def stream() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)
            printed += len(chunk)

    with _api_errors(client.get_address(), job_id):
        if client.get_job_status(job_id).is_terminal():  # (an unknown id fails here, not in the websocket)
            return _poll_logs(client, job_id, printed)  # all there is, at once
        try:
            asyncio.run(stream())
        except (RuntimeError, OSError, aiohttp.ClientError) as e:
            logger.warning("the log stream of %s broke (%s); polling instead", job_id, e)
            return _poll_logs(client, job_id, printed)
        status = wait_until_done(client, job_id, timeout=10.0)  # the stream ends as the job does
        return status if status in TERMINAL else _poll_logs(client, job_id, printed)


def _poll_logs(client: Any, job_id: str, printed: int) -> str:
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status.is_terminal():
            return str(status.value)
        time.sleep(1.0)


def wait_until_done(client: Any, job_id: str, timeout: float) -> str:
    """The job's status once it is terminal, or its current status after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return str(status.value)


# -- jobs, logs, status, stop -----------------------------------------------------------------------------------
def _when(ms: int | None) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def jobs_table(jobs: Sequence[Any]) -> str:
    """One line per job, newest first: id (submission id, else Ray's job id), status, start time, entrypoint."""
    rows = [("ID", "STATUS", "START", "ENTRYPOINT")]
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        entry = job.entrypoint if len(job.entrypoint or "") <= 80 else job.entrypoint[:77] + "..."
        job_id = job.submission_id or job.job_id or "-"
        rows.append((job_id, str(job.status.value), _when(job.start_time), entry or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[3]]).rstrip() for row in rows)


def cmd_jobs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with _api_errors(client.get_address()):
        jobs = client.list_jobs()
    print(jobs_table(jobs) if jobs else "no jobs")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with _api_errors(client.get_address(), args.job_id):
        if args.follow:
            follow(client, args.job_id)
        else:
            print(client.get_job_logs(args.job_id), end="", flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with _api_errors(client.get_address(), args.job_id):
        info = client.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with _api_errors(client.get_address(), args.job_id):
        was_running = client.stop_job(args.job_id)
        status = wait_until_done(client, args.job_id, timeout=args.timeout)
    if status == "STOPPED":
        print(f"job {args.job_id} STOPPED")
        return 0
    if not was_running and status in ("SUCCEEDED", "FAILED"):
        print(f"job {args.job_id} had already ended: {status}")
        return 0
    print(f"job {args.job_id} is still {status} after {args.timeout:g} s; run `raysight stop {args.job_id}` again "
          "or look at `raysight logs`", file=sys.stderr)  # fmt: skip
    return 1


# -- shared pools -----------------------------------------------------------------------------------------------
def ray_address(address: str | None) -> str:
    """The GCS address a ``serve``/``pools``/``unserve`` driver connects to (see the module doc); never None, so
    ``ray.init`` never starts a local cluster that would take the pool with it when the command exits."""
    if address is not None:
        if address.startswith(("http://", "https://")):
            raise UsageError(f"--ray-address {address} is a dashboard URL; pass the head's GCS address (HOST:6379)")
        return address
    env = os.environ.get("RAY_ADDRESS")
    return env if env and not env.startswith(("http://", "https://")) else "auto"


def _driver(address: str | None) -> None:
    import raysight

    chosen = ray_address(address)
    host = chosen.rpartition(":")[0] if ":" in chosen else chosen
    if chosen == "auto" or host in LOOPBACK:  # a head on this machine: send it the local token, as for jobs
        _use_local_token()
    try:
        raysight.init(chosen, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise UsageError(f"no Ray cluster at {chosen} ({_one_line(e)}): start a head with `ray start --head` or pass "
                         "--ray-address HOST:6379") from None  # fmt: skip


def _use_local_token() -> None:
    """Turn token auth on for this process when RAY_AUTH_MODE is unset and ~/.ray/auth_token exists: what
    ``ray.init`` does itself for a cluster it finds, but not for an address it is given."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available as enable,
        )
    except ImportError:  # older Ray: no token auth
        return
    enable(warn_if_disabled=False)


def cmd_serve(args: argparse.Namespace) -> int:
    import raysight

    source = args.model
    if source == "tiny":
        from raysight.models.tiny import tiny_lm_path

        source = str(tiny_lm_path())
    elif not pathlib.Path(source).is_dir():
        raise UsageError(f"{source} is not a checkpoint directory (model hubs may be out of reach: pass a local "
                         "directory saved with save_pretrained, or 'tiny')")  # fmt: skip
    _driver(args.ray_address)
    model = raysight.LanguageModel(source, torch_dtype=args.dtype)  # on the meta device here: the replicas load it
    try:
        pool = raysight.serve(model, replicas=args.replicas, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                              device_map=args.device_map, name=args.name, trusted=not args.restricted,
                              detached=True)  # fmt: skip
    except (ValueError, TimeoutError, raysight.RemoteExecutionError) as e:  # taken, too big, or does not load
        raise UsageError(_one_line(e)) from None
    print(pools_table([pool]))
    return 0


def pools_table(pools: Sequence[Any]) -> str:
    """One line per pool: name, replicas, GPUs and CPUs per replica, trust mode, the models it serves."""
    rows = [("NAME", "REPLICAS", "GPUS", "CPUS", "MODE", "MODELS")]
    for pool in pools:
        c = pool.config
        models = ", ".join(pool.labels.values()) or "-"
        rows.append((pool.name, str(len(pool.actors)), f"{c.num_gpus:g}", f"{c.num_cpus:g}",
                     "trusted" if c.trusted else "restricted", models))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip() for row in rows)


def cmd_pools(args: argparse.Namespace) -> int:
    import raysight

    _driver(args.ray_address)
    shared = [pool for pool in raysight.pools() if pool.shared]
    print(pools_table(shared) if shared else "no shared pools")
    return 0


def cmd_unserve(args: argparse.Namespace) -> int:
    import raysight

    _driver(args.ray_address)
    found = {pool.name: pool for pool in raysight.pools() if pool.shared}
    if args.name not in found:
        raise UsageError(f"no shared pool named {args.name!r} on the cluster (running: "
                         f"{', '.join(sorted(found)) or 'none'}; `raysight pools` lists them)")  # fmt: skip
    found[args.name].shutdown()
    print(f"pool {args.name} shut down")
    return 0


# -- extract ----------------------------------------------------------------------------------------------------
def extract_script() -> pathlib.Path:
    """jobs/extract.py of the repository this package lives in (jobs/ is not part of the installed package)."""
    import raysight

    return pathlib.Path(raysight.__file__).resolve().parents[1] / "jobs" / "extract.py"


def cmd_extract(args: argparse.Namespace) -> int:
    path = extract_script()
    if not path.is_file():
        raise UsageError(f"{path} not found: `raysight extract` runs jobs/extract.py of a raysight checkout; "
                         "install raysight from its repository (pip install -e .) or run the script")  # fmt: skip
    spec = importlib.util.spec_from_file_location("raysight_jobs_extract", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(list(args.args)) or 0)


# -- the parser -------------------------------------------------------------------------------------------------
def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help=f"the job server (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})")


def _add_submit(commands: Any) -> None:
    submit = commands.add_parser("submit", help="submit `python SCRIPT ARGS` as a Ray job and follow its logs",
                                 description="Options go before SCRIPT; what follows it is the script's.")  # fmt: skip
    _address_option(submit)
    submit.add_argument("--working-dir", default=".", help="the directory uploaded for the job (default: .)")
    submit.add_argument("--job-id", help="the submission id (default: one Ray makes up)")
    repeatable = {"action": "append", "default": []}
    submit.add_argument("--pip", metavar="PKG", help="a pip package to install for the job (repeatable)", **repeatable)
    submit.add_argument("--env", metavar="KEY=VALUE", help="an environment variable of the job (repeatable)",
                        **repeatable)  # fmt: skip
    always = " ".join(DEFAULT_EXCLUDES)
    submit.add_argument("--exclude", metavar="PATTERN", help=f"a gitignore-style pattern not to upload (repeatable); "
                        f"always excluded: {always}", **repeatable)  # fmt: skip
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without following")
    submit.add_argument("script", metavar="SCRIPT", help="a Python file inside the working dir")
    submit.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's arguments")
    submit.set_defaults(run=cmd_submit)


def _add_job_commands(commands: Any) -> None:
    jobs = commands.add_parser("jobs", help="list the cluster's jobs, newest first")
    _address_option(jobs)
    jobs.set_defaults(run=cmd_jobs)
    logs = commands.add_parser("logs", help="print a job's logs")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    status = commands.add_parser("status", help="print a job's status")
    stop = commands.add_parser("stop", help="stop a job and wait until it is STOPPED")
    stop.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for STOPPED (default 30)")
    for sub, run in ((logs, cmd_logs), (status, cmd_status), (stop, cmd_stop)):
        sub.add_argument("job_id", metavar="JOB_ID")
        _address_option(sub)
        sub.set_defaults(run=run)


def _add_pool_commands(commands: Any) -> None:
    about = ("Start (or find) the shared pool NAME holding MODEL on the cluster; any driver then uses it with "
             "raysight.serve(model, name=NAME, detached=True).")
    serve = commands.add_parser("serve", help="start a shared pool serving a checkpoint (it outlives this command)",
                                description=about)
    serve.add_argument("model", metavar="MODEL", help="a Hugging Face checkpoint directory, or 'tiny'")
    serve.add_argument("--name", help="the pool's name (default: raysight-<checkpoint directory name>)")
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (the model is sharded over them)")
    serve.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica (default 1; a fraction is fine)")
    serve.add_argument("--device-map", default="auto", help="how a replica shards the model (default: auto)")
    serve.add_argument("--dtype", default=None, help="the dtype to load the weights in (e.g. bfloat16)")
    serve.add_argument("--restricted", action="store_true", help="accept only allow-listed callables (a service "
                       "running others' graphs; see docs/wire-format.md)")  # fmt: skip
    serve.set_defaults(run=cmd_serve)
    pools = commands.add_parser("pools", help="list the shared pools of the cluster")
    pools.set_defaults(run=cmd_pools)
    unserve = commands.add_parser("unserve", help="shut a shared pool down (for every driver)")
    unserve.add_argument("name", metavar="NAME")
    unserve.set_defaults(run=cmd_unserve)
    for sub in (serve, pools, unserve):
        sub.add_argument("--ray-address", help="the cluster's GCS address (default: RAY_ADDRESS unless it is a "
                         "dashboard URL, else the head on this machine)")  # fmt: skip


def _add_extract(commands: Any) -> None:
    # prefix_chars that never occur: every argument, --options (and --help) included, goes to jobs/extract.py
    extract = commands.add_parser("extract", add_help=False, prefix_chars="\0",
                                  help="run jobs/extract.py in this process (`raysight extract --help`)")  # fmt: skip
    extract.add_argument("args", nargs="*")
    extract.set_defaults(run=cmd_extract)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysight", description="Submit, list, follow and stop Ray jobs through the "
                                     "Ray Jobs API, keep shared model pools on the cluster, or run jobs/extract.py "
                                     "here.")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_submit(commands)
    _add_job_commands(commands)
    _add_pool_commands(commands)
    _add_extract(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``raysight`` command with ``argv`` (default: ``sys.argv[1:]``); return its exit code."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except UsageError as e:
        print(f"raysight {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a submitted job keeps running: `raysight stop JOB_ID` stops it)", file=sys.stderr)
        return 130

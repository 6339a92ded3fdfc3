"""A local production-like stack: Prefect server, process worker(s), SeaweedFS S3, deployments.

    make stack-up     (python -m scripts.stack up [--dir .stack] [--prefect-port 4200] ...)
    make stack-down   (python -m scripts.stack down [--dir .stack])
    eval "$(python -m scripts.stack env)"   # point this shell's prefect/aws clients at the stack

`up` runs, each long-lived process in its own process group with its log under <dir>/logs/:
  1. `prefect server start` (SQLite under <dir>/prefect-home, 127.0.0.1, analytics off) and
     `weed server -s3` (data under <dir>/seaweedfs, 127.0.0.1, telemetry off), side by side;
  2. waits for both to answer, creates the bucket, loads the generated benchmark into it
     (`python -m tasks.data.synthetic`) unless dataset/ already holds objects;
  3. creates (or updates) the zombie automation (deployments/zombie_automation.py): a flow run
     whose heartbeats stop for `zombie_after_s` (its worker or machine died) is marked Crashed;
     every stack process beats every `heartbeat_s` (PREFECT_FLOWS_HEARTBEAT_FREQUENCY);
  4. `prefect work-pool create <pool> --type process --overwrite`;
  5. `prefect worker start --pool <pool>` (one or more), waits until they are online;
  6. `prefect --no-prompt deploy --all` from the repository root.
Every pid is written to <dir>/stack.json as soon as it exists; `down` stops exactly those process
groups (SIGTERM, then SIGKILL after a grace period), after checking that each pid is still the
process `up` started. A failed `up` stops whatever it had started.

Nothing listens on another address than 127.0.0.1. The S3 store accepts only the stack's own test
keys (STACK_ACCESS_KEY/STACK_SECRET_KEY below); workers get them, and AWS_ENDPOINT_URL, in their
environment, exactly as an EC2 worker gets its instance role.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("scripts.stack")

PROJECT_DIR = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # every service binds here and nowhere else
STACK_ACCESS_KEY = "stack-access-key"  # test credentials of the local S3 store, never real ones
STACK_SECRET_KEY = "stack-secret-key"
STATE_FILE = "stack.json"
STACK_MARK = "DEEPFAKE_STACK_ROOT"  # in the environment of every process the stack starts
PROJECT_LOGGERS = "tasks,models,config,flows"
# Inherited variables that would point a stack process at another server, store or account.
_DROPPED_ENV_PREFIXES = ("PREFECT_", "AWS_")
_KEPT_ENV_PREFIXES = ("PREFECT_LOGGING_",)


# Processes `up` started from this Python process, so `down` in the same process can reap them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message names the step and its log."""


@dataclass(frozen=True)
class WeedPorts:
    """SeaweedFS listens on four HTTP ports and four gRPC ports (by default HTTP + 10000)."""

    s3: int = 8333
    master: int = 9333
    volume: int = 8080
    filer: int = 8888
    s3_grpc: int = 18333
    master_grpc: int = 19333
    volume_grpc: int = 18080
    filer_grpc: int = 18888

    @classmethod
    def around(cls, s3: int, master: int, volume: int, filer: int) -> WeedPorts:
        """The given HTTP ports, gRPC ports 10000 above them (SeaweedFS's own rule)."""
        return cls(
            s3, master, volume, filer, s3 + 10000, master + 10000, volume + 10000, filer + 10000
        )

    @classmethod
    def free(cls) -> WeedPorts:
        """Eight ports that are free right now (for tests running beside other stacks)."""
        ports = free_ports(8)
        return cls(*ports)


@dataclass(frozen=True)
class StackSettings:
    """What `up` starts and where; the defaults are those of `make stack-up`."""

    root: Path = Path(".stack")  # PREFECT_HOME, SeaweedFS data, logs and the state file
    prefect_port: int = 4200  # API and UI: http://127.0.0.1:<port>
    weed: WeedPorts = WeedPorts()
    pool: str | None = None  # None: PREFECT_DEFAULT_WORK_POOL_NAME, else prefect.toml's default
    workers: int = 1  # process workers on the pool (two show fan-out across workers)
    worker_limit: int | None = None  # flow runs one worker runs at once; None = no limit
    worker_poll_s: int | None = None  # PREFECT_WORKER_QUERY_SECONDS; None = Prefect's default
    bucket: str | None = None  # None: the bucket of dataset_config's storage.uri
    dataset_config: str = "config/config.yaml"  # config the benchmark generator writes with
    dataset_overrides: tuple[str, ...] = ()  # extra --set for the generator
    dataset_pairs: int | None = None  # pairs generated; None = generator.n_pairs; 0 = none
    deployments: tuple[str, ...] | None = None  # names for `prefect deploy -n`; None = --all
    scheduler: bool = True  # Prefect's scheduler service (off in tests: no 02:00 surprise)
    heartbeat_s: int = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of every process (Prefect: >= 30)
    zombie_after_s: float = 90  # no heartbeat for this long: the run is marked Crashed
    server_env: tuple[tuple[str, str], ...] = ()  # more settings for `prefect server start`
    startup_timeout_s: float = 180.0  # per service: server, store, workers
    project_dir: Path = PROJECT_DIR


@dataclass
class Proc:
    """One long-lived process the stack started (the leader of its own process group)."""

    name: str
    pid: int
    create_time: float  # psutil's, to tell our process from a later one with a reused pid
    argv: list[str]
    log: str


@dataclass
class StackState:
    """What `up` started, written to <root>/stack.json; enough for `down` and for clients."""

    root: str
    api_url: str
    ui_url: str
    s3_endpoint: str
    bucket: str
    pool: str
    access_key: str
    secret_key: str
    weed_ports: dict[str, int]
    workers: list[str] = field(default_factory=list)
    processes: list[Proc] = field(default_factory=list)
    dataset: str = "not loaded"  # what happened to dataset/: loaded N pairs / already there / ...
    deployments: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase of `up`
    heartbeat_s: int | None = None  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the stack's processes
    zombie_automation: str = "not created"  # what `up` did to it, and its window

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for prefect/aws clients and workers of this stack (base: os.environ)."""
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith(_DROPPED_ENV_PREFIXES) or k.startswith(_KEPT_ENV_PREFIXES)
        }
        env.update(
            PREFECT_HOME=str(Path(self.root) / "prefect-home"),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_DEFAULT_WORK_POOL_NAME=self.pool,
            PREFECT_LOGGING_EXTRA_LOGGERS=PROJECT_LOGGERS,
            AWS_ENDPOINT_URL=self.s3_endpoint,
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
        )
        if self.heartbeat_s is not None:  # workers pass it on to the flow runs they start
            env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(self.heartbeat_s)
        return env

    def save(self) -> None:
        path = Path(self.root) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, root: Path) -> StackState:
        path = Path(root) / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise StackError(
                f"{path}: no stack state (was `stack up` run with this --dir?)"
            ) from exc
        except json.JSONDecodeError as exc:
            raise StackError(f"{path}: unreadable stack state ({exc})") from exc
        raw["processes"] = [Proc(**p) for p in raw.get("processes", [])]
        return cls(**raw)


# --- up -----------------------------------------------------------------------------------------


def up(settings: StackSettings) -> StackState:
    """Start the whole stack; on any failure stop what was started and raise `StackError`."""
    root = settings.root.resolve()
    if (root / STATE_FILE).exists() and _alive(StackState.load(root)):
        raise StackError(
            f"{root}: a stack started from this folder is still running; "
            "run `make stack-down` (or `python -m scripts.stack down`) first"
        )
    for sub in ("logs", "prefect-home", "seaweedfs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    state = StackState(
        root=str(root),
        api_url=f"http://{HOST}:{settings.prefect_port}/api",
        ui_url=f"http://{HOST}:{settings.prefect_port}",
        s3_endpoint=f"http://{HOST}:{settings.weed.s3}",
        bucket=settings.bucket or bucket_of(settings.project_dir / settings.dataset_config),
        pool=settings.pool or default_pool(settings.project_dir),
        access_key=STACK_ACCESS_KEY,
        secret_key=STACK_SECRET_KEY,
        weed_ports=asdict(settings.weed),
        heartbeat_s=settings.heartbeat_s,
    )
    state.save()
    try:
        _start_services(settings, state)
        return state
    except BaseException:
        log.error("stack start failed; stopping what was started (logs in %s/logs)", root)
        try:
            down(root)
        except StackError as exc:
            log.error("%s", exc)
        raise


def _start_services(settings: StackSettings, state: StackState) -> None:
    root = Path(state.root)
    env = state.client_env()
    server_env = dict(
        env,
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED=str(settings.scheduler).lower(),
        **dict(settings.server_env),
    )
    started = time.monotonic()
    _spawn(
        state,
        "prefect-server",
        ["prefect", "server", "start", "--host", HOST, "--port", str(settings.prefect_port)],
        server_env,
    )
    _spawn(state, "seaweedfs", weed_argv(root, settings.weed), env)
    _timed(state, "store", lambda: create_bucket(state, settings.startup_timeout_s), started)
    _timed(state, "server", lambda: wait_for_api(state, settings.startup_timeout_s), started)

    mark = time.monotonic()
    state.dataset = load_dataset(settings, state, env)
    state.timings["dataset"] = round(time.monotonic() - mark, 1)

    mark = time.monotonic()
    state.zombie_automation = ensure_zombie_automation(state, settings.zombie_after_s)
    state.timings["automation"] = round(time.monotonic() - mark, 1)

    mark = time.monotonic()
    run_cli(
        ["prefect", "work-pool", "create", state.pool, "--type", "process", "--overwrite"],
        env,
        root / "logs" / "work-pool.log",
        cwd=settings.project_dir,
    )
    for i in range(1, settings.workers + 1):
        start_worker(state, settings, f"stack-worker-{i}")
    state.save()
    wait_for_workers(state, settings.startup_timeout_s)
    state.timings["workers"] = round(time.monotonic() - mark, 1)

    mark = time.monotonic()
    names = settings.deployments
    selection = ["--all"] if names is None else [a for n in names for a in ("-n", n)]
    run_cli(
        ["prefect", "--no-prompt", "deploy", *selection],
        dict(env, DEEPFAKE_PROJECT_DIR=str(settings.project_dir)),
        root / "logs" / "deploy.log",
        cwd=settings.project_dir,
    )
    state.deployments = list_deployments(state)
    state.timings["deploy"] = round(time.monotonic() - mark, 1)
    state.timings["total"] = round(time.monotonic() - started, 1)
    state.save()


def start_worker(state: StackState, settings: StackSettings, name: str) -> Proc:
    """`prefect worker start --pool <pool>` named `name`; also restarts a worker that died."""
    env = state.client_env()  # the venv's prefect; the project is installed there
    if settings.worker_poll_s is not None:
        env["PREFECT_WORKER_QUERY_SECONDS"] = str(settings.worker_poll_s)
    argv = ["prefect", "worker", "start", "--pool", state.pool, "--type", "process"]
    argv += ["--name", name, "--install-policy", "never"]
    if settings.worker_limit is not None:
        argv += ["--limit", str(settings.worker_limit)]
    if any(p.name == name and _group_members(p) for p in state.processes):
        raise StackError(f"{name} is still running")
    state.processes = [p for p in state.processes if p.name != name]
    if name not in state.workers:
        state.workers.append(name)
    return _spawn(state, name, argv, env, cwd=settings.project_dir)


def kill(state: StackState, name: str) -> None:
    """SIGKILL `name` and every process it started, at once, as a crash of the machine (or
    systemd's control-group kill) would; for the e2e resume test."""
    [proc] = [p for p in state.processes if p.name == name]
    _, alive = _terminate(_tree(proc), signal.SIGKILL, 10)
    if (child := _CHILDREN.pop(proc.pid, None)) is not None:
        child.poll()
    if alive:
        raise StackError(f"{name} (pid {proc.pid}) survived SIGKILL: {[a.pid for a in alive]}")


def _timed(state: StackState, name: str, step: Any, since: float) -> None:
    step()
    state.timings[name] = round(time.monotonic() - since, 1)


def weed_argv(root: Path, ports: WeedPorts) -> list[str]:
    """`weed server` with the S3 gateway, bound to 127.0.0.1, telemetry off, data under root."""
    s3_config = root / "seaweedfs-s3.json"
    s3_config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "stack",
                        "credentials": [
                            {"accessKey": STACK_ACCESS_KEY, "secretKey": STACK_SECRET_KEY}
                        ],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    return [
        "weed",
        "-logtostderr",  # glog would otherwise leave weed.* log files in /tmp
        "server",
        "-s3",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        f"-dir={root / 'seaweedfs'}",
        f"-s3.config={s3_config}",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3_grpc}",
        f"-master.port={ports.master}",
        f"-master.port.grpc={ports.master_grpc}",
        f"-volume.port={ports.volume}",
        f"-volume.port.grpc={ports.volume_grpc}",
        f"-filer.port={ports.filer}",
        f"-filer.port.grpc={ports.filer_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",  # no Iceberg/Lance catalogs: fewer open ports
        f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
        "-master.volumeSizeLimitMB=256",
        "-volume.max=0",  # small volumes, as many as disk allows
        "-volume.preStopSeconds=0",
    ]


def _weed_tmp_sockets(ports: Mapping[str, int]) -> list[Path]:
    """gRPC sockets SeaweedFS always creates in /tmp (no flag moves them); removed by `down`."""
    return [
        Path(f"/tmp/seaweedfs-{kind}-grpc-{ports[f'{kind}_grpc']}.sock")
        for kind in ("master", "volume", "filer", "s3")
    ]


def _spawn(
    state: StackState, name: str, argv: list[str], env: Mapping[str, str], cwd: Path | None = None
) -> Proc:
    log_path = Path(state.root) / "logs" / f"{name}.log"
    exe = shutil.which(argv[0], path=_bin_path(env))
    if exe is None:
        raise StackError(f"{argv[0]}: not found next to {sys.executable} nor on PATH")
    with log_path.open("ab") as out:
        popen = subprocess.Popen(
            [exe, *argv[1:]],
            env={**env, STACK_MARK: state.root},  # inherited by flow runs: `down` finds them
            cwd=cwd or Path(state.root),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _CHILDREN[popen.pid] = popen
    proc = Proc(
        name=name,
        pid=popen.pid,
        create_time=psutil.Process(popen.pid).create_time(),
        argv=argv,
        log=str(log_path),
    )
    state.processes.append(proc)
    state.save()
    log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
    return proc


def _bin_path(env: Mapping[str, str]) -> str:
    """The virtual environment's bin/ first, so `prefect` and `weed` are the pinned ones."""
    return os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])


def run_cli(
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
    timeout_s: float = 600.0,
) -> str:
    """Run a short command to completion in its own process group; its output goes to log_path
    and is returned. A non-zero exit or a timeout raises `StackError` with the output's tail."""
    exe = shutil.which(argv[0], path=_bin_path(env))
    if exe is None:
        raise StackError(f"{argv[0]}: not found next to {sys.executable} nor on PATH")
    popen = subprocess.Popen(
        [exe, *argv[1:]],
        env=dict(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )
    try:
        output, _ = popen.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _killpg(popen.pid, signal.SIGKILL)
        output, _ = popen.communicate()
        log_path.write_text(output)
        raise StackError(
            f"`{' '.join(argv)}` timed out after {timeout_s:.0f} s "
            f"(output in {log_path}):\n{_tail(output)}"
        ) from None
    with log_path.open("a") as fh:
        fh.write(f"$ {' '.join(argv)}\n{output}\n")
    if popen.returncode != 0:
        raise StackError(
            f"`{' '.join(argv)}` failed with exit code {popen.returncode} "
            f"(output in {log_path}):\n{_tail(output)}"
        )
    return output


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _deadline_loop(
    what: str, timeout_s: float, state: StackState, interval_s: float = 0.5
) -> Iterator[None]:
    """Yield until the caller breaks; raise `StackError` at the deadline or when a process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [p for p in state.processes if not _is_ours(p)]
        if dead:
            raise StackError(
                f"{what}: {dead[0].name} exited during start-up "
                f"(log {dead[0].log}):\n{_tail(_read(dead[0].log))}"
            )
        yield
        time.sleep(interval_s)
    raise StackError(f"{what}: not ready after {timeout_s:.0f} s (logs in {state.root}/logs)")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def wait_for_api(state: StackState, timeout_s: float) -> None:
    """Until GET /api/health answers 200."""
    for _ in _deadline_loop(f"Prefect server at {state.api_url}", timeout_s, state):
        try:
            with urllib.request.urlopen(f"{state.api_url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass


def s3_client(state: StackState) -> Any:
    """A boto3 client for the stack's store (tooling only: the pipeline goes through storage.py)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=state.s3_endpoint,
        aws_access_key_id=state.access_key,
        aws_secret_access_key=state.secret_key,
        region_name="us-east-1",
        config=Config(
            retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30
        ),
    )


def create_bucket(state: StackState, timeout_s: float) -> None:
    """Create the bucket as soon as the S3 gateway accepts it (idempotent)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(state)
    last: Exception | None = None
    try:
        for _ in _deadline_loop(f"SeaweedFS S3 at {state.s3_endpoint}", timeout_s, state):
            try:
                client.create_bucket(Bucket=state.bucket)
                return
            except ClientError as exc:
                if exc.response["Error"]["Code"] in {
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                }:
                    return
                last = exc
            except BotoCoreError as exc:
                last = exc
    except StackError as exc:
        raise StackError(
            f"s3://{state.bucket}: cannot create the bucket: {exc} (last answer: {last})"
        ) from None


def load_dataset(settings: StackSettings, state: StackState, env: Mapping[str, str]) -> str:
    """Write the generated benchmark into dataset/ unless it already holds objects."""
    from config.load import load_config

    if settings.dataset_pairs == 0:
        return "not loaded (dataset_pairs=0)"
    overrides = [
        f"storage.uri={_with_bucket(_uri_of(settings), state.bucket)}",
        *settings.dataset_overrides,
    ]
    cfg = load_config(settings.project_dir / settings.dataset_config, overrides)
    root_prefix = cfg.storage.uri[len("s3://") :].partition("/")[2].strip("/")
    prefix = (f"{root_prefix}/" if root_prefix else "") + cfg.storage.dataset_prefix
    listed = s3_client(state).list_objects_v2(Bucket=state.bucket, Prefix=prefix, MaxKeys=1)
    if listed.get("KeyCount", 0):
        return f"already there (s3://{state.bucket}/{prefix})"
    if not (settings.project_dir / "tasks" / "data" / "synthetic.py").exists():
        log.warning(
            "tasks/data/synthetic.py is missing: s3://%s/%s stays empty", state.bucket, prefix
        )
        return "not loaded (tasks/data/synthetic.py missing)"
    argv = ["python", "-m", "tasks.data.synthetic", "--config", settings.dataset_config]
    for item in overrides:
        argv += ["--set", item]
    if settings.dataset_pairs is not None:
        argv += ["--n", str(settings.dataset_pairs)]
    run_cli(
        argv,
        env,  # the venv's python, which has the project installed
        Path(state.root) / "logs" / "dataset.log",
        cwd=settings.project_dir,
    )
    count = s3_client(state).list_objects_v2(Bucket=state.bucket, Prefix=prefix).get("KeyCount", 0)
    return (
        f"loaded ({count}{'+' if count >= 1000 else ''} objects under s3://{state.bucket}/{prefix})"
    )


def prefect_client(state: StackState) -> Any:
    """A synchronous Prefect client for this stack's API, whatever the process's settings."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(state.api_url)


def ensure_zombie_automation(state: StackState, within_s: float) -> str:
    """Create or update the automation that marks a flow run Crashed once its heartbeats stop
    for `within_s` (deployments/zombie_automation.py; idempotent). Returns what was done."""
    from deployments.zombie_automation import NAME, ensure

    if state.heartbeat_s is not None and within_s < 2 * state.heartbeat_s:
        raise StackError(
            f"zombie window {within_s:g} s: needs at least two heartbeats "
            f"({state.heartbeat_s} s each); a healthy run would be marked Crashed"
        )
    with prefect_client(state) as client:
        automation_id, done = ensure(client, within_s)
    return f"{NAME} ({automation_id}) {done}: Crashed after {within_s:g} s without a heartbeat"


def wait_for_workers(state: StackState, timeout_s: float) -> None:
    """Until every worker the stack started shows as ONLINE on the pool."""
    with prefect_client(state) as client:
        for _ in _deadline_loop(f"workers on pool {state.pool!r}", timeout_s, state, 1.0):
            online = {
                w.name
                for w in client.read_workers_for_work_pool(state.pool)
                if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"
            }
            if set(state.workers) <= online:
                return


def list_deployments(state: StackState) -> list[str]:
    """`<flow>/<deployment>  [schedules]` for every deployment on the server."""
    with prefect_client(state) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        lines = []
        for d in client.read_deployments():
            crons = [
                f"{s.schedule.cron} {s.schedule.timezone or 'UTC'}"
                for s in d.schedules
                if getattr(s.schedule, "cron", None)
            ]
            lines.append(
                f"{flows.get(d.flow_id, '?')}/{d.name}"
                + (f"  [cron {', '.join(crons)}]" if crons else "")
            )
    return sorted(lines)


# --- down ---------------------------------------------------------------------------------------


def down(root: Path, grace_s: float = 20.0) -> list[str]:
    """Stop what `up` started from <root>: the workers first (with the flow runs they started),
    then the server and the store; each with SIGTERM and, after `grace_s` (SeaweedFS's filer
    alone waits 15 s for its gRPC streams), SIGKILL. Then any process still carrying this stack's
    mark (a flow run whose worker died earlier). Returns the names of the processes that were
    running. Raises `StackError` when something survives SIGKILL."""
    root = Path(root).resolve()
    state = StackState.load(root)
    workers = [p for p in state.processes if p.name.startswith("stack-worker")]
    others = [p for p in state.processes if p not in workers]
    stopped = _stop(workers, grace_s) + _stop(others, grace_s)
    strays = _marked(root)
    if strays:
        log.warning("stopping %d stray process(es) of this stack: %s", len(strays),
                    ", ".join(str(s.pid) for s in strays))  # fmt: skip
        _stop_processes(strays, grace_s)
    for sock in _weed_tmp_sockets(state.weed_ports):
        if sock.is_socket() and sock.stat().st_uid == os.getuid():
            sock.unlink()
    for p in state.processes:  # when `up` ran in this process, reap its children now
        if (child := _CHILDREN.pop(p.pid, None)) is not None:
            child.poll()
    survivors = [p.name for p in state.processes if _tree(p)] + [str(s.pid) for s in _marked(root)]
    if survivors:
        raise StackError(f"still running after SIGKILL: {', '.join(survivors)}")
    state.processes = []
    state.save()
    return stopped


def _stop(procs: list[Proc], grace_s: float) -> list[str]:
    """Stop each process with everything it started; returns the names that were running."""
    trees = {p.name: _tree(p) for p in procs}
    running = [p for p in procs if trees[p.name]]
    alive = _stop_processes([q for p in running for q in trees[p.name]], grace_s)
    for p in running:
        if any(a in alive for a in trees[p.name]):
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s: SIGKILL", p.name, p.pid, grace_s)
        log.info("stopped %s (pid %d)", p.name, p.pid)
    return [p.name for p in running]


def _stop_processes(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """SIGTERM, wait up to grace_s, SIGKILL the rest; returns those that needed SIGKILL."""
    _, alive = _terminate(procs, signal.SIGTERM, grace_s)
    if alive:
        _terminate(alive, signal.SIGKILL, 5)
    return alive


def _terminate(
    procs: list[psutil.Process], sig: int, wait_s: float
) -> tuple[list[psutil.Process], list[psutil.Process]]:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil checks the pid still runs the same process
        except psutil.NoSuchProcess:
            pass
    return psutil.wait_procs(procs, timeout=wait_s)


def _is_ours(p: Proc) -> bool:
    """The pid still runs the process we started (not a later one that reused the pid)."""
    try:
        proc = psutil.Process(p.pid)
        return abs(proc.create_time() - p.create_time) < 0.01 and proc.status() != "zombie"
    except psutil.NoSuchProcess:
        return False


def _group_members(p: Proc) -> list[psutil.Process]:
    """Live processes of the group `p` leads (the leader, uvicorn of the server...). Linux does
    not reuse a pid while a group of that id has members, so a pid taken by another process
    means our group is gone: nothing of it is returned."""
    try:
        if abs(psutil.Process(p.pid).create_time() - p.create_time) >= 0.01:
            return []  # the pid now belongs to a process we did not start
    except psutil.NoSuchProcess:
        pass  # the leader is gone; members of its group may remain
    members = []
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == p.pid and proc.info["create_time"] >= p.create_time - 0.01:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _tree(p: Proc) -> list[psutil.Process]:
    """The process group of `p` plus every descendant, whatever its group: Prefect's process
    worker starts each flow run in a session of its own."""
    found = {m.pid: m for m in _group_members(p)}
    for member in list(found.values()):
        try:
            for child in member.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    return [proc for proc in found.values() if _running(proc)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _marked(root: Path) -> list[psutil.Process]:
    """Live processes (other than this one) whose environment carries this stack's mark: every
    process `up` starts, and whatever those start, such as flow runs."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get(STACK_MARK) == str(root):
                if _running(proc):
                    found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _alive(state: StackState) -> bool:
    return any(_tree(p) for p in state.processes) or bool(_marked(Path(state.root)))


# --- helpers ------------------------------------------------------------------------------------


def _uri_of(settings: StackSettings) -> str:
    from config.load import load_config

    return load_config(settings.project_dir / settings.dataset_config).storage.uri


def _with_bucket(uri: str, bucket: str) -> str:
    """`uri` (s3://bucket[/prefix]) with its bucket replaced, the prefix kept."""
    prefix = uri[len("s3://") :].partition("/")[2] if uri.startswith("s3://") else ""
    return f"s3://{bucket}" + (f"/{prefix}" if prefix else "")


def bucket_of(config_path: Path) -> str:
    """The bucket named by a config file's storage.uri (s3://bucket[/prefix])."""
    from config.load import load_config

    uri = load_config(config_path).storage.uri
    if not uri.startswith("s3://"):
        raise StackError(f"{config_path}: storage.uri is {uri!r}, not an s3:// bucket")
    return uri[len("s3://") :].split("/", 1)[0]


def default_pool(project_dir: Path) -> str:
    """PREFECT_DEFAULT_WORK_POOL_NAME, else prefect.toml's `deployments.default_work_pool_name`:
    the pool `prefect deploy` puts the deployments on."""
    import tomllib

    if name := os.environ.get("PREFECT_DEFAULT_WORK_POOL_NAME"):
        return name
    path = project_dir / "prefect.toml"
    try:
        name = tomllib.loads(path.read_text())["deployments"]["default_work_pool_name"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise StackError(f"{path}: no deployments.default_work_pool_name ({exc})") from exc
    return str(name)


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports on 127.0.0.1 that are free now (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _summary(state: StackState) -> str:
    lines = [
        f"Prefect UI   {state.ui_url}   (API {state.api_url})",
        f"S3 store     {state.s3_endpoint}   bucket s3://{state.bucket}   dataset: {state.dataset}",
        f"work pool    {state.pool}   workers: {', '.join(state.workers)}",
        f"zombies      {state.zombie_automation}; heartbeat every {state.heartbeat_s} s",
        "deployments  " + "\n             ".join(state.deployments or ["(none)"]),
        f"started in   {state.timings.get('total', 0):.1f} s   "
        + ", ".join(f"{k} {v:.1f} s" for k, v in state.timings.items() if k != "total"),
        f"state        {Path(state.root) / STATE_FILE}   logs {Path(state.root) / 'logs'}",
        "",
        f'Point a shell at it:  eval "$(python -m scripts.stack env --dir {state.root})"',
        "Run the pipeline:     prefect deployment run train-all-fusions/nightly --watch",
        "Stop everything:      make stack-down",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local Prefect server + worker + SeaweedFS stack.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the stack and deploy")
    p_down = sub.add_parser("down", help="stop exactly the processes `up` started")
    p_env = sub.add_parser("env", help="print export lines pointing clients at the stack")
    for p in (p_up, p_down, p_env):
        p.add_argument(
            "--dir",
            type=Path,
            default=Path(".stack"),
            help="state, data and logs folder (default: %(default)s)",
        )
    d = StackSettings()
    p_up.add_argument("--prefect-port", type=int, default=d.prefect_port)
    p_up.add_argument("--s3-port", type=int, default=d.weed.s3)
    p_up.add_argument("--weed-master-port", type=int, default=d.weed.master)
    p_up.add_argument("--weed-volume-port", type=int, default=d.weed.volume)
    p_up.add_argument("--weed-filer-port", type=int, default=d.weed.filer)
    p_up.add_argument(
        "--pool",
        default=None,
        help="work pool (default: PREFECT_DEFAULT_WORK_POOL_NAME or prefect.toml)",
    )
    p_up.add_argument("--workers", type=int, default=d.workers)
    p_up.add_argument(
        "--bucket", default=None, help="bucket to create (default: the one in --dataset-config)"
    )
    p_up.add_argument("--dataset-config", default=d.dataset_config)
    p_up.add_argument(
        "--dataset-pairs",
        type=int,
        default=None,
        help="benchmark pairs to generate (default: generator.n_pairs; 0: none)",
    )
    p_up.add_argument(
        "--deploy",
        action="append",
        default=None,
        metavar="FLOW/DEPLOYMENT",
        help="deploy only these (repeatable; default: prefect deploy --all)",
    )
    p_up.add_argument(
        "--heartbeat",
        type=int,
        default=d.heartbeat_s,
        help="seconds between flow-run heartbeats (default: %(default)s; at least 30)",
    )
    p_up.add_argument(
        "--zombie-after",
        type=float,
        default=d.zombie_after_s,
        help="seconds without a heartbeat before a run is marked Crashed (default: %(default)s)",
    )
    p_up.add_argument(
        "--no-scheduler",
        action="store_true",
        help="turn Prefect's scheduler off (the nightly schedule stays defined)",
    )
    p_down.add_argument(
        "--grace",
        type=float,
        default=20.0,
        help="seconds between SIGTERM and SIGKILL (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "up":
            settings = replace(
                d,
                root=args.dir,
                prefect_port=args.prefect_port,
                weed=WeedPorts.around(
                    args.s3_port, args.weed_master_port, args.weed_volume_port, args.weed_filer_port
                ),
                pool=args.pool,
                workers=args.workers,
                bucket=args.bucket,
                dataset_config=args.dataset_config,
                dataset_pairs=args.dataset_pairs,
                deployments=tuple(args.deploy) if args.deploy else None,
                scheduler=not args.no_scheduler,
                heartbeat_s=args.heartbeat,
                zombie_after_s=args.zombie_after,
            )
            print(_summary(up(settings)))
        elif args.command == "down":
            stopped = down(args.dir, args.grace)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        else:
            env = StackState.load(args.dir.resolve()).client_env(base={})
            print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cli() -> int:
    """The `deepfake-stack` console script: parse sys.argv, run, return the exit code."""
    return main()


if __name__ == "__main__":
    sys.exit(cli())

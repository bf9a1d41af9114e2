#!/usr/bin/env python
"""The local stack of the embedded default: an S3-protocol server, an MLflow tracking
server and a Ray head, all on 127.0.0.1, started for real and stopped together.

    python infra/local/stack.py up      # start (or find running) and print the endpoints
    eval "$(python infra/local/stack.py env)"   # this shell can then use ray, mlflow, s3fs
    python infra/local/stack.py status
    python infra/local/stack.py down    # stop all three; what they stored stays

- S3: ``localbucket`` through ``infra/local/s3_server.py``, bucket ``mdm`` (raw sets,
  shards, runs and MLflow artifacts under one bucket). Objects are files under
  ``<state>/s3/mdm``: they survive ``down``/``up``, so the registry never points at lost
  artifacts.
- MLflow: ``mlflow server`` with SQLite in the state folder, artifacts proxied into
  ``s3://mdm/mlflow`` (clients need no S3 credentials for artifacts).
- Ray: ``ray start --head --block`` with token authentication always on. The stack makes
  its own token once (``<state>/ray_auth_token``, mode 600) and hands it to the head and to
  every client it starts or prints (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``); the
  head also gets the S3 variables, ``MLFLOW_TRACKING_URI`` and this interpreter's bin first
  on PATH, so every job submitted to it finds the services and the project's packages.
  Stopping that one process stops this cluster only.

Nothing is read from or written to the user's home folder: the services run with
``HOME`` and the caches (DeepSpeed's JIT builds among them) inside the state folder.
State (ports, process ids, logs, token, objects, the SQLite file) lives in ``--state``
(default ``$MDM_STATE_DIR/stack``, else ``.state/stack`` in the repository, which is what
``make`` uses). Ports default to the usual ones (S3 9000, MLflow 5000, Ray 6379, dashboard
8265, Serve 8000); ``--ports auto`` picks free ones.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "ray": 6379, "dashboard": 8265, "agent": 52365, "serve": 8000}
BUCKET = "mdm"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "mdm-local",
    "AWS_SECRET_ACCESS_KEY": "mdm-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


REPO = Path(__file__).resolve().parents[2]
TOKEN_FILE = "ray_auth_token"


def default_state() -> Path:
    """``$MDM_STATE_DIR/stack``, else the repository's ``.state/stack`` (as under ``make``)."""
    base = os.environ.get("MDM_STATE_DIR") or str(REPO / ".state")
    return Path(base).expanduser().resolve() / "stack"


def ensure_token(state: Path) -> Path:
    """The cluster's Ray token: made once (random, mode 600), then reused by every start."""
    path = state / TOKEN_FILE
    if not path.exists():
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def service_env(state: Path) -> dict[str, str]:
    """Home and caches of the services (and of the jobs Ray runs) inside the state folder."""
    home, cache = state / "home", state / "cache"
    home.mkdir(parents=True, exist_ok=True)
    return {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(cache),
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
    }


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child counts as dead
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _wait(what: str, check, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}")
        if time.time() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s; see {log}")
        time.sleep(0.5)


def _http_ok(url: str, any_status: bool = False) -> bool:
    """The URL answers 2xx (or anything at all, with ``any_status``: the Ray dashboard
    answers 401 to requests without its token)."""
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except urllib.error.HTTPError:
        return any_status
    except OSError:
        return False


def read_state(state: Path) -> dict | None:
    f = state / "stack.json"
    return json.loads(f.read_text()) if f.exists() else None


def stack_env(info: dict) -> dict[str, str]:
    """What a client (``ray job submit``, ``ray.init``, MLflow, s3fs) needs to use this stack."""
    return {
        "AWS_ENDPOINT_URL": info["urls"]["s3"],
        **CREDENTIALS,
        "MLFLOW_TRACKING_URI": info["urls"]["mlflow"],
        "RAY_ADDRESS": info["urls"]["dashboard"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": info["token"],
    }


def running(info: dict | None) -> bool:
    return bool(info) and all(_alive(p) for p in info["pids"].values())


def up(state: Path, ports: str = "default", num_cpus: int | None = None) -> dict:
    """Start the three services (or return the running stack's description)."""
    info = read_state(state)
    if running(info):
        return info
    if info:
        down(state, quiet=True)
    state.mkdir(parents=True, exist_ok=True)
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    port = {k: (_free_port() if ports == "auto" else v) for k, v in DEFAULT_PORTS.items()}
    busy = [f"{k} {p}" for k, p in port.items() if _port_open(p)]
    if busy:
        raise RuntimeError(f"ports in use: {', '.join(busy)}; stop what holds them or use --ports auto")
    urls = {
        "s3": f"http://127.0.0.1:{port['s3']}",
        "mlflow": f"http://127.0.0.1:{port['mlflow']}",
        "ray": f"127.0.0.1:{port['ray']}",
        "dashboard": f"http://127.0.0.1:{port['dashboard']}",
        "serve": f"http://127.0.0.1:{port['serve']}",
    }
    token = ensure_token(state)
    info = {"state": str(state), "ports": port, "urls": urls, "pids": {}, "bucket": BUCKET, "token": str(token)}
    env = dict(os.environ, **CREDENTIALS, AWS_ENDPOINT_URL=urls["s3"], **service_env(state))
    for key in list(env):  # another cluster's token or address must not leak into this one
        if key.startswith(("RAY_", "MLFLOW_")):
            env.pop(key)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        log = logs / f"{name}.log"
        proc = subprocess.Popen(
            cmd,
            env=dict(env, **(extra_env or {})),
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the shell that started it; not killed by its ^C
        )
        procs.append(proc)
        info["pids"][name] = proc.pid
        return proc

    try:
        server = Path(__file__).resolve().parent / "s3_server.py"
        p = start(
            "s3",
            [sys.executable, str(server), str(state / "s3"), "--port", str(port["s3"]), "--bucket", BUCKET],
        )
        _wait("the S3 server", lambda: _port_open(port["s3"]), p, logs / "s3.log")

        p = start(
            "mlflow",
            [
                _bin("mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{state / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{BUCKET}/mlflow",
                "--host",
                "127.0.0.1",
                "--port",
                str(port["mlflow"]),
                "--workers",
                "1",
            ],  # fmt: skip
            {"MLFLOW_S3_ENDPOINT_URL": urls["s3"]},
        )
        _wait("the MLflow server", lambda: _http_ok(f"{urls['mlflow']}/health"), p, logs / "mlflow.log")

        ray_env = {
            "MLFLOW_TRACKING_URI": urls["mlflow"],
            "MDM_STATE_DIR": str(state.parent),
            "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "TRANSFORMERS_OFFLINE": env.get("TRANSFORMERS_OFFLINE", "1"),
        }
        cmd = [
            _bin("ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
            "--port", str(port["ray"]),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(port["dashboard"]),
            "--dashboard-agent-listen-port", str(port["agent"]),
            "--include-dashboard", "true", "--disable-usage-stats",
            "--temp-dir", str(Path(tempfile.gettempdir()) / f"ray-mdm-{port['ray']}"),
        ]  # fmt: skip
        if num_cpus:
            cmd += ["--num-cpus", str(num_cpus)]
        p = start("ray", cmd, ray_env)
        # ready for `ray job submit` once the dashboard answers and the head's job agent
        # listens (a submission before that fails with "No available agent")
        _wait(
            "the Ray head",
            lambda: _http_ok(f"{urls['dashboard']}/api/version", any_status=True) and _port_open(port["agent"]),
            p,
            logs / "ray.log",
            240,
        )
    except BaseException:
        for proc in procs:
            _terminate(proc.pid)
        raise
    (state / "stack.json").write_text(json.dumps(info, indent=2))
    return info


def _terminate(pid: int, timeout: float = 60) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # the process group: a service and what it spawned
    except OSError:
        return
    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.3)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def down(state: Path, quiet: bool = False) -> None:
    info = read_state(state)
    if not info:
        if not quiet:
            print(f"no local stack recorded in {state}")
        return
    for name in ("ray", "mlflow", "s3"):  # Ray first: its jobs may still talk to the others
        pid = info["pids"].get(name)
        if pid:
            _terminate(pid)
    (state / "stack.json").unlink(missing_ok=True)
    if not quiet:
        print("local stack stopped")


def shell_bin(name: str) -> str:
    """This interpreter's ``name`` (python, ray, ...) as a shell at the repository root reaches it."""
    path = Path(sys.executable).parent / name
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def stack_command(state: Path, verb: str) -> str:
    """The command line that runs ``verb`` on this stack, pasteable at the repository root."""
    cmd = f"{shell_bin('python')} infra/local/stack.py {verb}"
    if Path(state).resolve() != default_state():
        cmd += f" --state {shlex.quote(str(state))}"
    return cmd


def describe(info: dict) -> str:
    u = info["urls"]
    env_cmd = stack_command(Path(info["state"]), "env")
    return "\n".join(
        [
            f"  S3 (localbucket) {u['s3']}   bucket s3://{info['bucket']}   (objects under {info['state']}/s3)",
            f"  MLflow UI        {u['mlflow']}",
            f"  Ray dashboard    {u['dashboard']}",
            f"  Serve endpoint   {u['serve']}",
            f"  logs             {info['state']}/logs",
            f"  Ray token        {info['token']}",
            f"  in a shell       eval \"$({env_cmd})\"   then e.g. {shell_bin('ray')} job list",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status", "env"])
    p.add_argument("--state", type=Path, default=None, help="state folder (default $MDM_STATE_DIR/stack)")
    p.add_argument("--ports", choices=["default", "auto"], default="default", help="fixed usual ports or free ones")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    args = p.parse_args(argv)
    state = (args.state or default_state()).resolve()
    if args.command == "up":
        try:
            info = up(state, args.ports, args.num_cpus)
        except RuntimeError as e:
            print(f"stack: error: {e}", file=sys.stderr)
            return 1
        print("local stack running:\n" + describe(info))
    elif args.command == "down":
        down(state)
    elif args.command == "status":
        info = read_state(state)
        if not running(info):
            print("local stack: not running")
            return 1
        print("local stack running:\n" + describe(info))
    else:
        info = read_state(state)
        if not running(info):
            print("stack: error: not running (python infra/local/stack.py up)", file=sys.stderr)
            return 1
        for k, v in stack_env(info).items():
            print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

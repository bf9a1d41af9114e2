#!/usr/bin/env python
"""Run a long command detached from the call that starts it, and follow it from later calls.

The GPU machine runs one command per call, for at most 10 minutes, and a job (the stage
jobs, a benchmark chain) can outlive that. One call starts the job; the next calls wait on
it, each printing what the job logged since the last look:

    python3 bench/detach.py start stages --state /tmp/jobs -- python3 bench/stage_jobs.py ...
    python3 bench/detach.py wait stages --state /tmp/jobs --seconds 540
    python3 bench/detach.py status --state /tmp/jobs

``start`` is idempotent: a job of that name that is still running is left alone (the call
says so), one that has finished is started again only with ``--again``. It knows this from
the job's own files under ``--state/<name>/`` (``pid``, ``rc``, ``log``), never by
searching process command lines, which would also match the calling command itself.

``wait`` prints the log lines that are new since the previous ``wait`` and returns when the
job ends (with the job's exit status) or after ``--seconds`` (with status 3: still
running). ``status`` prints one line per job: running, or finished and its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STILL_RUNNING = 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a finished child that nobody reaped is a zombie: not running
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


class Job:
    def __init__(self, state: Path, name: str):
        if not name or "/" in name or name.startswith("."):
            raise SystemExit(f"job name {name!r}: use a plain name (letters, digits, - and _)")
        self.dir = state / name
        self.name = name

    @property
    def pid(self) -> int | None:
        f = self.dir / "pid"
        return int(f.read_text()) if f.exists() else None

    @property
    def rc(self) -> int | None:
        f = self.dir / "rc"
        return int(f.read_text()) if f.exists() else None

    def running(self) -> bool:
        return self.pid is not None and self.rc is None and _alive(self.pid)

    def describe(self) -> str:
        if self.pid is None:
            return f"{self.name}: never started"
        if self.running():
            started = json.loads((self.dir / "job.json").read_text())["started"]
            return f"{self.name}: running (pid {self.pid}, {time.time() - started:.0f} s)"
        if self.rc is None:
            return f"{self.name}: died without an exit status (killed with its process group?)"
        return f"{self.name}: finished, exit status {self.rc}"


def start(job: Job, command: list[str], again: bool) -> int:
    if not command:
        raise SystemExit("start: give the command after --")
    if job.running():
        print(f"{job.describe()}; not started again", flush=True)
        return 0
    if job.pid is not None and not again:
        print(f"{job.describe()}; pass --again to run it anew", flush=True)
        return 0
    job.dir.mkdir(parents=True, exist_ok=True)
    for f in ("rc", "pid", "offset"):
        (job.dir / f).unlink(missing_ok=True)
    (job.dir / "job.json").write_text(json.dumps({"command": command, "cwd": os.getcwd(), "started": time.time()}))
    log = open(job.dir / "log", "ab")
    # The supervisor (this file's `_run`) waits for the command and writes its exit status;
    # its own session, so the call that started it can end without taking it along.
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "_run", job.name, "--state", str(job.dir.parent), "--", *command],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (job.dir / "pid").write_text(str(proc.pid))
    print(f"{job.name}: started (pid {proc.pid}), log {job.dir / 'log'}", flush=True)
    return 0


def supervise(job: Job, command: list[str]) -> int:
    try:
        child = subprocess.Popen(command)
    except OSError as e:
        print(f"detach: cannot run {command[0]!r}: {e}", flush=True)
        (job.dir / "rc").write_text("127")
        return 127

    def forward(signum, _frame):
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    rc = rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's convention
    print(f"detach: {job.name} exited with status {rc}", flush=True)
    (job.dir / "rc").write_text(str(rc))
    return rc


def _print_new(job: Job) -> None:
    log, mark = job.dir / "log", job.dir / "offset"
    offset = int(mark.read_text()) if mark.exists() else 0
    with open(log, "rb") as f:
        f.seek(offset)
        data = f.read()
    if data:
        sys.stdout.write(data.decode("utf-8", "replace"))
        sys.stdout.flush()
    mark.write_text(str(offset + len(data)))


def wait(job: Job, seconds: float, poll: float) -> int:
    if job.pid is None:
        raise SystemExit(f"{job.describe()} (under {job.dir.parent})")
    deadline = time.monotonic() + seconds
    while True:
        _print_new(job)
        if not job.running():
            _print_new(job)
            print(job.describe(), flush=True)
            rc = job.rc
            return 1 if rc is None else rc
        if time.monotonic() >= deadline:
            print(job.describe(), flush=True)
            return STILL_RUNNING
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    for verb in ("start", "wait", "_run"):
        s = sub.add_parser(verb)
        s.add_argument("name")
        s.add_argument("--state", type=Path, required=True, help="folder of the jobs' pid, log and exit status")
        if verb == "start":
            s.add_argument("--again", action="store_true", help="run a finished job anew")
        if verb == "wait":
            s.add_argument("--seconds", type=float, default=540, help="return after this long (status 3)")
            s.add_argument("--poll", type=float, default=2.0)
    st = sub.add_parser("status")
    st.add_argument("--state", type=Path, required=True)
    args = p.parse_args(argv)
    if args.verb == "status":
        names = sorted(d.name for d in args.state.iterdir() if d.is_dir()) if args.state.is_dir() else []
        for name in names:
            print(Job(args.state, name).describe())
        if not names:
            print(f"no jobs under {args.state}")
        return 0
    job = Job(args.state, args.name)
    if args.verb == "start":
        return start(job, command, args.again)
    if args.verb == "_run":
        return supervise(job, command)
    return wait(job, args.seconds, args.poll)


if __name__ == "__main__":
    sys.exit(main())

"""bench/detach.py: a job started in one call outlives it and is followed from later calls."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "bench" / "detach.py"


def detach(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout)


def test_job_outlives_its_start_and_wait_reports_new_lines_and_exit_status(tmp_path):
    state = tmp_path / "jobs"
    gate = tmp_path / "gate"
    script = (
        "import pathlib, time, sys\n"
        "print('first', flush=True)\n"
        f"while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n"
        "print('second', flush=True)\n"
        "sys.exit(7)\n"
    )
    r = detach("start", "train", "--state", str(state), "--", sys.executable, "-c", script)
    assert r.returncode == 0 and "started" in r.stdout, r.stdout + r.stderr
    # the start call has returned; the job still runs and blocks on the gate
    r = detach("wait", "train", "--state", str(state), "--seconds", "1.5", "--poll", "0.1")
    assert r.returncode == 3, r.stdout  # still running
    assert "first" in r.stdout and "second" not in r.stdout and "running" in r.stdout
    # a second start of a running job leaves it alone
    r = detach("start", "train", "--state", str(state), "--", sys.executable, "-c", "print('other')")
    assert r.returncode == 0 and "not started again" in r.stdout
    gate.touch()
    r = detach("wait", "train", "--state", str(state), "--seconds", "30", "--poll", "0.1")
    assert r.returncode == 7, r.stdout  # the job's own exit status
    # only what is new since the previous wait
    assert "second" in r.stdout and "first" not in r.stdout and "other" not in r.stdout
    assert "exit status 7" in r.stdout
    assert "train: finished, exit status 7" in detach("status", "--state", str(state)).stdout


def test_a_start_whose_own_command_line_names_the_job_still_starts_it(tmp_path):
    """The 2026-12-07 failure: a guard that searched process command lines for the job's
    text found the calling command itself, so the job never started."""
    state = tmp_path / "jobs"
    marker = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).touch()  # configs small-64-128"]
    start = [sys.executable, str(TOOL), "start", "small-64-128", "--state", str(state), "--", *cmd]
    shell = subprocess.run(["bash", "-c", "exec " + shlex.join(start)], capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0 and "started" in shell.stdout, shell.stdout + shell.stderr
    assert detach("wait", "small-64-128", "--state", str(state), "--seconds", "30").returncode == 0
    assert marker.exists()


def test_finished_job_runs_again_only_when_asked(tmp_path):
    state = tmp_path / "jobs"
    counter = tmp_path / "count"
    script = (
        f"import pathlib; p = pathlib.Path({str(counter)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')"
    )
    cmd = [sys.executable, "-c", script]
    assert detach("start", "once", "--state", str(state), "--", *cmd).returncode == 0
    assert detach("wait", "once", "--state", str(state), "--seconds", "30").returncode == 0
    r = detach("start", "once", "--state", str(state), "--", *cmd)
    assert "--again" in r.stdout
    time.sleep(0.5)
    assert counter.read_text() == "x"
    assert detach("start", "once", "--state", str(state), "--again", "--", *cmd).returncode == 0
    assert detach("wait", "once", "--state", str(state), "--seconds", "30").returncode == 0
    assert counter.read_text() == "xx"


def test_missing_program_and_unknown_job_fail_loudly(tmp_path):
    state = tmp_path / "jobs"
    assert detach("start", "bad", "--state", str(state), "--", str(tmp_path / "no-such-program")).returncode == 0
    r = detach("wait", "bad", "--state", str(state), "--seconds", "30")
    assert r.returncode == 127 and "cannot run" in r.stdout
    r = detach("wait", "never", "--state", str(state), "--seconds", "1")
    assert r.returncode != 0 and "never started" in r.stdout + r.stderr
    r = detach("start", "../escape", "--state", str(state), "--", "true")
    assert r.returncode != 0 and "plain name" in r.stderr
    assert not (tmp_path / "escape").exists()

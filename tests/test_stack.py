"""The local stack as a newcomer meets it: a fresh home folder, nothing in the environment.

Starts its own stack with ``python infra/local/stack.py up`` (the command ``make demo``
runs), with ``HOME`` pointing at an empty folder and no ``RAY_*``/``MLFLOW_*``/``AWS_*``
variables, then: one ``ray job submit`` with only what ``stack.py env`` prints; a model
registered as ``models:/mdm@stage-128``; ``down`` and ``up`` again; the model still loads
from the registry and samples. The home folder is still empty at the end.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
STACK = [sys.executable, str(REPO / "infra" / "local" / "stack.py")]


def fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "MDM_"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def exported(text: str) -> dict[str, str]:
    """The variables of ``stack.py env``'s ``export K=V`` lines, as a shell would set them."""
    out = {}
    for line in text.splitlines():
        assert line.startswith("export "), line
        key, _, value = line[len("export ") :].partition("=")
        out[key] = shlex.split(value)[0]
    return out


def run(cmd: list[str], env: dict, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_stack_from_an_empty_home_authenticates_and_keeps_what_it_stores(tmp_path):
    home, state = tmp_path / "home", tmp_path / "state"
    home.mkdir()
    base = fresh_env(home)
    stack_args = ["--state", str(state)]
    run(STACK + ["up", *stack_args, "--ports", "auto", "--num-cpus", "1"], base, timeout=400)
    try:
        token = state / "ray_auth_token"
        assert token.stat().st_mode & 0o777 == 0o600
        env = dict(base, **exported(run(STACK + ["env", *stack_args], base).stdout))
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)

        # one job through the job API, authenticated with the stack's own token
        job = tmp_path / "job"
        job.mkdir()
        (job / "hello.py").write_text("import ray; ray.init(); print('cpus', ray.cluster_resources()['CPU'])\n")
        ray_cli = str(Path(sys.executable).parent / "ray")
        out = run([ray_cli, "job", "submit", "--working-dir", str(job), "--", "python", "hello.py"], env).stdout
        assert "cpus 1.0" in out and "succeeded" in out
        # without the token the same cluster refuses
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        refused = subprocess.run([ray_cli, "job", "list"], env=no_token, cwd=REPO, capture_output=True, text=True)
        assert refused.returncode != 0 and "Authentication" in refused.stderr + refused.stdout

        # a registered stage-128 model: weights and config through MLflow into the S3 server
        register = textwrap.dedent(
            f"""
            import sys; sys.path.insert(0, {str(REPO)!r})
            from mdm import MDMModel, get_config, save_pretrained
            from jobs.registry import register_model, set_tracking
            cfg = get_config("tiny-64-128")
            save_pretrained(MDMModel(cfg.model), cfg, {str(tmp_path / "model")!r})
            set_tracking(None, "stack-test")
            print("version", register_model({str(tmp_path / "model")!r}, name="mdm", alias="stage-128"))
            """
        )
        assert "version 1" in run([sys.executable, "-c", register], env).stdout

        run(STACK + ["down", *stack_args], base)
        assert not (state / "stack.json").exists()
        run(STACK + ["up", *stack_args, "--ports", "auto", "--num-cpus", "1"], base, timeout=400)
        env = dict(base, **exported(run(STACK + ["env", *stack_args], base).stdout))

        sample = textwrap.dedent(
            """
            from mdm import MDMPipeline
            pipe = MDMPipeline.from_pretrained("models:/mdm@stage-128")
            images = pipe.generate(num_samples=1, steps=2, seed=0)
            print("shapes", [tuple(x.shape) for x in images])
            """
        )
        out = run([sys.executable, "-c", sample], env).stdout
        assert "shapes [(1, 3, 64, 64), (1, 3, 128, 128)]" in out
    finally:
        subprocess.run(STACK + ["down", *stack_args], env=base, cwd=REPO, capture_output=True, timeout=300)
    assert sorted(p.name for p in home.iterdir()) == [], "the stack and its clients wrote into the home folder"

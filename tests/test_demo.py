"""The newcomer's path: README's commands, and the main job end to end on the local stack.

``infra/local/demo.py --quick`` is ``make demo`` at smoke-test size: it starts the real
local stack (S3 server, MLflow server, Ray head), builds the emoji raw set, preprocesses
it, trains stage 64 and stage 128 through ``ray job submit``, deploys the sampler with
``serve deploy`` and saves the images of four prompts; then it stops the stack.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_readme_commands_are_the_ones_ci_and_make_run():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert first_block, "README starts with a bash block of the two commands"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert readme.index(first_block.group(0)) < readme.index("## ")  # before any section
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call README's test command"
    # ... as on a fresh machine: an empty home, no inherited Ray/MLflow/AWS settings
    assert re.search(r'^export HOME="\$fresh_home"$', ci, re.M) and "mktemp -d" in ci
    assert "RAY|MLFLOW|AWS" in ci and "unset" in ci
    make = (REPO / "Makefile").read_text()
    test_rule = re.search(r"^test:.*\n((?:\t.*\n)+)", make, re.M).group(1)
    assert "-m pytest" in test_rule
    demo_rule = re.search(r"^demo:(.*)\n((?:\t.*\n)+)", make, re.M)
    assert "setup" in demo_rule.group(1) and "emoji-packages" in demo_rule.group(1)
    assert "infra/local/demo.py" in demo_rule.group(2)
    # the test below runs the same script README's first command runs
    assert (REPO / "infra" / "local" / "demo.py").exists()


@pytest.mark.integration
@pytest.mark.ray
def test_demo_end_to_end_on_the_local_stack(local_stack, tmp_path):
    """``make demo`` at smoke size on the session's stack (the same ``stack.py`` code, so the
    demo finds it running and uses it instead of starting a second one)."""
    state, out = Path(local_stack["state"]), tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in [k for k in env if k.startswith(("RAY_", "MLFLOW_", "AWS_"))]:
        env.pop(key)  # the demo takes every address and the token from the stack itself
    cmd = [sys.executable, "infra/local/demo.py", "--quick", "--state", str(state), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    finally:  # the demo leaves its endpoint up for the user; later tests start Serve their own way
        serve_cli = str(Path(sys.executable).parent / "serve")
        subprocess.run(
            [serve_cli, "shutdown", "-y", "--address", local_stack["urls"]["dashboard"]],
            env=os.environ,
            capture_output=True,
            timeout=300,
        )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for step in range(1, 7):
        assert f"=== [{step}/6]" in proc.stdout
    v64 = re.search(r"registered models:/mdm/(\d+) as @stage-64", log)
    v128 = re.search(r"registered models:/mdm/(\d+) as @stage-128", log)
    assert v64 and v128 and int(v128.group(1)) > int(v64.group(1)), log[-3000:]
    assert f"serving mdm version {v128.group(1)} (tiny-64-128)" in log

    prompts = json.loads((out / "prompts.json").read_text())
    assert len(prompts) == 4
    for res in (64, 128):
        files = sorted(out.glob(f"prompt*_{res}px.png"))
        assert len(files) == 16, files
        assert {Image.open(f).size for f in files} == {(res, res)}
    grid = Image.open(out / "grid.png")
    assert grid.size == (4 * 130 + 2, 4 * 130 + 2)  # 4 x 4 images of 128 px with 2 px padding
    assert "Look at:" in proc.stdout and "MLflow UI" in proc.stdout and "/docs" in proc.stdout

    # what the demo tells a user to paste works as printed, from the repository root
    stop = re.search(r"Stop the stack with: (.+)", proc.stdout).group(1).strip()
    use = re.search(r'Use the stack from a shell: eval "\$\((.+)\)"', proc.stdout).group(1).strip()
    shell = subprocess.run(
        ["bash", "-c", f'eval "$({use})" && echo "$RAY_AUTH_TOKEN_PATH" && {stop.replace(" down", " status")}'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shell.returncode == 0, shell.stdout + shell.stderr
    assert local_stack["token"] in shell.stdout and "local stack running" in shell.stdout

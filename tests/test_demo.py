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
def test_demo_end_to_end_on_the_local_stack(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        env.pop(key, None)  # the demo brings its own stack
    cmd = [
        sys.executable,
        "infra/local/demo.py",
        "--quick",
        "--ports",
        "auto",
        "--state",
        str(state),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd + ["--down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for step in range(1, 7):
        assert f"=== [{step}/6]" in proc.stdout
    assert "registered models:/mdm/1 as @stage-64" in log
    assert "registered models:/mdm/2 as @stage-128" in log
    assert "serving mdm version 2 (tiny-64-128)" in log

    prompts = json.loads((out / "prompts.json").read_text())
    assert len(prompts) == 4
    for res in (64, 128):
        files = sorted(out.glob(f"prompt*_{res}px.png"))
        assert len(files) == 16, files
        assert {Image.open(f).size for f in files} == {(res, res)}
    grid = Image.open(out / "grid.png")
    assert grid.size == (4 * 130 + 2, 4 * 130 + 2)  # 4 x 4 images of 128 px with 2 px padding
    assert "Look at:" in proc.stdout and "MLflow UI" in proc.stdout and "/docs" in proc.stdout

    # --down stopped every service it started
    assert not (state / "stack.json").exists()
    stack_log = (state / "logs" / "ray.log").read_text()
    assert "received SIGTERM" in stack_log

"""A stage job survives what should not end it and ends loudly on what should.

- An MLflow outage costs metrics and pictures, never the run (``jobs.tracking.Tracker``).
- The step that both samples and checkpoints saves first (``jobs.stage_worker.run_steps``).
- A resumed run refuses config changes it cannot honour (``jobs.stage.check_resume``).
- A cluster that cannot hold the workers and the data pipeline is refused before any worker
  starts; a run without progress fails (``check_cluster_fits``, ``fit_with_watchdog``).

The loop runs here with the real ``ZeroTrainer`` (DeepSpeed, gloo, a world of one); the
same checks through ``ray job submit`` are in ``test_jobs.py``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

from jobs.stage import StalledError, check_cluster_fits, check_resume, fit_with_watchdog
from jobs.stage_config import load_stage_config
from jobs.tracking import Tracker
from mdm.config import ConfigError

SETS = [
    "model.model.conditioning.kind=none",
    "train.steps=6",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "run.checkpoint_every=2",
    "run.log_every=1",
    "mlflow.sample_every=3",
    "mlflow.sample_steps=2",
]


def stage_config(*extra: str):
    return load_stage_config("tiny-32", None, SETS + list(extra))


@pytest.fixture(scope="module")
def trainer_factory():
    from mdm import MDMModel
    from mdm.zero import ZeroTrainer

    def make(cfg):
        torch.manual_seed(0)
        return ZeroTrainer(MDMModel(cfg.model.model), cfg.model, cfg.train, cfg.deepspeed, null=None, device="cpu")

    return make


def random_batches():
    from mdm.training import Batch
    from mdm.unet import Condition

    g = torch.Generator().manual_seed(1)
    while True:
        yield Batch([torch.rand(2, 3, 32, 32, generator=g) * 2 - 1], Condition())


def run_loop(trainer, cfg, tracker, samples, reported: list[int], log=print) -> None:
    """``run_steps`` from step 0 on random batches; ``reported`` gets the steps whose
    checkpoints were handed over."""
    from jobs.stage_worker import run_steps

    try:
        run_steps(
            trainer,
            random_batches(),
            cfg,
            start=0,
            tracker=tracker,
            samples=samples,
            report=lambda folder, step: reported.append(step),
            log=log,
        )
    finally:
        tracker.close(timeout_s=30)


def test_an_unreachable_mlflow_costs_the_metrics_not_the_run(trainer_factory, monkeypatch):
    """MLflow answers nothing (a port nobody listens on): every step still runs, every
    checkpoint is still handed over, and what could not be sent is counted and said."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = stage_config()
    trainer = trainer_factory(cfg)
    said: list[str] = []
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "no-such-run", attempts=2, backoff_s=0.01, log=said.append)
    sampled: list[int] = []

    def samples(step, ema):
        sampled.append(step)
        from PIL import Image

        return [(Image.new("RGB", (8, 8)), f"samples/step_{step:07d}_32px.png")]

    reported: list[int] = []
    run_loop(trainer, cfg, tracker, samples, reported, log=said.append)
    assert trainer.step == 6
    assert reported == [2, 4, 6]
    assert sampled == [3, 6]
    # 6 metric batches + 2 images, none delivered
    assert tracker.sent == 0 and tracker.dropped == 8, (tracker.sent, tracker.dropped)
    assert any("could not send metrics of step 1 after 2 attempts" in line for line in said), said
    assert any("training goes on" in line for line in said)


def test_the_step_that_samples_and_checkpoints_saves_first(trainer_factory, monkeypatch):
    """Sampling at step 4 fails (say the GPU runs out of memory): the checkpoint of step 4
    was handed over before, so a restart resumes from step 4, not 2."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = stage_config("mlflow.sample_every=4")
    trainer = trainer_factory(cfg)
    reported: list[int] = []

    def samples(step, ema):
        raise RuntimeError("out of memory while sampling")

    tracker = Tracker("http://127.0.0.1:1", "x", attempts=1, backoff_s=0, log=lambda s: None)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_loop(trainer, cfg, tracker, samples, reported)
    assert trainer.step == 4
    assert reported == [2, 4]


def test_tracker_retries_a_failing_send_then_delivers_in_order():
    class Flaky:
        """Refuses the first two requests (an MLflow restart), then records."""

        def __init__(self):
            self.calls, self.got = 0, []

        def log_batch(self, run_id, metrics):
            self.calls += 1
            if self.calls <= 2:
                raise ConnectionError("connection refused")
            self.got.append(metrics[0].step)

    client = Flaky()
    tracker = Tracker("unused", "run", attempts=3, backoff_s=0.01, client=client, log=lambda s: None)
    for step in (1, 2, 3):
        tracker.log_metrics(step, {"loss": 1.0})
    tracker.close(timeout_s=10)
    assert client.got == [1, 2, 3] and tracker.sent == 3 and tracker.dropped == 0


def test_tracker_never_blocks_training_and_bounds_what_waits():
    release = threading.Event()

    class Hung:
        def log_batch(self, run_id, metrics):
            release.wait(10)

    said: list[str] = []
    tracker = Tracker("unused", "run", attempts=1, max_pending=3, client=Hung(), log=said.append)
    t0 = time.perf_counter()
    tracker.log_metrics(0, {"loss": 1.0})
    while not tracker._busy and time.perf_counter() - t0 < 1.0:  # step 0 in flight, hung
        time.sleep(0.001)
    for step in range(1, 10):
        tracker.log_metrics(step, {"loss": 1.0})
    assert time.perf_counter() - t0 < 1.0, "logging waited for MLflow"
    release.set()
    tracker.close(timeout_s=10)
    # one in flight, three waiting, six dropped oldest first
    assert tracker.dropped == 6 and tracker.sent == 4, (tracker.dropped, tracker.sent)
    assert any("dropped metrics of step 1" in line for line in said), said


# ---------------------------------------------------------------------------- resume
def _storage(tmp_path: Path):
    from pipelines.storage import arrow_fs

    return arrow_fs(tmp_path.as_uri())


def test_a_resume_refuses_changes_it_cannot_honour_and_keeps_the_safe_ones(tmp_path, capsys):
    fs, root = _storage(tmp_path)
    first = stage_config("run.name=r1")
    check_resume(first, fs, root)  # a new run: its config is stored
    stored = json.loads((tmp_path / "r1" / "mdm_stage_config.json").read_text())
    assert stored["train"]["steps"] == 6

    # no checkpoint yet: anything may change
    check_resume(stage_config("run.name=r1", "train.lr=0.5"), fs, root)
    check_resume(first, fs, root)
    (tmp_path / "r1" / "step_00000004").mkdir()

    with pytest.raises(ConfigError) as err:
        check_resume(stage_config("run.name=r1", "deepspeed.stage=3", "train.lr=0.01", "train.steps=10"), fs, root)
    msg = str(err.value)
    assert "deepspeed.stage: 2 -> 3" in msg and "train.lr: 0.0001 -> 0.01" in msg and "step_00000004" in msg
    assert "train.steps" not in msg, "more steps is a safe change"
    assert "another --name" in msg
    with pytest.raises(ConfigError, match="scaling.num_workers: 2 -> 4"):
        check_resume(stage_config("run.name=r1", "scaling.num_workers=4"), fs, root)
    with pytest.raises(ConfigError, match=r"model\.model\.unets\.0\.channels"):
        check_resume(stage_config("run.name=r1", "model.model.unets.0.channels=[32,48]"), fs, root)
    assert json.loads((tmp_path / "r1" / "mdm_stage_config.json").read_text()) == stored, "a refusal changes nothing"

    check_resume(stage_config("run.name=r1", "train.steps=10", "run.log_every=5"), fs, root)
    out = capsys.readouterr().out
    assert "resuming with a changed train.steps: 6 -> 10" in out and "run.log_every: 1 -> 5" in out
    assert json.loads((tmp_path / "r1" / "mdm_stage_config.json").read_text())["train"]["steps"] == 10


# ---------------------------------------------------------------------------- resources
def capacity(cpus, gpus=0.0, node_cpus=None, node_gpus=None):
    return {
        "cpus": cpus,
        "gpus": gpus,
        "node_cpus": cpus if node_cpus is None else node_cpus,
        "node_gpus": gpus if node_gpus is None else node_gpus,
        "source": "nodes alive now",
    }


def test_a_cluster_that_cannot_hold_workers_and_data_is_refused_with_what_to_change():
    default = load_stage_config("64", None, [])  # README's stage command: 2 workers x 1 CPU
    with pytest.raises(ConfigError) as err:
        check_cluster_fits(default, capacity(2))
    msg = str(err.value)
    assert "2 workers x 1 CPU + 1 CPU for reading the shards = 3" in msg
    assert "--set scaling.cpus_per_worker=0.5" in msg and "--set scaling.num_workers=1" in msg
    check_cluster_fits(default, capacity(3))
    demo = load_stage_config("64", None, ["scaling.cpus_per_worker=0.5"])  # what make demo runs
    check_cluster_fits(demo, capacity(2))

    big = load_stage_config("64", None, ["scaling.cpus_per_worker=16"])
    with pytest.raises(ConfigError, match="no node of the cluster has that many CPUs"):
        check_cluster_fits(big, capacity(64, node_cpus=8))
    gpu = load_stage_config("64", None, ["scaling.use_gpu=true", "scaling.num_workers=8"])
    with pytest.raises(ConfigError, match="has no GPU node"):
        check_cluster_fits(gpu, capacity(64))
    with pytest.raises(ConfigError, match="lower scaling.num_workers to 4"):
        check_cluster_fits(gpu, capacity(64, gpus=4))
    check_cluster_fits(gpu, capacity(96, gpus=8))


def test_a_run_without_progress_fails_and_one_with_progress_does_not():
    hang = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(StalledError, match="no progress for .* the last was: waiting for the first batch"):
        fit_with_watchdog(
            lambda: hang.wait(60), lambda: (time.monotonic() - t0, "waiting for the first batch"), 0.5, 0.05
        )
    assert time.monotonic() - t0 < 5
    hang.set()

    # a fit that moves (progress 0.1 s old at every poll) outlives many timeouts and returns
    assert fit_with_watchdog(lambda: time.sleep(1.0) or "done", lambda: (0.1, "step 3"), 0.3, 0.05) == "done"

    # a poll that cannot be answered counts as no news: the clock keeps running
    def unanswered():
        raise TimeoutError("the progress actor did not answer")

    with pytest.raises(StalledError):
        fit_with_watchdog(lambda: threading.Event().wait(60), unanswered, 0.3, 0.05)

    # fit's own error is what the caller sees
    def broken():
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        fit_with_watchdog(broken, lambda: (0.0, ""), 10, 0.05)


def test_the_log_says_how_long_the_step_waited_for_data(trainer_factory):
    """A stream that takes 0.3 s a batch shows up as >= 0.3 s of data wait per step in the
    log line and the metrics; a ready stream as almost none."""
    import re

    from jobs.stage_worker import run_steps

    cfg = stage_config("train.steps=3", "run.checkpoint_every=100", "mlflow.sample_every=0")

    class Metrics:
        def __init__(self):
            self.rows = []

        def log_metrics(self, step, values):
            self.rows.append((step, values["data_wait_s"]))

    def waits(delay: float) -> tuple[list[float], list]:
        def slow():
            for b in random_batches():
                time.sleep(delay)
                yield b

        lines, tracker = [], Metrics()
        run_steps(trainer_factory(cfg), slow(), cfg, start=0, tracker=tracker, log=lines.append)
        got = [float(m.group(1)) for m in (re.search(r"data wait ([0-9.]+)/[0-9.]+ s", x) for x in lines) if m]
        return got, tracker.rows

    slow_lines, slow_rows = waits(0.3)
    assert len(slow_lines) == 3 and all(w >= 0.29 for w in slow_lines), slow_lines
    assert [s for s, _ in slow_rows] == [1, 2, 3] and all(w >= 0.29 for _, w in slow_rows), slow_rows
    fast_lines, _ = waits(0.0)
    assert len(fast_lines) == 3 and all(w < 0.2 for w in fast_lines), fast_lines


# ---------------------------------------------------------------------------- errors a restart repeats
def test_running_out_of_accelerator_memory_says_what_to_change():
    from jobs.stage_worker import NotRetryableError, out_of_memory_is_fatal

    cfg = load_stage_config("small-64-128", None, ["train.batch_size=128"])
    with pytest.raises(NotRetryableError) as err:
        with out_of_memory_is_fatal(cfg, 0, lambda: "in step 1"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msg = str(err.value)
    assert "rank 0 ran out of accelerator memory" in msg and "in step 1" in msg
    assert "small-64-128 at train.batch_size=128" in msg
    assert "--set train.batch_size=64 --set train.grad_accum=2" in msg
    assert "--set train.gradient_checkpointing=true" in msg
    assert "Tried to allocate 2.00 GiB" in msg

    checkpointed = load_stage_config("small-64-128", None, ["train.batch_size=1", "train.gradient_checkpointing=true"])
    with pytest.raises(NotRetryableError) as err:
        with out_of_memory_is_fatal(checkpointed, 3):
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert "train.batch_size=0" not in str(err.value) and "gradient_checkpointing=true" not in str(err.value)
    assert "a card with more memory" in str(err.value)

    with pytest.raises(ValueError, match="bad shard"):  # every other error passes unchanged
        with out_of_memory_is_fatal(cfg, 0):
            raise ValueError("bad shard")


def test_gradient_checkpointing_may_change_on_resume(tmp_path):
    fs, root = _storage(tmp_path)
    check_resume(stage_config("run.name=r2"), fs, root)
    (tmp_path / "r2" / "step_00000002").mkdir()
    check_resume(stage_config("run.name=r2", "train.gradient_checkpointing=true"), fs, root)
    with pytest.raises(ConfigError, match="train.batch_size: 2 -> 1"):
        check_resume(stage_config("run.name=r2", "train.batch_size=1"), fs, root)


def _attempts(tmp_path, name: str, error) -> tuple[int, BaseException]:
    """Run a one-worker ``TorchTrainer`` whose worker raises ``error`` with the stage job's
    failure callback and two restarts allowed; how many times the worker ran, and what
    ``fit`` raised."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.stage import fail_fast_callback

    log = tmp_path / f"{name}.attempts"

    def loop(config):
        with open(config["log"], "a") as f:
            f.write("x")
        raise config["error"]

    trainer = TorchTrainer(
        loop,
        train_loop_config={"log": str(log), "error": error},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(tmp_path / "runs"),
            failure_config=ray.train.FailureConfig(max_failures=2),
            callbacks=[fail_fast_callback()],
        ),
    )
    with pytest.raises(Exception) as err:  # noqa: B017 - Ray Train's own error types are what is checked below
        trainer.fit()
    return len(log.read_text()), err.value


def test_an_error_a_restart_would_repeat_ends_the_run_at_once(ray_session, tmp_path):
    from jobs.stage import _not_retryable
    from jobs.stage_worker import NotRetryableError

    runs, raised = _attempts(tmp_path, "oom", NotRetryableError("rank 0 ran out of accelerator memory"))
    assert runs == 1, "a NotRetryableError must not be retried"
    fatal = _not_retryable(raised)
    assert isinstance(fatal, NotRetryableError) and "ran out of accelerator memory" in str(fatal)

    runs, raised = _attempts(tmp_path, "flaky", RuntimeError("a lost connection"))
    assert runs == 3, "any other worker error keeps its run.max_failures restarts"
    assert _not_retryable(raised) is None

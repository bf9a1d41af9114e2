"""The per-worker side of a stage job: what each Ray Train worker runs.

:func:`train_loop_per_worker` builds (or grows) the model, restores the last checkpoint and
hands the rest to :func:`run_steps`, the loop itself: one :class:`mdm.zero.ZeroTrainer`
step after another, log lines and MLflow metrics at log steps, checkpoints, sample grids.
``run_steps`` knows nothing of Ray (checkpoints go to a ``report`` callable), so it also
runs, and is tested, in a plain process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jobs.stage_config import StageConfig
from mdm.config import MDMConfig, from_dict

__all__ = [
    "train_loop_per_worker",
    "run_steps",
    "batches_from_shard",
    "SampleGrids",
    "Heartbeat",
    "NotRetryableError",
    "out_of_memory_is_fatal",
]


def _log(msg: str) -> None:
    # Not print(): Ray Train patches print in its workers to log the line and, where
    # stdout is wrapped, to print it as well, so each line reached the driver twice.
    sys.stdout.write(f"[stage] {msg}\n")
    sys.stdout.flush()


class NotRetryableError(RuntimeError):
    """A worker error that a restart from the last checkpoint would only repeat: the driver's
    failure callback (``jobs.stage.fail_fast_callback``) ends the run on it instead of spending
    ``run.max_failures`` restarts on the same error."""


@contextlib.contextmanager
def out_of_memory_is_fatal(cfg: StageConfig, rank: int, progress: Callable[[], str] = lambda: ""):
    """Turn the accelerator running out of memory into a :class:`NotRetryableError` that says
    what to change. The same config on the same card runs out again after a restart, so
    retrying it costs each restart's start-up and nothing else."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        b, acc = cfg.train.batch_size, cfg.train.grad_accum
        card = ""
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            card = f" on {props.name} ({props.total_memory / 2**30:.1f} GiB)"
        fixes = []
        if b > 1:
            fixes.append(f"--set train.batch_size={b // 2} --set train.grad_accum={2 * acc} (the same images a step)")
        if not cfg.train.gradient_checkpointing:
            fixes.append("--set train.gradient_checkpointing=true")
        fixes.append("a card with more memory")
        where = progress()
        raise NotRetryableError(
            f"rank {rank} ran out of accelerator memory{card}{' ' + where if where else ''}: {cfg.model.name} at "
            f"train.batch_size={b} per worker does not fit, and a restart would run out again, so the run stops "
            f"here (its checkpoints are kept). Re-submit the same run name with {' or '.join(fixes)}. "
            f"PyTorch said: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


class Heartbeat:
    """Tells the driver's stall watchdog that this worker is alive and where it is: at most
    one message every ``every_s`` seconds, except a new phase, which is sent at once."""

    def __init__(self, board, every_s: float = 5.0):
        self.board, self.every_s = board, every_s
        self.last, self.phase = 0.0, None

    def __call__(self, what: str, phase: str = "training") -> None:
        now = time.monotonic()
        if self.board is None or (phase == self.phase and now - self.last < self.every_s):
            return
        self.last, self.phase = now, phase
        self.board.beat.remote(what)  # fire and forget: never waits for the driver


class SampleGrids:
    """Rank 0's sample grids of the EMA weights, one PNG per resolution."""

    def __init__(self, cfg: StageConfig, device):
        self.cfg, self.device, self.pipe = cfg, device, None

    def __call__(self, step: int, ema: dict) -> list[tuple[Any, str]]:
        import torch

        from mdm.data import make_grid
        from mdm.pipeline import MDMPipeline
        from mdm.unet import MDMModel

        mcfg, tcfg = self.cfg.model, self.cfg.mlflow
        if self.pipe is None:
            self.pipe = MDMPipeline(MDMModel(mcfg.model), mcfg, self.device)
        self.pipe.model.load_state_dict(ema)
        kind = mcfg.model.conditioning.kind
        n = {"text": len(tcfg.sample_prompts), "class": len(tcfg.sample_labels)}.get(kind, 4)
        with torch.no_grad():
            images = self.pipe.generate(
                tcfg.sample_prompts if kind == "text" else None,
                num_samples=n,
                labels=tcfg.sample_labels if kind == "class" else None,
                guidance_scale=tcfg.sample_guidance if kind != "none" else 1.0,
                steps=tcfg.sample_steps,
                sampler="dpmpp_2m",
                seed=0,
            )
        top = mcfg.model.resolutions[-1]
        return [
            (make_grid(x, nrow=n, upscale_to=top), f"samples/step_{step:07d}_{r}px.png")
            for r, x in zip(mcfg.model.resolutions, images)
        ]


class _TimedBatches:
    """The batch stream, counting the seconds the loop spent waiting for its next batch.

    That wait is everything the step does not overlap: an empty read-ahead queue, the
    conversion to tensors and the caption encoding. On a GPU it can also hold a blocking
    copy's wait for kernels the step left queued. ``take()`` returns the seconds since the
    last ``take()``."""

    def __init__(self, batches: Iterator):
        self._it = iter(batches)
        self._waited = 0.0

    def __iter__(self) -> _TimedBatches:
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self._waited += time.perf_counter() - t

    def take(self) -> float:
        waited, self._waited = self._waited, 0.0
        return waited


def run_steps(
    trainer,
    batches: Iterator,
    cfg: StageConfig,
    *,
    start: int,
    world: int = 1,
    tracker=None,
    samples: Callable[[int, dict], list] | None = None,
    report: Callable[[str, int], None] | None = None,
    beat: Callable[..., None] | None = None,
    log: Callable[[str], None] = _log,
) -> None:
    """Train from step ``start`` to ``cfg.train.steps``.

    Every ``run.log_every`` steps: a log line and, on rank 0, the metrics to ``tracker``
    (which never blocks nor raises: :class:`jobs.tracking.Tracker`). The line ends with
    ``data wait W/E s``: of the window's E seconds, W went to waiting for batches
    (``data_wait_s`` in MLflow), the share of the step the data pipeline did not hide. Every
    ``run.checkpoint_every`` steps and at the last: the state into a folder handed to
    ``report(folder, step)`` (every rank, as Ray Train wants). Every ``mlflow.sample_every``
    steps and at the last: rank 0's sample grids to the tracker, *after* the checkpoint of
    that step, so a failure while sampling never costs the step's checkpoint.
    """
    from mdm.weights import save_pretrained

    rank = trainer.rank
    res = cfg.model.model.resolutions
    weights = cfg.model.diffusion.weights(len(res))
    images_per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    steps = cfg.train.steps
    batches = _TimedBatches(batches)
    t0, last_step = time.perf_counter(), start
    for _ in range(start, steps):
        per_res = trainer.train_step(batches)
        done = trainer.step
        is_last = done == steps
        if beat is not None:
            beat(f"step {done}/{steps}")
        if done % cfg.run.log_every == 0 or is_last or done == start + 1:
            per = per_res.float().cpu().tolist()  # host sync at log steps only
            elapsed = time.perf_counter() - t0
            ips = images_per_step * (done - last_step) / max(elapsed, 1e-9)
            waited = batches.take()  # of this window's `elapsed`, seconds spent getting batches
            t0, last_step = time.perf_counter(), done
            if rank == 0:
                gn, lr = trainer.grad_norm(), trainer.lr()
                total = sum(w * v for w, v in zip(weights, per))
                values = {
                    "loss": total,
                    "lr": lr,
                    "images_per_s": ips,
                    "images_per_s_per_worker": ips / world,
                    "data_wait_s": waited,
                }
                values.update({f"loss_{r}": v for r, v in zip(res, per)})
                if gn is not None:
                    values["grad_norm"] = gn
                if tracker is not None:
                    tracker.log_metrics(done, values)
                parts = " ".join(f"{r}:{v:.4f}" for r, v in zip(res, per))
                log(
                    f"step {done}/{steps} loss {total:.4f} ({parts}) lr {lr:.2e} "
                    f"grad_norm {gn if gn is None else round(gn, 3)} {ips:.1f} img/s "
                    f"data wait {waited:.2f}/{elapsed:.2f} s"
                )
        sample_now = (cfg.mlflow.sample_every > 0 and done % cfg.mlflow.sample_every == 0) or is_last
        ckpt_now = done % cfg.run.checkpoint_every == 0 or is_last
        if not (sample_now or ckpt_now):
            continue
        ema = trainer.export_ema()  # a collective under ZeRO-3: every rank calls it
        if ckpt_now:
            if beat is not None:
                beat(f"saving the checkpoint of step {done}", phase="checkpoint")
            with tempfile.TemporaryDirectory(prefix="mdm-ckpt-") as d:
                trainer.save(d)
                if rank == 0:
                    save_pretrained(trainer.module, cfg.model, Path(d) / "model", state_dict=ema)
                if report is not None:
                    report(d, done)
            if rank == 0:
                log(f"checkpoint saved at step {done}")
        if sample_now and rank == 0 and samples is not None and tracker is not None:
            if beat is not None:
                beat(f"sampling at step {done}", phase="samples")
            grids = samples(done, ema)
            for image, name in grids:
                tracker.log_image(image, name)
            log(f"sample grids of step {done} queued for MLflow ({len(grids)} resolutions)")


def batches_from_shard(shard, cfg: StageConfig, encoder, epoch_seed: int, pin: bool = False):
    """Endless :class:`mdm.training.PixelBatch` stream from this worker's dataset shard.

    The read-ahead thread turns each numpy batch into uint8 tensors and the condition
    (stacking ``text_emb`` when the shards carry it) and, with ``pin`` (a CUDA worker), pins
    them, so the training thread's copies to the GPU never wait for queued kernels. Captions
    are encoded in the training thread, on the encoder's device."""
    from dataclasses import replace

    import numpy as np
    import torch

    from mdm.conditioning import make_condition
    from mdm.training import PixelBatch
    from mdm.unet import Condition
    from pipelines.reader import EmptyEpochError, endless_batches, iter_training_batches, pixel_tensors

    res = cfg.model.model.resolutions
    ccfg = cfg.model.model.conditioning
    encode = ccfg.kind == "text" and not cfg.data.text_emb
    # Conditions are built on the encoder's device (the worker's GPU, where it has one).
    cond_device = encoder.device if encoder is not None else "cpu"

    def epoch_batches(epoch: int):
        return iter_training_batches(
            shard, cfg.train.batch_size, shuffle_buffer=cfg.data.shuffle_buffer, seed=epoch_seed + epoch
        )

    def prepare(b: dict) -> tuple[PixelBatch, list[str] | None]:  # in the read-ahead thread
        pixels = pixel_tensors(b, res)
        n = pixels[0].shape[0]
        size = torch.from_numpy(np.minimum(b["source_width"], b["source_height"]).astype("float32"))
        captions = None
        if encode:
            captions = [str(c) for c in b["caption"]]
            cond = Condition(source_size=size)  # completed by the training thread
        elif ccfg.kind == "text":  # the shards' text_emb
            emb = np.stack([np.frombuffer(x, dtype=np.float16) for x in b["text_emb"]])
            tokens = torch.from_numpy(emb.reshape(n, -1, ccfg.text_dim).astype(np.float32))
            mask = torch.arange(tokens.shape[1])[None, :] < torch.from_numpy(b["text_len"])[:, None]
            cond = Condition(tokens, mask, None, size)
        else:
            labels = b["label"].astype("int64").tolist() if ccfg.kind == "class" else None
            cond = make_condition(ccfg, n, None, labels, size)
        batch = PixelBatch(pixels, cond)
        return (batch.pin_memory() if pin else batch), captions

    try:
        # The next epoch's start (Ray Data restarts per epoch) overlaps training on queued batches.
        for _, (batch, captions) in endless_batches(epoch_batches, cfg.data.prefetch_batches, prepare):
            if captions is not None:
                enc = make_condition(ccfg, len(captions), captions, None, None, encoder, cond_device)
                # source_size stays the (pinned) host tensor: PixelBatch.to copies it asynchronously.
                batch = PixelBatch(batch.pixels, replace(enc, source_size=batch.cond.source_size))
            yield batch
    except EmptyEpochError:
        raise RuntimeError(
            f"a worker's share of {cfg.data.shards} holds fewer rows than train.batch_size="
            f"{cfg.train.batch_size}: lower the batch size or the number of workers"
        ) from None


def train_loop_per_worker(payload: dict) -> None:
    """Ray Train worker: build (or grow) the model, resume, run :func:`run_steps`."""
    import ray
    import ray.train
    import torch

    from jobs.tracking import Tracker
    from mdm.conditioning import get_text_encoder, null_condition
    from mdm.growth import grow, inner_state_dict, state_fingerprint
    from mdm.unet import MDMModel
    from mdm.zero import ZeroTrainer

    cfg = from_dict(StageConfig, payload["config"]).validate()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    beat = Heartbeat(payload.get("progress") if rank == 0 else None)
    beat(f"worker {rank} of {world} started", phase="start")
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # no oversubscription
    torch.manual_seed(cfg.train.seed)  # same fresh weights on every rank
    mcfg = cfg.model
    parent = payload.get("parent")
    if parent is not None:
        pstate = ray.get(parent["state_ref"])
        pconfig = MDMConfig.from_json(parent["config"])
        prev = MDMModel(pconfig.model)
        prev.load_state_dict(pstate)
        model = grow(prev, pconfig, mcfg)
        inherited = inner_state_dict(prev).keys()
        got = state_fingerprint({k: v for k, v in model.state_dict().items() if k in inherited})
        if got != parent["inner_sha256"]:
            raise RuntimeError(f"rank {rank}: inner weights differ from {parent['source']} after growth")
        if rank == 0:
            _log(
                f"inner weights loaded exactly from {parent['source']}: {len(pstate)} tensors, "
                f"sha256 {got[:16]}; new shell initialised (adapters at zero)"
            )
        del prev, pstate
    else:
        model = MDMModel(mcfg.model)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.scaling.use_gpu else torch.device("cpu")
    ccfg = mcfg.model.conditioning
    # The frozen text encoder encodes captions (unless the shards carry text_emb) and the
    # empty caption that caption dropout substitutes. On the worker's device: on the CPU,
    # MiniLM takes longer per batch of 128 captions than a GPU's training step.
    encoder = get_text_encoder(ccfg.text_encoder, ccfg.max_text_tokens, str(device)) if ccfg.kind == "text" else None
    null = null_condition(ccfg, 1, encoder) if ccfg.kind != "none" else None
    beat("building the DeepSpeed engine", phase="engine")
    with out_of_memory_is_fatal(cfg, rank, lambda: "while building the DeepSpeed engine"):
        trainer = ZeroTrainer(model, mcfg, cfg.train, cfg.deepspeed, null=null, device=device)

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        beat("restoring the last checkpoint", phase="restore")
        with ckpt.as_directory() as d:
            trainer.load(d)
        start = trainer.step
        if rank == 0:
            _log(f"resumed from the checkpoint of step {start}")

    tracker = None
    if rank == 0:
        # One MLflow request gives up within about a minute; the tracker retries it.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        tracker = Tracker(payload["tracking_uri"], payload["run_id"], log=_log)
    shard = ray.train.get_dataset_shard("train")
    batches = batches_from_shard(
        shard, cfg, None if cfg.data.text_emb else encoder, cfg.train.seed * 7919 + start, pin=device.type == "cuda"
    )
    beat("waiting for the first batch", phase="data")

    def report(folder: str, step: int) -> None:
        ray.train.report(
            {"step": step},
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"step_{step:08d}",
        )

    try:
        with out_of_memory_is_fatal(cfg, rank, lambda: f"in step {trainer.step + 1}"):
            run_steps(
                trainer,
                batches,
                cfg,
                start=start,
                world=world,
                tracker=tracker,
                samples=SampleGrids(cfg, device) if rank == 0 else None,
                report=report,
                beat=beat,
            )
    finally:
        if tracker is not None:
            tracker.close()

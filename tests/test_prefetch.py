"""pipelines.reader.endless_batches: the next epoch starts while queued batches train.

On an H200 each new epoch of a Ray Train dataset shard took 8-12 s to give its first
batch (Ray Data restarts its executor), and the stage jobs' step waited for it: 20-step
windows with an epoch start ran at ~150 img/s against ~285 without. These tests use an
epoch source with a slow start (no Ray: the overlap is the reader's, whatever the source).
"""

import threading
import time

import pytest

from pipelines.reader import EmptyEpochError, endless_batches

START_S = 1.0  # an epoch's start-up before its first batch
WORK_S = 0.3  # the consumer's time per batch
PER_EPOCH = 5


def slow_start_epochs(log: list):
    def epoch_batches(epoch: int):
        log.append(("start", epoch))
        time.sleep(START_S)
        for i in range(PER_EPOCH):
            yield {"epoch": epoch, "i": i}

    return epoch_batches


def boundary_waits(depth: int, epochs: int = 3) -> list[float]:
    """How long the consumer waited for the first batch of epochs 1.. (after working on each)."""
    gen = endless_batches(slow_start_epochs([]), depth)
    waits, last_epoch = [], 0
    t = time.perf_counter()
    for epoch, _ in gen:
        got = time.perf_counter()
        if epoch != last_epoch:
            waits.append(got - t)
            last_epoch = epoch
        if epoch == epochs:
            break
        time.sleep(WORK_S)
        t = time.perf_counter()
    gen.close()
    return waits


def test_the_next_epoch_starts_while_queued_batches_are_consumed():
    waits = boundary_waits(depth=8)
    # Each epoch's 1 s start ran during the 1.5 s of work on the previous epoch's batches.
    assert max(waits) < 0.5 * START_S, waits


def test_without_read_ahead_every_epoch_start_stalls_the_consumer():
    # The behaviour the read-ahead removes (and what the first test would see without it).
    waits = boundary_waits(depth=0)
    assert min(waits) > 0.9 * START_S, waits


def test_batches_arrive_in_order_with_their_epoch():
    gen = endless_batches(lambda e: iter([{"e": e, "i": i} for i in range(3)]), depth=2)
    got = [next(gen) for _ in range(9)]
    gen.close()
    assert [(e, b["e"], b["i"]) for e, b in got] == [(e, e, i) for e in range(3) for i in range(3)]


@pytest.mark.parametrize("depth", [0, 4])
def test_an_empty_epoch_is_an_error_not_a_hang(depth):
    gen = endless_batches(lambda e: iter([]), depth)
    with pytest.raises(EmptyEpochError, match="epoch 0 has no batches"):
        next(gen)


def test_a_reader_error_reaches_the_consumer():
    def broken(epoch):
        yield {"ok": 1}
        raise OSError("shard s3://b/x.parquet: connection reset")

    gen = endless_batches(broken, depth=4)
    assert next(gen) == (0, {"ok": 1})
    with pytest.raises(OSError, match="connection reset"):
        next(gen)


def test_closing_the_stream_stops_its_thread():
    log: list = []

    def forever(epoch):
        log.append(epoch)
        while True:
            yield {}

    before = {t.ident for t in threading.enumerate()}
    gen = endless_batches(forever, depth=2)
    next(gen)
    gen.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = [t for t in threading.enumerate() if t.name == "mdm-batch-reader" and t.ident not in before]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive


@pytest.mark.parametrize("depth", [0, 4])
def test_the_transform_runs_in_the_reader_thread(depth):
    # The stage jobs convert and pin each batch in ``transform``: with read-ahead that must
    # happen off the training thread, which only waits when the queue is empty.
    seen: list[int] = []

    def transform(b):
        seen.append(threading.get_ident())
        return {**b, "done": True}

    gen = endless_batches(lambda e: iter([{"i": i} for i in range(3)]), depth, transform)
    got = [next(gen) for _ in range(4)]
    gen.close()
    assert [b for _, b in got] == [{"i": i, "done": True} for i in (0, 1, 2, 0)]
    me = threading.get_ident()
    assert seen and (all(t == me for t in seen) if depth == 0 else all(t != me for t in seen)), (depth, seen, me)


def test_a_transform_error_reaches_the_consumer():
    def transform(b):
        if b["i"] == 1:
            raise ValueError("batch 1: text_emb has 383 values per token, not 384")
        return b

    gen = endless_batches(lambda e: iter([{"i": i} for i in range(3)]), 4, transform)
    assert next(gen) == (0, {"i": 0})
    with pytest.raises(ValueError, match="383 values per token"):
        next(gen)

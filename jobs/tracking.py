"""Rank 0's MLflow logging during training: off the training thread, retried, then dropped.

An MLflow outage must cost metrics and pictures, never the training run: every call is
queued and sent by one background thread; a send that fails is retried with a doubling
wait, and one that still fails is logged and dropped. Training never waits for MLflow,
except in :meth:`Tracker.close`, which waits a bounded time for what is still queued.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

__all__ = ["Tracker"]


class Tracker:
    """Metrics and images of one MLflow run, sent in the background.

    ``attempts`` sends per item, waiting ``backoff_s``, ``2 * backoff_s``, … between them;
    at most ``max_pending`` items wait (beyond, the oldest is dropped). ``sent`` and
    ``dropped`` count items.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        attempts: int = 4,
        backoff_s: float = 2.0,
        max_pending: int = 1000,
        log: Callable[[str], None] = print,
        client=None,
    ):
        if attempts < 1 or max_pending < 1:
            raise ValueError("attempts and max_pending must be >= 1")
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri)
        self.client, self.run_id, self.log = client, run_id, log
        self.attempts, self.backoff_s, self.max_pending = attempts, backoff_s, max_pending
        self.sent = self.dropped = 0
        self._queue: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ what training calls
    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self._put(f"metrics of step {step}", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def log_image(self, image, artifact_file: str) -> None:
        """``image``: a PIL image, copied now (the caller may reuse it)."""
        copy = image.copy()
        self._put(artifact_file, lambda: self.client.log_image(self.run_id, copy, artifact_file=artifact_file))

    def close(self, timeout_s: float = 120.0) -> None:
        """Wait up to ``timeout_s`` for queued items, then stop; what is left is dropped."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cv.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            left = len(self._queue)
            self._queue.clear()
            self.dropped += left
            self._closed = True
            self._cv.notify_all()
        if left:
            self.log(f"MLflow: {left} queued item(s) not sent within {timeout_s:.0f} s, dropped")
        if self.dropped:
            self.log(f"MLflow: {self.dropped} item(s) dropped in this run, {self.sent} sent")

    # ------------------------------------------------------------------ the sender
    def _put(self, what: str, send: Callable[[], None]) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the tracker is closed")
            if len(self._queue) >= self.max_pending:
                old, _ = self._queue.popleft()
                self.dropped += 1
                self.log(f"MLflow: more than {self.max_pending} items waiting; dropped {old}")
            self._queue.append((what, send))
            self._cv.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                what, send = self._queue.popleft()
                self._busy = True
            ok = self._send(what, send)
            with self._cv:
                self._busy = False
                if ok:
                    self.sent += 1
                else:
                    self.dropped += 1
                self._cv.notify_all()

    def _send(self, what: str, send: Callable[[], None]) -> bool:
        for attempt in range(1, self.attempts + 1):
            try:
                send()
                return True
            except Exception as e:  # noqa: BLE001 - any tracking failure is retried, then dropped
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if attempt == self.attempts:
                    self.log(
                        f"MLflow: could not send {what} after {attempt} attempts ({error}); dropped, training goes on"
                    )
                    return False
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        return False

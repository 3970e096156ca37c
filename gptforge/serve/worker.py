"""The engine's thread: one model per process, shared by every request through continuous batching.

The asyncio side never touches torch. It builds a Job (prompt ids + sampling params) and `submit`s it;
this thread admits queued jobs into one DecodeBatch while rows are free (max_batch_size), steps the batch,
turns each step into text deltas (textgen's TextRows: stop strings, whole UTF-8 characters) and hands
them back to the event loop in one call per step. A cancelled job (client gone, timeout) leaves the
batch before the next step, so its rows are free at once. A job that fails on its own (its sampling, its
stop strings) fails alone; only a failure of the forward pass, which every running job shares, fails them
all (503 when out of memory, else 500).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from gptforge.common import UserError, is_out_of_memory
from gptforge.engine import DecodeBatch, Engine, SamplingParams, StepOutput
from gptforge.textgen import TextRows
from gptforge.tokenizer import Tokenizer

log = logging.getLogger("gptforge.serve")


@dataclass
class RowUpdate:
    """What one row (choice) produced in one step: text safe to show, the token behind it, its logprobs."""

    row: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: Optional[str] = None


@dataclass
class Done:
    """The job has ended normally; nothing follows."""


@dataclass
class Failed:
    """The job failed in the engine; nothing follows."""

    status: int
    message: str
    code: Optional[str] = None


class Job:
    """One request's generation: rows of prompt ids that share sampling params and stop strings.
    Events (lists of RowUpdate, then Done or Failed) arrive on `events`, in the loop that built the job."""

    def __init__(self, rows: list[list[int]], params: SamplingParams, stops: list[str],
                 logprobs: Optional[int] = None):
        self.rows, self.params, self.stops, self.logprobs = rows, params, stops, logprobs
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the asyncio side; the worker drops the job before its next step
        self.finished = False  # set when Done or Failed has been queued
        self.texts: Optional[TextRows] = None  # worker side


class GenerationWorker:
    """Owns the engine and its thread; `submit` and `cancel` may be called from any thread."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, max_batch_size: int):
        self.engine, self.tokenizer, self.max_batch_size = engine, tokenizer, max_batch_size
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # by DecodeBatch group id; touched by the worker thread only
        self._stopping = False
        self._thread = threading.Thread(target=self._serve_forever, name="gptforge-engine", daemon=True)

    # --- any thread -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job's generation: it leaves the batch before the next step (or never enters it)."""
        job.cancelled = True

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    # --- the worker thread ------------------------------------------------------------------------------
    def _serve_forever(self) -> None:
        batch = DecodeBatch(self.engine)
        while True:
            with self._cond:
                while not self._stopping and not self._queue and not batch.groups:
                    self._cond.wait()
                if self._stopping:
                    return
                joining = self._take_jobs(batch.n_rows)
            posts: list[tuple[Job, object]] = []
            for job in joining:
                self._start(batch, job, posts)
            try:
                self._drop_cancelled(batch)
                steps = batch.step() if batch.groups else {}
            except Exception as e:  # noqa: BLE001 - the forward pass is shared: all its jobs fail, the thread goes on
                self._fail_running(e, posts)
                batch, steps = DecodeBatch(self.engine), {}
            for gid, step in steps.items():
                self._updates(batch, gid, step, posts)
            self._post(posts)

    def _take_jobs(self, rows_in_use: int) -> list[Job]:
        """Queued jobs that fit in the batch, first come first served (a job too big to ever fit starts
        alone, so it cannot wait forever)."""
        taken = []
        while self._queue:
            job = self._queue[0]
            if job.cancelled:
                self._queue.popleft()
                continue
            if rows_in_use and rows_in_use + len(job.rows) > self.max_batch_size:
                break
            taken.append(self._queue.popleft())
            rows_in_use += len(job.rows)
        return taken

    def _start(self, batch: DecodeBatch, job: Job, posts: list) -> None:
        """Add a job to the batch; a job that cannot start fails alone."""
        try:
            job.texts = TextRows(self.tokenizer, len(job.rows), job.stops)
            gid = batch.add(job.rows, job.params, job.texts.stop_check, job.logprobs)
        except UserError as e:
            posts.append((job, Failed(400, str(e))))
            return
        except Exception as e:  # noqa: BLE001
            posts.append((job, _failure(e)))
            return
        if batch.is_running(gid):
            self._running[gid] = job
        else:  # nothing to generate
            posts.append((job, Done()))

    def _drop_cancelled(self, batch: DecodeBatch) -> None:
        for gid, job in list(self._running.items()):
            if job.cancelled:
                batch.cancel(gid)
                del self._running[gid]

    def _updates(self, batch: DecodeBatch, gid: int, step: StepOutput, posts: list) -> None:
        """Turn one job's step into text updates. A job whose step failed (in the engine, or in its text
        here) fails alone: its neighbours in the batch go on."""
        job = self._running[gid]
        try:
            if step.error is not None:
                raise step.error
            updates = self._row_updates(job, step)
        except Exception as e:  # noqa: BLE001
            batch.cancel(gid)
            del self._running[gid]
            posts.append((job, _failure(e)))
            return
        if updates:
            posts.append((job, updates))
        if not batch.is_running(gid):
            del self._running[gid]
            posts.append((job, Done()))

    @staticmethod
    def _row_updates(job: Job, step: StepOutput) -> list[RowUpdate]:
        updates: dict[int, RowUpdate] = {}
        for b, tok in enumerate(step.tokens):
            if tok is not None:
                u = updates[b] = RowUpdate(b, tokens=[tok])
                if step.logprobs is not None:
                    u.logprobs = [step.logprobs[b]]
                if step.top_logprobs is not None:
                    u.top_logprobs = [step.top_logprobs[b]]
        newly_ended = [b for b, why in enumerate(step.finished) if why and not job.texts.rows[b].closed]
        for b, delta in job.texts.update(step):
            updates.setdefault(b, RowUpdate(b)).text = delta
        for b in newly_ended:
            updates.setdefault(b, RowUpdate(b)).finish_reason = step.finished[b]
        return [updates[b] for b in sorted(updates)]

    def _fail_running(self, error: Exception, posts: list) -> None:
        failed = _failure(error)
        for job in self._running.values():
            posts.append((job, failed))
        self._running.clear()

    def _post(self, posts: list[tuple[Job, object]]) -> None:
        """Hand this step's events to the event loop: one wake-up per loop, not one per job."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, event in posts:
            if isinstance(event, (Done, Failed)):
                job.finished = True
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed (shutdown): nobody is listening any more
                pass


def _failure(error: Exception) -> Failed:
    """What a job hears when the engine fails on it: out of memory is the server's state (503); anything
    else is a bug, logged with its traceback."""
    if is_out_of_memory(error):
        return Failed(503, "the server ran out of memory while generating; retry with fewer or shorter requests",
                      "out_of_memory")
    log.error("generation failed", exc_info=error)
    return Failed(500, f"generation failed: {type(error).__name__}: {error}", "engine_error")


def _deliver(items: list[tuple[Job, object]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)

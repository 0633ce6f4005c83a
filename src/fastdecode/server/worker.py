"""The one loop that runs the model: it owns the scheduler and steps it while work remains.

Web handlers submit jobs from the event loop (thread-safe); the worker admits them between steps,
and each request's text pieces and final result come back through the callbacks it was given
(which hand them to the event loop). A cancelled job leaves the batch before the next step.

`fastdecode serve` runs this loop on the main thread and the web server beside it (server/serve.py):
PyTorch's small parallel ops run several times slower from a secondary thread here (an
OpenMP team per thread), which halved a single stream's speed when the model ran on one.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..scheduler import Request, Scheduler
from ..served import ServedModel


@dataclass
class Job:
    prompt_ids: list[int]
    params: object  # SamplingParams
    drafter: object  # a fresh Drafter for this request
    on_text: Callable[[str], None]
    on_done: Callable[[object], None]  # GenerationResult, or an Exception when the step failed
    on_release: Callable[[], None] = lambda: None  # the job is over (done, failed or cancelled)
    on_tokens: Callable[[list], None] | None = None  # each step's committed TokenInfo list (logprobs, provenance)
    request: Request | None = None
    cancelled: bool = False
    scheduled_at: float | None = None  # perf_counter() at the start of the first step that ran it (queue time)


class Worker:
    def __init__(self, served: ServedModel, max_batch: int, step_tokens: int, kv_budget_bytes: int | None = None,
                 prefix_cache: bool = True):
        self.scheduler = Scheduler(served, max_batch=max_batch, step_tokens=step_tokens, kv_budget_bytes=kv_budget_bytes,
                                   prefix_cache=prefix_cache)
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[int, Job] = {}  # id(request) -> job
        self._accepted = 0  # jobs submitted and not yet done (the inbox's included)
        self._lock = threading.Lock()
        self._stopping = False
        self.draining = False

    def submit(self, job: Job) -> None:
        with self._lock:
            self._accepted += 1
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._inbox.put(None)  # wake the worker if it sleeps

    def stop(self) -> None:
        """Leave the loop after the current step; running requests are abandoned."""
        self._stopping = True
        self._inbox.put(None)

    def drain(self) -> None:
        """Take no new jobs (the app answers 503) and leave the loop once every accepted one is done."""
        self.draining = True
        self._inbox.put(None)

    @property
    def active(self) -> int:
        """Jobs accepted and not finished: running, waiting for a slot, or not yet admitted."""
        return self._accepted

    def start(self) -> threading.Thread:
        """Run the loop on a background thread (tests, or embedding the app in another server)."""
        thread = threading.Thread(target=self.run, name="fastdecode-worker", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Step the scheduler until stop(), or until drain() and nothing is left."""
        while not self._stopping and not (self.draining and self._accepted == 0):
            self._admit(block=self.scheduler.idle)
            self._drop_cancelled()
            if self.scheduler.idle:
                continue
            started = time.perf_counter()
            try:
                finished = self.scheduler.step()
                self._mark_scheduled(started, finished)
            except Exception as exc:  # a failed step fails the requests in it, never the server
                for key in list(self._jobs):
                    self._finish(key, exc, cancel=True)
                continue
            for request in finished:
                self._finish(id(request), request.result)

    def _mark_scheduled(self, started: float, finished: list[Request]) -> None:
        """The jobs this step ran for the first time get its start as their scheduled time."""
        ran = {id(r) for r in self.scheduler.running} | {id(r) for r in finished}
        for key, job in self._jobs.items():
            if job.scheduled_at is None and key in ran:
                job.scheduled_at = started

    def _finish(self, key: int, outcome, cancel: bool = False) -> None:
        job = self._jobs.pop(key)
        if cancel:
            self.scheduler.cancel(job.request)
        self._retire(job, outcome)

    def _retire(self, job: Job, outcome=None) -> None:
        with self._lock:
            self._accepted -= 1
        if not isinstance(outcome, Exception):  # a drafter from a failed step is not reused
            job.on_release()
        if outcome is not None:
            job.on_done(outcome)

    def _admit(self, block: bool) -> None:
        while True:
            try:
                job = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if job is None:
                continue
            if job.cancelled:
                self._retire(job)
                continue
            try:
                job.request = self.scheduler.submit(job.prompt_ids, job.params, job.drafter, job.on_text, job.on_tokens)
            except Exception as exc:  # e.g. a prompt the engine refuses: that request fails, not the worker
                self._retire(job, exc)
                continue
            self._jobs[id(job.request)] = job

    def _drop_cancelled(self) -> None:
        for key, job in list(self._jobs.items()):
            if job.cancelled:
                self._finish(key, None, cancel=True)

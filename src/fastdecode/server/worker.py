"""The one thread that runs the model: it owns the scheduler and steps it while work remains.

Web handlers submit jobs from the event loop (thread-safe); the worker admits them between steps,
and each request's text pieces and final result come back through the callbacks it was given
(which hand them to the event loop). A cancelled job leaves the batch before the next step.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

from ..scheduler import Request, Scheduler


@dataclass
class Job:
    prompt_ids: list[int]
    params: object  # SamplingParams
    drafter: object  # a fresh Drafter for this request
    on_text: Callable[[str], None]
    on_done: Callable[[object], None]  # GenerationResult, or an Exception when the step failed
    request: Request | None = None
    cancelled: bool = False


class Worker:
    def __init__(self, engine, max_batch: int, step_tokens: int):
        self.scheduler = Scheduler(engine, max_batch=max_batch, step_tokens=step_tokens)
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[int, Job] = {}  # id(request) -> job
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="fastdecode-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._inbox.put(None)  # wake the worker if it sleeps

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)

    @property
    def active(self) -> int:
        return len(self._jobs)

    def _admit(self, block: bool) -> None:
        while True:
            try:
                job = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if job is None or job.cancelled:
                continue
            try:
                job.request = self.scheduler.submit(job.prompt_ids, job.params, job.drafter, job.on_text)
            except Exception as exc:  # e.g. a prompt the engine refuses: that request fails, not the worker
                job.on_done(exc)
                continue
            self._jobs[id(job.request)] = job

    def _drop_cancelled(self) -> None:
        for key, job in list(self._jobs.items()):
            if job.cancelled:
                self.scheduler.cancel(job.request)
                del self._jobs[key]

    def _loop(self) -> None:
        while not self._stopping:
            self._admit(block=self.scheduler.idle)
            self._drop_cancelled()
            if self.scheduler.idle:
                continue
            try:
                finished = self.scheduler.step()
            except Exception as exc:  # a failed step fails the requests in it, never the server
                for job in self._jobs.values():
                    self.scheduler.cancel(job.request)
                    job.on_done(exc)
                self._jobs.clear()
                continue
            for request in finished:
                self._jobs.pop(id(request)).on_done(request.result)

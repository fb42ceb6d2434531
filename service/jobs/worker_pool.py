"""Worker processes kept warm: one started ahead of time, and reused after small jobs.

A worker process costs seconds to start (Python, torch, the engine), far more than a small
merge. So workers run in *standby* mode: each announces on its standard output that it is
ready, reads one job (a JSON line) from its standard input, runs it, and announces again.
A worker that ran a large job (peak memory above a threshold) or many jobs exits instead,
so memory returned by a big merge goes back to the system. The pool keeps one ready worker
spare, so the next job starts at once; crashes still end only the job of that process.

All communication is two pipes per process; nothing secret and nothing pickled crosses
them: a job id and an output path.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

READY = b"tureen-worker-ready\n"


@dataclass(eq=False)
class PooledWorker:
    """One worker process and what it is doing.

    Attributes:
        process: the process.
        job_id: the job it runs, or None while it waits for one.
        ready: whether it has announced it can take a job.
    """

    process: subprocess.Popen[bytes]
    job_id: str | None = None
    ready: bool = False
    _reader: threading.Thread | None = field(default=None, repr=False)


class WorkerPool:
    """Starts, hands out and takes back worker processes.

    Args:
        command: the command line of a standby worker.
        environment: its environment.
        on_free: called with a job id when the worker that ran it is ready for another (the
            job's outcome is recorded by then).
        on_exit: called when a worker process ends.
        spare: ready workers to keep started ahead of time (0: start one per job).
    """

    def __init__(
        self,
        command: Callable[[], Sequence[str]],
        environment: dict[str, str],
        *,
        on_free: Callable[[str], None],
        on_exit: Callable[[], None],
        spare: int = 1,
    ) -> None:
        self.command = command
        self.environment = environment
        self.on_free = on_free
        self.on_exit = on_exit
        self.spare = spare
        self._lock = threading.Lock()
        self._idle: list[PooledWorker] = []
        self._stopping = False

    def start(self) -> None:
        """Start the spare workers."""
        self._stopping = False
        self._top_up()

    def stop(self, timeout: float = 5.0) -> None:
        """End the idle workers (busy ones belong to their jobs' caller)."""
        with self._lock:
            self._stopping = True
            idle, self._idle = self._idle, []
        for worker in idle:
            _close_input(worker)
        for worker in idle:
            try:
                worker.process.wait(timeout)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()

    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)

    def run(
        self,
        job_id: str,
        output: Path,
        on_handover: Callable[[subprocess.Popen[bytes]], None],
    ) -> subprocess.Popen[bytes]:
        """Give a job to an idle worker, or to a new one; returns its process.

        Args:
            job_id: the claimed job.
            output: its output folder.
            on_handover: called with the worker's process just before the job is sent to it.
                A job can end, and its worker announce itself free (``on_free``), before this
                method returns, so the caller must take note of the busy worker here.

        Raises:
            OSError: no worker process could be started.
        """
        line = json.dumps({"job_id": job_id, "output": str(output)}).encode() + b"\n"
        while True:
            worker = self._take(job_id)
            on_handover(worker.process)
            try:
                assert worker.process.stdin is not None
                worker.process.stdin.write(line)
                worker.process.stdin.flush()
            except OSError:  # it died while idle: try the next one
                worker.process.kill()
                worker.process.wait()
                continue
            if self.spare == 0:
                _close_input(worker)  # one job per process: it exits after this one
            self._top_up()
            return worker.process

    def _take(self, job_id: str) -> PooledWorker:
        with self._lock:
            self._idle = [w for w in self._idle if w.process.poll() is None]
            if self._idle:
                # A worker that has announced itself first: it starts the job at once.
                worker = next((w for w in self._idle if w.ready), self._idle[0])
                self._idle.remove(worker)
                # Under the lock, like the reader's handling of its announcements: it must
                # never take a start-up announcement for the end of this job, or the reverse.
                worker.job_id = job_id
                return worker
        return self._start(job_id)

    def _top_up(self) -> None:
        with self._lock:
            missing = 0 if self._stopping else self.spare - len(self._idle)
        for _ in range(max(0, missing)):
            try:
                worker = self._start(None)
            except OSError:
                log.warning("cannot start a spare worker; jobs will start cold", exc_info=True)
                return
            with self._lock:
                self._idle.append(worker)

    def _start(self, job_id: str | None) -> PooledWorker:
        process = subprocess.Popen(
            list(self.command()),
            env=self.environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # A session of its own, so a terminal's Ctrl-C reaches the service, which then
            # decides the workers' fate, rather than killing them under it.
            start_new_session=True,
        )
        worker = PooledWorker(process, job_id=job_id)
        worker._reader = threading.Thread(
            target=self._listen, args=(worker,), name=f"tureen-worker-{process.pid}", daemon=True
        )
        worker._reader.start()
        return worker

    def _listen(self, worker: PooledWorker) -> None:
        assert worker.process.stdout is not None
        for line in worker.process.stdout:
            if line != READY:
                continue  # anything else a library printed
            with self._lock:
                if not worker.ready and worker.job_id is not None:
                    worker.ready = True  # its first announcement, after a job was handed over
                    continue
                finished, worker.job_id = worker.job_id, None
                worker.ready = True
                if finished is None:
                    continue
                # The worker just used is surely warm: it goes first. Beyond the spare and
                # this one, idle workers only hold memory, so extra ones exit.
                keep = not self._stopping and self.spare > 0 and len(self._idle) <= self.spare
                if keep:
                    self._idle.insert(0, worker)
            if not keep:
                _close_input(worker)
            self.on_free(finished)
        worker.process.wait()
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
        self.on_exit()


def _close_input(worker: PooledWorker) -> None:
    try:
        if worker.process.stdin is not None:
            worker.process.stdin.close()
    except OSError:
        pass

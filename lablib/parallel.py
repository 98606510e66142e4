"""Independent jobs of one notebook in worker processes, so a sweep of small models uses every core.

Notable here:
- `map_jobs(fn, jobs, context, workers=N)` returns `[fn(context, *job) for job in jobs]`, in the
  jobs' order. With `workers == 1` that is exactly what it runs, here. Otherwise it runs them in
  N spawned interpreters (so it works from a notebook kernel too; `fn` must be a module-level
  function of an importable module), and `context`, the large shared input (the data), is
  pickled once per worker rather than once per job.
- Each worker gets `cpu_count // N` torch threads (at least one), also exported as
  LABLIB_NUM_THREADS, which `lablib.train` reads: side-by-side jobs that each take every core
  fight over them (see `lablib.train.resolve_hardware`).
- The first job that raises stops the queue: pending jobs are cancelled, the workers are
  ended, and the error comes back as a `JobFailed` naming the job, chained to the worker's
  error. A KeyboardInterrupt (or `lablib`'s SIGTERM) in the caller ends the workers the same way.
- Arguments and results travel by pickle: pass state dicts and plain data, not modules.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

_context: Any = None


class JobFailed(RuntimeError):
    """A job raised in its worker; `__cause__` is the worker's error."""


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _init_worker(context: Any, threads: int) -> None:
    global _context
    os.environ["LABLIB_NUM_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    _context = context


def _call(fn: Callable[..., Any], job: tuple) -> Any:
    return fn(_context, *job)


def map_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], context: Any = None, *, workers: int = 1,
             desc: str = "jobs", progress: bool = True, name: Callable[[tuple], str] = repr) -> list[Any]:
    """`[fn(context, *job) for job in jobs]`, run by `workers` processes side by side."""
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers: expected an integer >= 1, got {workers}")
    jobs = [tuple(job) for job in jobs]
    results: list[Any] = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        if workers == 1 or len(jobs) <= 1:
            for k, job in enumerate(jobs):
                results[k] = fn(context, *job)
                bar.update()
            return results
        n = min(workers, len(jobs))
        pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(context, threads_per_worker(n)))
        try:
            futures = {pool.submit(_call, fn, job): k for k, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    k = futures[future]
                    error = future.exception()
                    if error is not None:
                        raise JobFailed(f"{desc}: job {name(jobs[k])} failed: {type(error).__name__}: {error}") \
                            from error
                    results[k] = future.result()
                    bar.update()
        except BaseException:
            for process in list((pool._processes or {}).values()):  # a running job is not cancellable otherwise
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return results

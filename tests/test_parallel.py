"""`lablib.parallel.map_jobs`: the same results whatever the number of workers, errors that name their job."""

import os

import pytest

from lablib.parallel import JobFailed, map_jobs, threads_per_worker


def scaled(context, x, y):
    return context["scale"] * x + y


def fails_on_three(context, x):
    if x == 3:
        raise ValueError("three is refused")
    return x


def worker_threads(context, _):
    import torch

    return os.environ.get("LABLIB_NUM_THREADS"), torch.get_num_threads(), os.getpid()


def test_workers_return_what_a_loop_returns_in_the_jobs_order():
    jobs = [(x, -x % 3) for x in range(7)]
    loop = [scaled({"scale": 10}, *job) for job in jobs]
    assert map_jobs(scaled, jobs, {"scale": 10}, workers=1, progress=False) == loop
    assert map_jobs(scaled, jobs, {"scale": 10}, workers=2, progress=False) == loop


def test_a_failing_job_is_named_and_its_error_kept():
    with pytest.raises(JobFailed, match=r"job \(3,\) failed: ValueError: three is refused") as info:
        map_jobs(fails_on_three, [(x,) for x in range(6)], workers=2, progress=False)
    assert isinstance(info.value.__cause__, ValueError)


def test_each_worker_gets_its_share_of_the_cores():
    out = map_jobs(worker_threads, [(k,) for k in range(4)], workers=2, progress=False)
    share = threads_per_worker(2)
    assert {(env, n) for env, n, _ in out} == {(str(share), share)}
    assert os.getpid() not in {pid for _, _, pid in out}


def test_zero_workers_is_refused():
    with pytest.raises(ValueError, match="workers: expected an integer >= 1, got 0"):
        map_jobs(scaled, [(1, 2)], {"scale": 1}, workers=0)

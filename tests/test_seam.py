"""The seam to arq's internals (workers.arq_seam): what it relies on is still there and
still the same. An arq upgrade fails here, saying what to check again."""

from __future__ import annotations

import hashlib
import inspect
import re
import tomllib
from pathlib import Path

import arq
import pytest
from arq import Worker, constants

from tests.conftest import REPO
from workers import arq_seam

PINNED = "0.28.0"

# The arq functions whose behaviour the seam relies on, the hash of their source in the
# pinned arq, and what to check again when it changes.
RELIED_ON = {
    "__init__": ("edfb0cd7e05e77cf",
                 "the attributes allow_pick_jobs, job_counter, max_jobs and aborting_tasks "
                 "still exist; in_progress_timeout_s is still the job timeout + 10 s "
                 "(arq_seam.in_progress_ttl_ms); SIGTERM/SIGINT still go to self.handle_sig"),
    "main": ("45ca1591c9717466", "the poll loop still calls self._poll_iteration() each time"),
    "_poll_iteration": ("f8d39d823a0a59f2",
                        "it still starts the jobs whose score is <= now (parked jobs, scored "
                        "in the far future, stay put; daemon.schedule), only while "
                        "allow_pick_jobs and job_counter < max_jobs, then cancels aborted jobs"),
    "_cancel_aborted_jobs": ("54575eaf8682f95b",
                             "it still adds the job id to aborting_tasks right after "
                             "task.cancel(), before any await (arq_seam.abort_requested)"),
    "start_jobs": ("b45797cfa40bed7f",
                   "a job whose score is in the future is still not started, and the "
                   "in-progress key is still <in_progress_key_prefix><job id>"),
    "run_job": ("589a19059ff84ee7",
                "the job timeout still cancels the job's task (a backstop only: the worker "
                "times jobs out itself); a CancelledError outside aborting_tasks still puts "
                "the job back in the queue (a shutdown's rerun); Retry(defer) still re-scores"),
    "handle_sig": ("985ff7ba01aa8f04",
                   "it still cancels the running jobs' tasks (arq_seam.SeamWorker.handle_sig "
                   "records the shutdown before calling it)"),
    "close": ("5bcc9cb356680829", "it still calls handle_sig when arq handles no signals"),
}

# arq's Redis layout, used by workers.arq_seam, daemon.schedule and daemon.queue.
LAYOUT = {
    "default_queue_name": "arq:queue",
    "in_progress_key_prefix": "arq:in-progress:",
    "abort_jobs_ss": "arq:abort",
    "job_key_prefix": "arq:job:",
}


def test_the_installed_arq_is_the_pinned_one():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"arq=={PINNED}" in project["project"]["dependencies"]
    constraints = REPO / "constraints.txt"
    if re.search(r"(?im)^arq==", constraints.read_text()):
        assert re.search(rf"(?im)^arq=={re.escape(PINNED)}\s*$", constraints.read_text())
    assert arq.VERSION == PINNED, (
        f"arq {arq.VERSION} is installed, the seam was checked against {PINNED}: see the "
        "other tests here for what to check again, then update PINNED")


@pytest.mark.parametrize("name", sorted(RELIED_ON))
def test_what_the_seam_relies_on_in_arq_is_unchanged(name):
    pinned, what = RELIED_ON[name]
    source = inspect.getsource(getattr(Worker, name))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == pinned, (
        f"arq's Worker.{name} changed (arq {arq.VERSION}; the seam was checked against "
        f"{PINNED}). Check again in workers/arq_seam.py that {what}. Then set its hash "
        f"in tests/test_seam.py to {digest!r}.")


def test_the_private_methods_overridden_have_the_expected_signatures():
    assert list(inspect.signature(Worker._poll_iteration).parameters) == ["self"]
    assert inspect.iscoroutinefunction(Worker._poll_iteration)
    assert list(inspect.signature(Worker.handle_sig).parameters) == ["self", "signum"]
    assert not inspect.iscoroutinefunction(Worker.handle_sig)
    # The seam overrides nothing else of arq's.
    own = {name for name in vars(arq_seam.SeamWorker) if not name.startswith("__")}
    assert own & set(dir(Worker)) == {"_poll_iteration", "handle_sig"}


async def test_the_attributes_read_exist_with_the_expected_values():
    worker = arq_seam.SeamWorker(functions=[arq.func(_nothing, name="nothing")],
                                 job_timeout=5, max_jobs=1, handle_signals=False)
    assert worker.allow_pick_jobs is True and worker.job_counter == 0 and worker.max_jobs == 1
    assert worker.aborting_tasks == set() and worker.stopping == ""
    assert worker.idle and not worker.abort_requested("x")
    assert arq_seam.in_progress_ttl_ms(5) == worker.in_progress_timeout_s * 1000
    worker.take_jobs(False)
    assert not worker.idle
    worker.job_counter, worker.allow_pick_jobs = 1, True
    assert not worker.idle


def test_the_redis_layout_is_unchanged():
    for name, value in LAYOUT.items():
        assert getattr(constants, name) == value, (
            f"arq.constants.{name} is now {getattr(constants, name)!r}: check "
            "workers/arq_seam.py, daemon/schedule.py and daemon/queue.py, which use it")
    assert LAYOUT["in_progress_key_prefix"] == arq_seam.IN_PROGRESS_PREFIX


def test_no_other_worker_module_touches_arqs_internals():
    private = re.compile(r"_poll_iteration|aborting_tasks|allow_pick_jobs|job_counter|"
                         r"in_progress_key_prefix|\bhandle_sig\b|in_progress_timeout_s")
    seam = Path(arq_seam.__file__).resolve()
    for path in sorted((REPO / "workers").rglob("*.py")):
        if path.resolve() != seam:
            assert not private.search(path.read_text()), f"{path}: use workers.arq_seam"


async def _nothing(ctx):
    return None

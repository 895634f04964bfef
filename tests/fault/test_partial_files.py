"""The folder delivery's crash window, made deterministic: the daemon is SIGKILLed while
it copies a result into done/. Every file lands by write-to-temp then rename, so nobody
sees half a file; what is left of the temp file after the kill must not stay behind in
done/ either. A 200 MB result (from a command pipeline) makes the copy long enough to
be caught in the act."""

from __future__ import annotations

import sys
import time

import pytest

from tests.conftest import wait_for
from tests.fault.stack import drop, fault_config, hidden_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RESULT_MB = 200
WRITE_RESULT = (f"import sys; open(sys.argv[1] + '/result.bin', 'wb')"
                f".write(b'\\\\0' * {RESULT_MB} * 1024 * 1024)")


def big_result_pipeline() -> str:
    return (f'type = "command"\ninputs = ["text"]\n'
            f'command = ["{sys.executable}", "-c", "{WRITE_RESULT}", "{{outdir}}"]\n'
            'outputs = ["result.bin"]\ngpu = false')


def test_a_daemon_killed_mid_copy_leaves_no_temp_file_in_done(tmp_path, redis_url, start):
    config_file = fault_config(
        tmp_path, redis_url,
        **{"intake.folder": 'path = "inbox"\nkind = "big"\nsettle = "0.5s"\nmax_file_mb = 1',
           "pipelines.big": big_result_pipeline()})
    daemon = start(config_file, "daemon")
    start(config_file, "worker")
    inbox, done = tmp_path / "inbox", tmp_path / "inbox" / "done"
    wait_for(lambda: "daemon ready" in daemon.log(), timeout=30, what="the daemon")
    drop(inbox, "large.txt", b"make something large")

    caught = wait_for(lambda: hidden_files(done), timeout=60, interval=0.002,
                      what="the delivery's temp file in done/")
    daemon.kill()
    print(f"\nkilled the daemon while done/ held {[p.name for p in caught]}")
    start(config_file, "daemon")
    wait_for(lambda: (done / "large.txt").exists(), timeout=60, what="the redone delivery")
    time.sleep(0.5)

    assert (done / "large.bin").stat().st_size == RESULT_MB * 1024 * 1024
    left = hidden_files(done)
    assert not left, f"left in done/: {[(p.name, p.stat().st_size) for p in left]}"

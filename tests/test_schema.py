"""Schemathesis against the served OpenAPI document, with every check: the document must
say exactly what the real app (real Redis, no worker: jobs stay queued) accepts and
answers. Its phases (examples, coverage, fuzzing, stateful) run a bounded number of
examples from a fixed seed.

Two answers the document states but the checks would count against it, each allowed
where it is and nowhere else:

- ``GET /healthz`` answers 503 while no worker is alive, which is always here;
- ``POST /jobs`` answers 422 with no field named where a kind's ``check_request``
  refuses a combination of fields (a video with neither a prompt nor scenes; scenes
  that do not add up to the duration) or a model validator compares two options: rules
  across fields, which JSON Schema cannot state; and for the rules of a field the kind
  checks in a validator without publishing them (``UNSTATED``).

``use_after_free`` is left out: ``DELETE /jobs/{id}`` cancels a job, whose record (now
``cancelled``) stays readable, as the document says.

The hooks below are loaded into the schemathesis run through SCHEMATHESIS_HOOKS."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import schemathesis

from daemon.compose import read_config
from tests.conftest import REPO, free_port, http_api_in_a_thread, write_config

pytestmark = pytest.mark.timeout(170)

SEED = 20261205
MAX_EXAMPLES = 25
# Rules JSON Schema cannot state: a file part's name must end in a suffix the kind
# takes; a model validator compares options (long_exposure's mask_low < mask_high,
# named "options.option", as the core names a whole-model error).
UNSTATED = re.compile(r"file|options\.option")
CONFIG = """\
[[operations]]
include-path = "/healthz"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]

[[operations]]
include-path = "/jobs"
include-method = "POST"
# 2xx, 3xx, 401, 403, 404, 409, 429, 5xx: the defaults, and 422 (checked below)
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
"""


@schemathesis.check
def jobs_refused_only_across_fields(ctx, response, case):
    """What positive_data_acceptance no longer checks for POST /jobs: a schema-valid job
    answered 422 must be refused by a rule across fields, which names no one field."""
    if (case.operation.label == "POST /jobs" and case.meta is not None
            and case.meta.generation.mode.is_positive and response.status_code == 422):
        problems = [p for p in response.json()["error"]["problems"]
                    if not UNSTATED.fullmatch(p["field"])]
        assert problems == [], f"a schema-valid job refused for its fields: {problems}"
    return None


@pytest.fixture
def server(tmp_path, redis_url):
    port = free_port()
    config = read_config(write_config(tmp_path, redis_url, **{"intake.http": (
        f'enabled = true\nlisten = "127.0.0.1:{port}"\nmax_body_mb = 1\n'
        '[[intake.http.tokens]]\nname = "root"\ntoken = "root-secret"\nrole = "admin"')}))
    with http_api_in_a_thread(config, port):
        yield port


def test_the_served_schema_holds_under_every_check(server, tmp_path):
    settings = tmp_path / "schemathesis.toml"
    settings.write_text(CONFIG)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; "
         "sys.exit(schemathesis())", "--config-file", str(settings), "--no-color",
         "run", f"http://127.0.0.1:{server}/openapi.json",
         "-H", "Authorization: Bearer root-secret", "--checks", "all",
         "--exclude-checks", "use_after_free",
         "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED)],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.test_schema",
             "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-12_000:]
    assert "Operations:       10 selected / 10 total" in report, report[-4000:]
    assert time.monotonic() - started < 60, report[-2000:]
    print(f"schemathesis: {time.monotonic() - started:.1f} s", report.splitlines()[-1])


"""Throw random JSON (and random bytes) at POST /jobs: the answer is always a 2xx or a
4xx with reelqueue's error body, never a 5xx and never a traceback."""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.compose import read_config
from tests.conftest import free_port, http_api_in_a_thread, write_config

pytestmark = pytest.mark.timeout(300)

scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=30)
           | st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=10), children, max_size=4),
                           max_leaves=12)
option_names = st.sampled_from(["duration", "width", "height", "fps", "style", "seed",
                                "scenes", "crf", ""])
scene = st.dictionaries(st.sampled_from(["description", "duration_s", "camera", "subtitle"]),
                        json_values | st.sampled_from(["close up", "wide shot"]))
options = st.dictionaries(option_names, json_values | st.integers(-10, 5000)
                          | st.lists(scene, max_size=9), max_size=4)
jobs = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["video", "VIDEO", "", "../video"]) | json_values,
    "prompt": st.text(max_size=200) | json_values,
    "options": options | json_values,
    "extra": json_values,
})
bodies = (jobs.map(lambda d: json.dumps(d, allow_nan=True).encode())
          | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())
          | st.binary(max_size=200))


@pytest.fixture
def server(tmp_path, redis_url):
    port = free_port()
    config = read_config(write_config(tmp_path, redis_url, **{"intake.http": (
        f'enabled = true\nlisten = "127.0.0.1:{port}"\n'
        '[[intake.http.tokens]]\nname = "fuzz"\ntoken = "fuzz-secret"')}))
    with http_api_in_a_thread(config, port):
        yield port


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies)
def test_random_bodies_never_cause_a_server_error(server, body):
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    try:
        connection.request("POST", "/jobs", body=body, headers={
            "Authorization": "Bearer fuzz-secret", "Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    assert response.status < 500, payload
    assert response.status in (202, 413, 422), (response.status, payload)
    if response.status != 202:
        error = json.loads(payload)["error"]
        assert error["message"] and error["request_id"]
        assert "Traceback" not in error["message"]

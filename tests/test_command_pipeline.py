"""Command pipelines: research CLIs declared in config, run as job kinds, with the
scripts in tests/fixtures/ standing in for research code."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon.compose import read_config
from daemon.config import ConfigError
from daemon.jobs import JobError, JobSpec, Source, job_dir
from intake.folder_answers import deliver
from tests.conftest import write_config
from workers.pipelines import kind_registry
from workers.runner import Cancellation, run_job_sync

FIXTURES = Path(__file__).parent / "fixtures"


def pipeline_table(script: str, *args: str, timeout: str = "30s", **extra: str) -> str:
    argv = json.dumps([sys.executable, str(FIXTURES / script), *args])
    lines = ['type = "command"', 'inputs = ["video", ".bin"]', f"command = {argv}",
             'outputs = ["*.bin", "*.json", "*.mp4"]', f'timeout = "{timeout}"']
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines)


@pytest.fixture
def make_config(tmp_path):
    def make(**pipelines: str):
        return read_config(write_config(tmp_path, "", **{f"pipelines.{name}": body
                                                         for name, body in pipelines.items()}))
    return make


def submit(config, kind, prompt="", data=b"input bytes", name="clip.mp4"):
    spec = JobSpec(id=f"cmd{abs(hash((kind, prompt, time.time_ns()))) % 10**12}", kind=kind,
                   prompt=prompt, inputs=[name] if data is not None else [],
                   options=kind_registry(config).validate(kind, prompt, {}, [name]),
                   source=Source(channel="cli"))
    directory = job_dir(config.jobs_dir, spec.id)
    if data is not None:
        (directory / "inputs").mkdir(parents=True)
        (directory / "inputs" / name).write_bytes(data)
    return spec, directory


def test_success_collects_outputs_metrics_and_keeps_secrets_out(make_config, monkeypatch):
    monkeypatch.setenv("REELQUEUE_TOKEN", "top-secret")
    config = make_config(relight=pipeline_table(
        "research_ok.py", "--in", "{input}", "--out", "{outdir}", "--prompt", "{prompt}"))
    spec, directory = submit(config, "relight", prompt="warm; rm -rf / $(whoami)")
    outcome = run_job_sync(spec, config)
    assert outcome.status == "done", outcome.error
    assert outcome.primary == "output/result.bin"
    assert (directory / outcome.primary).read_bytes() == b"input bytes"[::-1]
    seen = json.loads((directory / "output" / "argv.json").read_text())
    assert seen["argv"][-1] == "warm; rm -rf / $(whoami)"  # one literal argument, no shell
    assert "REELQUEUE_TOKEN" not in seen["env"]  # daemon secrets stay in the daemon
    report = json.loads((directory / "report.json").read_text())
    assert report["metrics"] == {"psnr": 31.5, "frames": 12}
    assert "relit 12 frames" in (directory / "command.log").read_text()
    assert "31.5" in (directory / "report.html").read_text()


def test_extras_are_delivered_beside_the_result_in_the_folder(make_config, tmp_path):
    config = make_config(relight=pipeline_table("research_ok.py", "--in", "{input}",
                                                "--out", "{outdir}"))
    inbox = tmp_path / "drop"
    (inbox / "done").mkdir(parents=True)
    (inbox / "clip.mp4").write_bytes(b"input bytes")
    spec, directory = submit(config, "relight")
    spec = spec.model_copy(update={"source": Source(channel="folder", folder=str(inbox),
                                                    filename="clip.mp4")})
    outcome = run_job_sync(spec, config)
    (directory / "spec.json").write_text(spec.model_dump_json())
    deliver(spec, outcome, directory)
    names = sorted(p.name for p in (inbox / "done").iterdir())
    assert names == ["clip.argv.json", "clip.bin", "clip.metrics.json", "clip.mp4",
                     "clip.report.html", "clip.report.json"]


def test_failure_shows_the_tail_of_the_log(make_config):
    config = make_config(broken=pipeline_table("research_fail.py"))
    spec, _ = submit(config, "broken")
    outcome = run_job_sync(spec, config)
    assert outcome.status == "failed"
    assert "exited with status 3" in outcome.error
    assert "no kernel image is available" in outcome.error


def test_missing_output_is_a_clear_failure(make_config):
    config = make_config(lazy=pipeline_table("research_no_output.py"))
    outcome = run_job_sync(submit(config, "lazy")[0], config)
    assert outcome.status == "failed" and "wrote no file matching" in outcome.error


def test_output_name_tricks_are_skipped(make_config):
    config = make_config(tricky=pipeline_table("research_tricks.py", "{outdir}"))
    spec, directory = submit(config, "tricky")
    outcome = run_job_sync(spec, config)
    assert outcome.status == "done", outcome.error
    assert outcome.primary == "output/z_real.mp4" and outcome.extras == []
    warnings = json.loads((directory / "report.json").read_text())["warnings"]
    assert any("a_link.mp4" in w for w in warnings)
    assert any(".hidden.mp4" in w for w in warnings) and any("folder.mp4" in w for w in warnings)


def _group_is_gone(directory: Path) -> bool:
    pid = int((directory / "output" / "pids.txt").read_text())
    try:
        Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_timeout_kills_the_whole_process_group(make_config):
    config = make_config(slow=pipeline_table("research_hang.py", "{outdir}", timeout="1s"))
    spec, directory = submit(config, "slow")
    started = time.monotonic()
    outcome = run_job_sync(spec, config)
    assert outcome.status == "failed" and "longer than its timeout (1 s)" in outcome.error
    assert time.monotonic() - started < 10
    time.sleep(0.2)
    assert _group_is_gone(directory)  # the script's own child died with it


def test_cancel_kills_the_whole_process_group(make_config):
    config = make_config(slow=pipeline_table("research_hang.py", "{outdir}"))
    spec, directory = submit(config, "slow")
    cancellation = Cancellation()
    threading.Timer(1.0, cancellation.set, [Cancellation.USER]).start()
    outcome = run_job_sync(spec, config, cancellation=cancellation)
    assert outcome.status == "cancelled"
    time.sleep(0.2)
    assert _group_is_gone(directory)


def test_requests_are_checked_against_the_declaration(make_config):
    kinds = kind_registry(make_config(relight=pipeline_table("research_ok.py", "--prompt",
                                                             "{prompt}")))
    with pytest.raises(JobError, match="must not start with '-'"):
        kinds.validate("relight", "--delete-everything", {}, ["clip.mp4"])
    with pytest.raises(JobError, match="takes .mp4"):
        kinds.validate("relight", "", {}, ["notes.pdf"])
    with pytest.raises(JobError, match="needs an input file"):
        kinds.validate("relight", "a prompt alone", {})
    with pytest.raises(JobError, match="unknown option 'strength'"):
        kinds.validate("relight", "", {"strength": 2}, ["clip.mp4"])


def test_a_job_without_its_input_is_refused(make_config):
    config = make_config(relight=pipeline_table("research_ok.py"))
    outcome = run_job_sync(submit(config, "relight", data=None)[0], config)
    assert outcome.status == "failed" and "needs an input file" in outcome.error


def test_a_missing_program_is_explained(make_config):
    config = make_config(gone=pipeline_table("research_ok.py").replace(
        sys.executable, "/opt/envs/nowhere/bin/python"))
    outcome = run_job_sync(submit(config, "gone")[0], config)
    assert outcome.status == "failed" and "does not exist" in outcome.error


@pytest.mark.parametrize("body, message", [
    ('type = "command"\ncommand = ["x", "{secret}"]', "unknown placeholder {secret}"),
    ('type = "command"\ncommand = []', "command"),
    ('type = "command"\ncommand = ["x"]\ninputs = ["hologram"]', "neither an input type"),
    ('type = "command"\ncommand = ["x"]\noutputs = ["../*.mp4"]', "without folders"),
    ('type = "shell"\ncommand = ["x"]', "type"),
])
def test_bad_declarations_are_config_errors(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        read_config(write_config(tmp_path, "", **{"pipelines.relight": body}))


def test_a_declaration_cannot_shadow_a_built_in_kind(tmp_path):
    config = read_config(write_config(tmp_path, "", **{"pipelines.video":
                                                       pipeline_table("x.py")}))
    with pytest.raises(ConfigError, match="clashes with the built-in kind 'video'"):
        kind_registry(config)

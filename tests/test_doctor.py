"""`reelqueue doctor` (daemon/doctor.py): each check is shown to pass on a sound setup
and to fail on a broken one, created for real where it can be (an unreachable Redis, a
missing ffmpeg, a folder that cannot be written, a damaged model file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import redis as redis_sync

from daemon import doctor
from daemon.compose import read_config
from daemon.config import Config
from daemon.doctor import DiskLimits, Finding, Level
from daemon.redis_server import EmbeddedRedis
from tests.conftest import REPO, write_config


def make_config(tmp_path: Path, redis_url: str = "", **sections: str) -> Config:
    return read_config(write_config(tmp_path, redis_url, **sections))


def levels(findings: list[Finding]) -> set[Level]:
    return {finding.level for finding in findings}


def only(findings: list[Finding], level: Level) -> list[str]:
    return [finding.what for finding in findings if finding.level is level]


# --- config ----------------------------------------------------------------------------

HTTP_WITH_TOKEN = ('enabled = true\n'
                   'tokens = [{name = "ci", token = "env:RQ_DOCTOR_TOKEN", role = "admin"}]')


def test_http_intake_needs_a_usable_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path, **{"intake.http": HTTP_WITH_TOKEN})
    monkeypatch.delenv("RQ_DOCTOR_TOKEN", raising=False)
    findings = doctor.check_config(config)
    [error] = only(findings, Level.ERROR)
    assert "no token is usable" in error and "RQ_DOCTOR_TOKEN is unset" in error
    assert only(findings, Level.OK) == [f"{tmp_path / 'config.toml'} is valid"]

    monkeypatch.setenv("RQ_DOCTOR_TOKEN", "s3cret")
    findings = doctor.check_config(config)
    assert levels(findings) == {Level.OK}
    assert "usable tokens: ci" in findings[1].what


def test_chat_intake_needs_a_token_and_allowed_users(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RQ_DOCTOR_BOT", raising=False)
    chat = 'enabled = true\ntoken = "env:RQ_DOCTOR_BOT"'
    findings = doctor.check_config(make_config(tmp_path, **{"intake.chat": chat}))
    errors = only(findings, Level.ERROR)
    assert len(errors) == 2
    assert "has no token" in errors[0] and "nobody may use it" in errors[1]

    monkeypatch.setenv("RQ_DOCTOR_BOT", "123:abc")
    allowed = make_config(tmp_path, **{"intake.chat": chat + "\nallowed_user_ids = [42]"})
    findings = doctor.check_config(allowed)
    assert Level.ERROR not in levels(findings)
    assert only(findings, Level.INFO) == ["chat bot: private chats only (no group is allowed)"]


# --- Python packages -------------------------------------------------------------------


def test_python_packages_import_at_accepted_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    [ok] = doctor.check_python_packages(["rich>=13", "pillow>=10"])
    assert ok.level is Level.OK and "rich " in ok.what and "pillow " in ok.what

    [old] = doctor.check_python_packages(["rich>=999"])
    assert old.level is Level.WARN and "wants >=999" in old.what

    [missing] = doctor.check_python_packages(["reelqueue-no-such-package>=1"])
    assert missing.level is Level.ERROR and "import reelqueue_no_such_package" in missing.what

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # what a broken install looks like
    [broken] = doctor.check_python_packages(["aiohttp>=3.10"])
    assert broken.level is Level.ERROR and "import aiohttp` fails" in broken.what


# --- ffmpeg ----------------------------------------------------------------------------


def test_ffmpeg_with_libx264_and_aac() -> None:
    [finding] = doctor.check_ffmpeg()
    assert finding.level is Level.OK and "libx264 and aac" in finding.what


def test_ffmpeg_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg"))
    [finding] = doctor.check_ffmpeg()
    assert finding.level is Level.ERROR and "no working ffmpeg" in finding.what
    assert "IMAGEIO_FFMPEG_EXE" in finding.fix


def test_ffmpeg_without_libx264(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho 'ffmpeg version 6.1-lgpl' >&2\n"
                    "echo ' V....D libopenh264  OpenH264 H.264'\n"
                    "echo ' A....D aac          AAC (Advanced Audio Coding)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    [finding] = doctor.check_ffmpeg()
    assert finding.level is Level.ERROR
    assert "ffmpeg 6.1-lgpl" in finding.what and "lacks the libx264 encoder" in finding.what


# --- Redis -----------------------------------------------------------------------------


def test_redis_unreachable(tmp_path: Path) -> None:
    config = make_config(tmp_path, "redis://127.0.0.1:1/0")
    [finding] = doctor.check_redis(config)
    assert finding.level is Level.ERROR
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in finding.what


def test_redis_persistence(tmp_path: Path) -> None:
    # A server of its own: this test turns persistence off, which others must not see.
    server = EmbeddedRedis(tmp_path / "own-redis")
    server.start()
    try:
        with redis_sync.Redis(unix_socket_path=str(server.socket)) as redis_client:
            _check_persistence(tmp_path, server, redis_client)
    finally:
        server.stop(only_if_idle=False)


def _check_persistence(tmp_path: Path, server: EmbeddedRedis,
                       redis_client: redis_sync.Redis) -> None:
    config = make_config(tmp_path, server.url)
    findings = doctor.check_redis(config)
    assert levels(findings) == {Level.OK}
    assert "persistence: AOF on, appendfsync always" in findings[-1].what

    redis_client.config_set("appendfsync", "no")
    assert only(doctor.check_redis(config), Level.WARN)[0].startswith("appendfsync no")

    redis_client.config_set("appendonly", "no")
    redis_client.config_set("save", "")
    [error] = only(doctor.check_redis(config), Level.ERROR)
    assert "keeps nothing on disk" in error


def test_redis_eviction_policy_is_flagged() -> None:
    settings = {"appendonly": "yes", "appendfsync": "everysec", "save": "",
                "maxmemory": "1073741824", "maxmemory-policy": "allkeys-lru"}
    findings = doctor.persistence_findings(settings)
    assert "evicts queued jobs" in only(findings, Level.WARN)[0]
    settings["maxmemory-policy"] = "noeviction"
    assert levels(doctor.persistence_findings(settings)) == {Level.OK}


def test_embedded_redis_checked_only_while_running(tmp_path: Path,
                                                   redis_server: EmbeddedRedis) -> None:
    stopped = doctor.check_redis(make_config(tmp_path))
    assert [f.level for f in stopped] == [Level.OK, Level.INFO]
    assert "embedded Redis is not running" in stopped[1].what

    # The session's server is an embedded one: a config whose state folder is its own.
    state = redis_server.dir.parent
    running = doctor.check_redis(make_config(tmp_path, state=f'dir = "{state}"'))
    assert levels(running) == {Level.OK}
    assert any("AOF on" in finding.what for finding in running)


def test_wait_for_redis(tmp_path: Path, redis_server: EmbeddedRedis,
                        capsys: pytest.CaptureFixture[str]) -> None:
    up = write_config(tmp_path, redis_server.url)
    assert doctor.main(["--config", str(up), "--wait-for-redis", "5"]) == 0

    down = write_config(tmp_path, "redis://127.0.0.1:1/0")
    assert doctor.main(["--config", str(down), "--wait-for-redis", "0.6"]) == 1
    stderr = capsys.readouterr().err
    assert "did not answer within 0.6 s" in stderr and "fix [redis] url" in stderr


# --- GPU -------------------------------------------------------------------------------


def fake_nvml(init_error: str | None = None) -> types.ModuleType:
    """A pynvml stand-in: a driver that fails to initialise, or one 24 GB GPU."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 (pynvml's own name)
        pass

    def init() -> None:
        if init_error:
            raise NVMLError(init_error)

    memory = types.SimpleNamespace(total=24 * doctor.GB, free=20 * doctor.GB)
    nvml.__dict__.update(
        NVMLError=NVMLError, NVMLError_LibraryNotFound=NVMLError_LibraryNotFound,
        nvmlInit=init, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "550.54.15", nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetName=lambda handle: b"NVIDIA RTX A5000",
        nvmlDeviceGetMemoryInfo=lambda handle: memory)
    return nvml


def test_gpu_driver_that_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml("Driver/library version mismatch"))
    [finding] = doctor.check_gpu()
    assert finding.level is Level.ERROR and "version mismatch" in finding.what
    assert "reboot" in finding.fix


def test_gpu_seen_by_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    findings = doctor.check_gpu()
    assert findings[0] == Finding(Level.OK, "gpu", "GPU 0: NVIDIA RTX A5000, 24 GB, 20.0 GB "
                                                   "free (driver 550.54.15)")
    if not torch.cuda.is_available():  # the CPU build: the GPU would sit idle
        assert findings[1].level is Level.WARN and "cannot use them" in findings[1].what


def nvidia_driver_answers() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_no_gpu_is_information_not_an_error() -> None:
    import torch

    if torch.cuda.is_available() or nvidia_driver_answers():
        pytest.skip("this host has an NVIDIA GPU")
    assert doctor.check_gpu() == [Finding(Level.INFO, "gpu",
                                          "no GPU: jobs run on the CPU, more slowly")]


# --- models ----------------------------------------------------------------------------


def test_model_checksums(tmp_path: Path) -> None:
    from workers import models

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    weights = models_dir / "RealESRGAN_x4plus.pth"
    weights.write_bytes(b"weights" * 1000)
    models.record_in_manifest(models_dir, weights.name, {"url": "test"})
    config = make_config(tmp_path, upscale=f'model = "{weights}"')
    findings = doctor.check_models(config)
    assert levels(findings) == {Level.OK} and "1 files match" in findings[0].what

    weights.write_bytes(b"WEIGHTS" * 1000)  # same size, other bytes: a damaged copy
    [damaged] = doctor.check_models(config)
    assert damaged.level is Level.ERROR and "does not match its SHA-256" in damaged.what
    assert "fetch_models.py RealESRGAN_x4plus.pth" in damaged.fix


def test_each_kind_names_the_models_it_needs(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    config = make_config(tmp_path, caption=f'model = "{tmp_path / "models" / "git-base"}"',
                         video='backend = "diffusers"\nmodel = "Wan2.1-T2V-1.3B-Diffusers"',
                         storyboard='backend = "llm"\nmodel = "/srv/llm/qwen"')
    findings = doctor.check_models(config)
    missing = sorted(f.what for f in findings if f.level is Level.WARN)
    assert missing == [
        f"[caption] model = {tmp_path}/models/git-base does not exist: caption jobs fail "
        "until it does",
        "[storyboard] model = /srv/llm/qwen does not exist: video jobs fail until it does",
        f"[video] model = {tmp_path}/models/Wan2.1-T2V-1.3B-Diffusers does not exist: "
        "video jobs fail until it does",
    ]


# --- folders and disk ------------------------------------------------------------------


def test_folders_writable_or_creatable(tmp_path: Path) -> None:
    findings = doctor.check_folders(make_config(tmp_path))
    assert Level.ERROR not in levels(findings)
    assert f"watch folder {tmp_path / 'inbox'} (with done/ and failed/) will be created " \
           "at start" in only(findings, Level.OK)


def test_folder_under_a_file(tmp_path: Path) -> None:
    # Works as root too, where permission bits stop nothing.
    (tmp_path / "not-a-dir").write_text("")
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "done").write_text("")
    config = make_config(tmp_path, state='dir = "not-a-dir/state"')
    errors = only(doctor.check_folders(config), Level.ERROR)
    assert errors == [
        f"state folder {tmp_path}/not-a-dir/state: {tmp_path}/not-a-dir is a file, not a folder",
        f"watch folder {tmp_path}/inbox/done: {tmp_path}/inbox/done is a file, not a folder",
    ]


def test_folder_without_write_permission(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir(mode=0o555)
    config = write_config(tmp_path)
    check = ("import sys; from daemon import doctor; from daemon.compose import read_config; "
             "findings = doctor.check_folders(read_config(sys.argv[1])); "
             "print(*(f.what for f in findings if f.level == 'error'), sep='\\n')")
    argv = [sys.executable, "-c", check, str(config)]
    if os.geteuid() == 0:  # root writes through permission bits, unless it gives that up
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv; test_folder_under_a_file covers it")
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO,
                            check=False)
    (tmp_path / "inbox").chmod(0o755)
    assert result.stdout.splitlines()[0] == (f"watch folder {tmp_path}/inbox: cannot write in "
                                             f"{tmp_path}/inbox: Permission denied"), result.stderr


def test_free_disk_thresholds(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    huge = 1 << 60
    [ok] = doctor.check_disk(config, DiskLimits(warn_bytes=0, error_bytes=0))
    assert ok.level is Level.OK and "GB free on the disk of" in ok.what
    [warn] = doctor.check_disk(config, DiskLimits(warn_bytes=huge, error_bytes=0))
    assert warn.level is Level.WARN
    [error] = doctor.check_disk(config, DiskLimits(warn_bytes=huge, error_bytes=huge))
    assert error.level is Level.ERROR and "jobs fail" in error.what


# --- fonts -----------------------------------------------------------------------------


def test_fonts(tmp_path: Path) -> None:
    [ok] = doctor.check_fonts(make_config(tmp_path))
    assert ok.level is Level.OK and "CJK captions render with" in ok.what
    missing = make_config(tmp_path, video=f'font = "{tmp_path / "gone.ttf"}"')
    [error] = doctor.check_fonts(missing)
    assert error.level is Level.ERROR and "does not exist" in error.what


# --- the whole run -----------------------------------------------------------------------


def test_render_and_exit_status() -> None:
    warn = Finding(Level.WARN, "disk", "4.0 GB free", "delete old jobs")
    text, status = doctor.render([Finding(Level.OK, "config", "fine"), warn])
    assert status == 0 and "WARN   disk     4.0 GB free\n" in text and "→ delete old jobs" in text
    text, status = doctor.render([warn, Finding(Level.ERROR, "redis", "down", "start it")])
    assert status == 1 and "1 error(s), 1 warning(s)" in text


def test_a_crashing_check_does_not_hide_the_others(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def crash() -> list[Finding]:
        raise RuntimeError("NVML exploded")

    monkeypatch.setattr(doctor, "check_gpu", crash)
    monkeypatch.setattr(doctor, "check_python_packages", list)  # keep this test fast
    findings = doctor.run_checks(make_config(tmp_path))
    gpu = [f for f in findings if f.area == "gpu"]
    assert gpu == [Finding(Level.ERROR, "gpu",
                           "the check itself failed: RuntimeError: NVML exploded",
                           "fix what the message names, then run the doctor again")]
    assert {f.area for f in findings} >= {"config", "ffmpeg", "redis", "folders", "disk",
                                          "fonts", "models"}


def test_module_runs_every_check(tmp_path: Path) -> None:
    """`python -m daemon.doctor` on a sound setup: no errors, status 0."""
    config = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "daemon.doctor", "--config", str(config)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for area in ("config", "python", "ffmpeg", "redis", "gpu", "models", "folders", "disk",
                 "fonts"):
        assert f"  {area}" in result.stdout
    assert "packages import" in result.stdout


# --- the HTTP API's port ---------------------------------------------------------------


def test_http_port_free_held_by_another_program_or_by_our_daemon(tmp_path: Path,
                                                                 redis_url: str) -> None:
    import json
    import socket

    from daemon import channel_state
    from tests.conftest import free_port

    port = free_port()
    config = make_config(tmp_path, redis_url,
                         **{"intake.http": f'enabled = true\nlisten = "127.0.0.1:{port}"'})
    [free] = doctor.check_http_port(config)
    assert free.level is Level.OK and "is free" in free.what
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        [other] = doctor.check_http_port(config)
        assert other.level is Level.ERROR and "held by another program" in other.what
        assert f"sport = :{port}" in other.fix
        with redis_sync.Redis.from_url(redis_url) as client:  # as our daemon records it
            client.hset(channel_state.KEY, "http", json.dumps({"state": "running",
                                                               "pid": 4242}))
            [ours] = doctor.check_http_port(config)
            client.delete(channel_state.KEY)
        assert ours.level is Level.OK and "reelqueue's own daemon (pid 4242)" in ours.what
    assert doctor.check_http_port(make_config(tmp_path, redis_url)) == []  # http off


def test_a_digest_posted_where_nobody_reads_is_a_warning(tmp_path: Path) -> None:
    config = make_config(tmp_path, digest='post = [{ channel = "chat", to = "-1001" }, '
                                          '{ channel = "folder", to = "x" }]')
    warnings = only(doctor.check_config(config), Level.WARN)
    assert warnings == [
        "[digest] post names the channel 'chat', which is not running here: the digest's "
        "summary would wait there unread",
        "[digest] post names the channel 'folder', which cannot post: the digest's summary "
        "would wait there unread"]

"""The systemd units and scripts/install-systemd.sh: installed into a staging root
(--root), the units pass `systemd-analyze verify` with their paths substituted, a dry
run changes nothing, a second run changes nothing and keeps the operator's edits."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon import doctor
from daemon.compose import read_config
from daemon.redis_server import find_redis_server
from tests.conftest import write_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install-systemd.sh"
UNITS = REPO / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)")

Install = Callable[..., subprocess.CompletedProcess[str]]


def fake_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """A fake install (its venv's console script and python exist: systemd-analyze
    verify checks every Exec path) and where the install goes."""
    prefix = tmp_path / "opt" / "reelqueue"
    for name in ("reelqueue", "python"):
        fake_executable(prefix / ".venv" / "bin" / name)
    return {
        "prefix": prefix,
        "root": tmp_path / "root",
        "state": tmp_path / "state",
        "watch": tmp_path / "shares" / "inbox",
        "redis": fake_executable(tmp_path / "bin" / "redis-server"),
    }


@pytest.fixture
def install(paths: dict[str, Path]) -> Install:
    def run(*extra: str, root: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["bash", str(SCRIPT), "--prefix", str(paths["prefix"]),
                "--state-dir", str(paths["state"]), "--watch", str(paths["watch"]), *extra]
        if root:
            argv += ["--root", str(paths["root"])]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    return run


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under ``root`` with its mode and content."""
    return {str(path.relative_to(root)): (path.stat().st_mode,
                                          path.read_bytes() if path.is_file() else b"")
            for path in sorted(root.rglob("*"))}


def directives(unit: Path) -> dict[str, list[str]]:
    """KEY -> values, in order (a key may repeat), comments left out."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def verify(directory: Path, *units: str) -> subprocess.CompletedProcess[str]:
    # --man=no: Documentation=man:… would need man pages installed.
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *units], cwd=directory,
                          capture_output=True, text=True, timeout=60, check=False)


# --- the script -----------------------------------------------------------------------


def test_dry_run_says_what_it_would_do_and_changes_nothing(install: Install,
                                                          paths: dict[str, Path]) -> None:
    result = install("--dry-run", "--with-redis", "--redis-server", str(paths["redis"]))
    assert result.returncode == 0, result.stderr
    for line in ("would write /etc/systemd/system/reelqueue-daemon.service",
                 "would write /etc/systemd/system/reelqueue-worker@.service",
                 "would write /etc/systemd/system/reelqueue-redis.service",
                 "would write /etc/reelqueue/env (mode 0600",
                 f"would run: mkdir -p {paths['root']}{paths['state']}",
                 "systemctl enable --now reelqueue.target"):
        assert line in result.stdout
    assert not paths["root"].exists()


def test_install_into_a_staging_root(install: Install, paths: dict[str, Path]) -> None:
    result = install()
    assert result.returncode == 0, result.stderr
    root, prefix = paths["root"], paths["prefix"]

    env = root / "etc/reelqueue/env"
    assert env.stat().st_mode & 0o777 == 0o600
    assert re.search(r"^REELQUEUE_TOKEN=[0-9a-f]{48}$", env.read_text(), re.M)
    config = read_config(root / "etc/reelqueue/config.toml")  # the real loader accepts it
    assert config.state_dir == paths["state"]
    assert [folder.path for folder in config.intake.folder] == [paths["watch"]]
    assert config.redis.url == ""  # the embedded Redis
    assert (root / str(paths["state"]).lstrip("/")).is_dir()
    # setgid and sticky (issue 13): nobody moves another's request or done/ away.
    assert (root / str(paths["watch"]).lstrip("/")).stat().st_mode & 0o7777 == 0o3775

    daemon = directives(root / "etc/systemd/system/reelqueue-daemon.service")
    assert daemon["ExecStart"] == [f"{prefix}/.venv/bin/reelqueue daemon"]
    assert daemon["ReadWritePaths"] == [str(paths["state"]), str(paths["watch"])]
    worker = directives(root / "etc/systemd/system/reelqueue-worker@.service")
    assert worker["ExecStartPre"] == [f"{prefix}/.venv/bin/python -m daemon.doctor "
                                      "--wait-for-redis 60"]
    assert worker["ReadWritePaths"] == [str(paths["state"]), f"-{prefix}/models"]
    # No default path is left, and none was replaced twice (the prefix contains one).
    installed = "".join(p.read_text() for p in (root / "etc/systemd/system").iterdir())
    assert f"{prefix}{prefix}" not in installed
    assert "/opt/reelqueue" not in installed.replace(str(prefix), "")
    assert "/var/lib/reelqueue" not in installed
    assert not (root / "etc/systemd/system/reelqueue-redis.service").exists()


def test_several_watch_folders_and_the_redis_service(install: Install, paths: dict[str, Path],
                                                    tmp_path: Path) -> None:
    second = tmp_path / "shares" / "upscale"
    result = install("--watch", str(second), "--with-redis", "--redis-server",
                     str(paths["redis"]))
    assert result.returncode == 0, result.stderr
    root = paths["root"]
    config = read_config(root / "etc/reelqueue/config.toml")
    assert [folder.path for folder in config.intake.folder] == [paths["watch"], second]
    assert config.redis.url == "unix:///run/reelqueue-redis/redis.sock"
    daemon = directives(root / "etc/systemd/system/reelqueue-daemon.service")
    assert daemon["ReadWritePaths"][1] == f"{paths['watch']} {second}"
    redis = directives(root / "etc/systemd/system/reelqueue-redis.service")
    assert redis["ExecStart"][0].startswith(f"{paths['redis']} /etc/reelqueue/redis.conf")
    redis_conf = (root / "etc/reelqueue/redis.conf").read_text()
    for setting in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction",
                    "unixsocket /run/reelqueue-redis/redis.sock"):
        assert f"\n{setting}\n" in redis_conf


def test_a_second_run_changes_nothing_and_keeps_edits(install: Install,
                                                     paths: dict[str, Path]) -> None:
    assert install().returncode == 0
    config = paths["root"] / "etc/reelqueue/config.toml"
    config.write_text(config.read_text().replace('level = "info"', 'level = "debug"'))
    before = snapshot(paths["root"])

    again = install()
    assert again.returncode == 0, again.stderr
    assert snapshot(paths["root"]) == before  # same files, modes and contents: token too
    assert "kept /etc/reelqueue/config.toml (exists)" in again.stdout
    assert "unchanged /etc/systemd/system/reelqueue-daemon.service" in again.stdout


def test_refuses_unusable_arguments(install: Install, paths: dict[str, Path]) -> None:
    relative = install("--watch", "relative/inbox")
    assert relative.returncode == 1
    assert "--watch needs an absolute path" in relative.stderr
    spaced = install("--state-dir", "/srv/my state")
    assert spaced.returncode == 1 and "no spaces or quotes" in spaced.stderr
    unknown = install("--frobnicate")
    assert unknown.returncode == 2 and "unknown option: --frobnicate" in unknown.stderr
    shutil.rmtree(paths["prefix"] / ".venv")
    no_venv = install()
    assert no_venv.returncode == 1 and "no reelqueue in" in no_venv.stderr
    assert not paths["root"].exists()


def test_install_without_staging_root_needs_root_or_dry_run(install: Install) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: a real install would change this machine")
    result = install(root=False)
    assert result.returncode == 1 and "run as root" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout


# --- the units --------------------------------------------------------------------------


@needs_systemd_analyze
def test_installed_units_pass_systemd_analyze_verify(install: Install,
                                                     paths: dict[str, Path]) -> None:
    assert install("--with-redis", "--redis-server", str(paths["redis"])).returncode == 0
    units = paths["root"] / "etc/systemd/system"
    result = verify(units, "reelqueue-daemon.service", "reelqueue-worker@0.service",
                    "reelqueue-worker@1.service", "reelqueue-redis.service", "reelqueue.target")
    # verify exits 0 on unknown keys and bad values: it only prints them.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_verify_really_catches_a_broken_unit(install: Install, paths: dict[str, Path],
                                             tmp_path: Path) -> None:
    assert install().returncode == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (paths["root"] / "etc/systemd/system/reelqueue-daemon.service").read_text()
    (broken / "reelqueue-daemon.service").write_text(
        text.replace("KillMode=control-group", "KillMode=gently").replace("/.venv/", "/gone/"))
    result = verify(broken, "reelqueue-daemon.service")
    assert result.returncode != 0
    assert "kill mode" in result.stderr and "is not executable" in result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize(("unit", "most"), [("reelqueue-daemon.service", 2.5),
                                            ("reelqueue-worker@0.service", 3.0),
                                            ("reelqueue-redis.service", 2.5)])
def test_units_stay_hardened(install: Install, paths: dict[str, Path], unit: str,
                             most: float) -> None:
    assert install("--with-redis", "--redis-server", str(paths["redis"])).returncode == 0
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes",
                             f"--root={paths['root']}", unit],
                            capture_output=True, text=True, timeout=60, check=False)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert float(score.group(1)) <= most


def test_worker_unit_keeps_the_gpu_usable_and_stops_gracefully() -> None:
    worker = directives(UNITS / "reelqueue-worker@.service")
    assert "CUDA_VISIBLE_DEVICES=%i" in worker["Environment"]
    assert worker["ExecStart"][0].endswith("reelqueue worker --name %H-gpu%i")
    # mixed: SIGTERM to the worker alone, which stops its job and its own children.
    assert worker["KillMode"] == ["mixed"] and int(worker["TimeoutStopSec"][0]) >= 60
    # Each of these closes /dev/nvidia* (ProtectClock through an implied DeviceAllow).
    for closes_devices in ("PrivateDevices", "DeviceAllow", "DevicePolicy", "ProtectClock"):
        assert closes_devices not in worker
    assert worker["User"] == ["reelqueue"] and worker["NoNewPrivileges"] == ["yes"]


def test_daemon_unit_lets_the_embedded_redis_stop_cleanly() -> None:
    daemon = directives(UNITS / "reelqueue-daemon.service")
    # control-group: redis-server, the daemon's child, gets SIGTERM too (an AOF flush),
    # where mixed would SIGKILL it once the daemon has exited.
    assert daemon["KillMode"] == ["control-group"]
    for unit in (daemon, directives(UNITS / "reelqueue-worker@.service")):
        assert unit["Restart"] == ["on-failure"]
        assert unit["RestartPreventExitStatus"] == ["2"]  # a bad config: restarts won't help
        assert unit["EnvironmentFile"] == ["-/etc/reelqueue/env"]
        assert "REELQUEUE_CONFIG=/etc/reelqueue/config.toml" in unit["Environment"]
        assert unit["ProtectSystem"] == ["strict"] and unit["PrivateTmp"] == ["yes"]


def test_redis_conf_is_accepted_by_redis_server_and_doctor(install: Install,
                                                           paths: dict[str, Path]) -> None:
    """The redis.conf written for reelqueue-redis.service, run by a real redis-server
    (with its socket and data moved to a scratch folder): the doctor finds it sound."""
    assert install("--with-redis", "--redis-server", str(paths["redis"])).returncode == 0
    conf = (paths["root"] / "etc/reelqueue/redis.conf").read_text()
    scratch = Path(tempfile.mkdtemp(prefix="rq-"))  # short: a socket path has 108 bytes
    conf = conf.replace("/run/reelqueue-redis", str(scratch)).replace(
        "/var/lib/reelqueue-redis", str(scratch))
    (scratch / "redis.conf").write_text(conf)
    server = subprocess.Popen([find_redis_server(), str(scratch / "redis.conf"),
                               "--daemonize", "no"], stdout=subprocess.DEVNULL)
    try:
        url = f"unix://{scratch}/redis.sock"
        config = read_config(write_config(scratch, url))
        assert doctor.wait_for_redis(config, 10) == 0
        findings = doctor.check_redis(config)
        assert {finding.level for finding in findings} == {doctor.Level.OK}, findings
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)

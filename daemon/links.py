"""Signed links to a job's files: they work without a token (a browser can play the
video, a chat message can link it), for the job and the time they name. The signature
covers the job id and the expiry, not the file name, so one link's query opens every
artifact of that job and no other job's: the report page served by the HTTP API plays
its video by reusing its own query (see ``workers.pipelines.report``). Shared by the
HTTP API, which serves them, and the chat bot, which sends them."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path
from urllib.parse import quote, unquote

from daemon import files

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
EXPIRES = re.compile(r"[0-9]{1,12}")  # ASCII digits: str.isdigit() also takes '²'
SIGNATURE = re.compile(r"[0-9a-f]{1,64}")


def link_key(state_dir: Path) -> bytes:
    """The signing key, created on first use and kept in the state folder (mode 600)."""
    path = state_dir / "http-link.key"
    if not path.exists():
        files.write_bytes(path, secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


def sign(key: bytes, job_id: str, expires: int) -> str:
    """The signature for all of job ``job_id``'s files until ``expires`` (Unix time)."""
    return _mac(key, f"files\0{job_id}\0{expires}")


def file_link(key: bytes, job_id: str, name: str, ttl_s: float, base: str = "") -> str:
    """``{base}/jobs/{id}/files/{name}?expires=…&sig=…``, valid for ``ttl_s``."""
    expires = int(time.time() + ttl_s)
    return (f"{base.rstrip('/')}/jobs/{job_id}/files/{quote(name)}?expires={expires}"
            f"&sig={sign(key, job_id, expires)}")


def verify(key: bytes, job_id: str, expires: str, signature: str, name: str = "") -> bool:
    """Whether ``expires`` and ``signature`` open job ``job_id``'s files now. Given the
    file's ``name``, a link signed the old way (job, name and expiry: sent before the
    upgrade) opens that one file until it expires."""
    if query_problems(expires, signature) or int(expires) < time.time():
        return False
    if hmac.compare_digest(signature, sign(key, job_id, int(expires))):
        return True
    return bool(name) and hmac.compare_digest(signature,
                                              _mac(key, f"{job_id}\0{name}\0{int(expires)}"))


def query_problems(expires: str, signature: str) -> list[dict[str, str]]:
    """What makes a link's query no link's at all (as opposed to expired or signed
    wrong): ``[{"field", "reason"}]``, empty if it is well formed."""
    problems = []
    if not EXPIRES.fullmatch(expires):
        problems.append({"field": "expires", "reason": "a Unix time in digits 0-9"})
    if not SIGNATURE.fullmatch(signature):
        problems.append({"field": "sig", "reason": "hexadecimal digits 0-9a-f"})
    return problems


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()[:32]


def safe_filename(name: str) -> str:
    """A sender's file name reduced to something safe to put in a job folder: no
    folders, no leading dots, letters, digits, '.', '_' and '-' only. The suffix is
    kept (it says what the file is), and a stem with nothing left is "upload":
    ``名前.png`` becomes ``upload.png``."""
    base = Path(unquote(name).replace("\\", "/")).name  # some clients percent-encode
    stem, dot, suffix = base.rpartition(".")
    if not (stem and suffix.isascii() and suffix.isalnum() and len(suffix) <= 16):
        stem, dot, suffix = base, "", ""  # no suffix, or none worth keeping apart
    stem = _SAFE_NAME.sub("_", stem).lstrip("._") or "upload"
    return stem[:100 - len(dot + suffix)] + dot + suffix

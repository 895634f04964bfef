"""Models on disk: what is installed under ``[models] dir``, whether it is intact, and
where a job finds the one it asks for.

Weights are never fetched at run time. ``scripts/fetch_models.py`` downloads the
models of ``CATALOGUE`` on a machine with hub access and records every file's SHA-256
in ``<models>/manifest.json``; the folder (manifest included) is then copied to the
GPU hosts. Here:

- ``list_models(models_dir)``: every model found, with its kind and size;
- ``verify(models_dir, name)``: each file against the manifest. Hashes are cached by
  size and modification time in ``<models>/.verify-cache.json``, so checking a model
  before every job costs a few ``stat`` calls;
- ``require(models_dir, name)``: the model's path for a job, or a ``JobError`` saying
  exactly how to install it or repair it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from daemon import files
from daemon.jobs import JobError

MANIFEST = "manifest.json"
VERIFY_CACHE = ".verify-cache.json"
MANIFEST_FORMAT = 1
HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class CatalogueEntry:
    """A model ``fetch_models.py`` knows how to download."""

    kind: str  # what it is for: text-to-video, image-to-video, llm, caption, upscale
    repo: str = ""  # a Hugging Face Hub repository…
    allow: tuple[str, ...] = ()  # …and the files to take from it (all when empty)
    url: str = ""  # or one file from its author's release page
    note: str = ""


_DIFFUSERS_FOLDERS = ("model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*",
                      "transformer/*", "vae/*")

CATALOGUE: dict[str, CatalogueEntry] = {
    "Wan2.1-T2V-1.3B-Diffusers": CatalogueEntry(
        "text-to-video", repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        note="480p, 16 fps, 81 frames; about 8 GB of VRAM with model offload"),
    "Wan2.2-TI2V-5B-Diffusers": CatalogueEntry(
        "text-to-video", repo="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        note="720p, 24 fps, 121 frames; its own weights also continue from an image"),
    "Wan2.1-I2V-14B-480P-Diffusers": CatalogueEntry(
        "image-to-video", repo="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        note="continuity for Wan 2.1 text-to-video scenes"),
    "LTX-Video": CatalogueEntry(
        "text-to-video", repo="Lightricks/LTX-Video", allow=_DIFFUSERS_FOLDERS,
        note="24 fps, up to 161 frames; the diffusers folders only, not the single-file "
             "checkpoints beside them"),
    "CogVideoX-2b": CatalogueEntry(
        "text-to-video", repo="THUDM/CogVideoX-2b", note="720×480, 8 fps, 49 frames"),
    "stable-video-diffusion-img2vid-xt": CatalogueEntry(
        "image-to-video", repo="stabilityai/stable-video-diffusion-img2vid-xt",
        allow=("model_index.json", "feature_extractor/*", "image_encoder/*", "scheduler/*",
               "unet/*", "vae/*"),
        note="gated on the hub: accept the licence and log in (hf auth login) first"),
    "Qwen2.5-1.5B-Instruct": CatalogueEntry(
        "llm", repo="Qwen/Qwen2.5-1.5B-Instruct", note="the storyboard writer"),
    "git-base-vatex": CatalogueEntry(
        "caption", repo="microsoft/git-base-vatex", note="video → sentence"),
    "RealESRGAN_x4plus.pth": CatalogueEntry(
        "upscale", url="https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/"
                       "RealESRGAN_x4plus.pth",
        note="4x upscaler; one file, from the author's release page (it is not on the hub)"),
}


def install_command(name: str) -> str:
    return f"python scripts/fetch_models.py {name} --dest models/"


class ModelError(JobError):
    """A model a job needs is missing or damaged; the message says how to fix it."""


# --- the manifest ---------------------------------------------------------------------------


def read_manifest(models_dir: Path) -> dict:
    path = models_dir / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "models": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(path: Path) -> list[Path]:
    """The files of a model (a directory, or a single file), hidden files left out: a
    download leaves its cache (``.cache/``) and lock files inside the folder."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def record_in_manifest(models_dir: Path, name: str, source: dict[str, str]) -> dict:
    """Hash every file of ``models_dir/name`` into the manifest (written atomically) and
    return its entry. ``source`` says where it came from (repo and revision, or url)."""
    path = models_dir / name
    base = path if path.is_dir() else path.parent
    entry = {
        **source,
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {str(f.relative_to(base)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
                  for f in model_files(path)},
    }
    manifest = read_manifest(models_dir)
    manifest["models"][name] = entry
    files.write_json(models_dir / MANIFEST, manifest)
    return entry


# --- listing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstalledModel:
    name: str
    path: Path
    kind: str  # the pipeline class (WanPipeline…), the architecture (Qwen2ForCausalLM…),
    # or the file suffix of a single-file model
    size_bytes: int
    in_manifest: bool
    in_catalogue: bool


def list_models(models_dir: Path) -> list[InstalledModel]:
    """Every model under ``models_dir``: folders with a ``model_index.json`` or
    ``config.json``, single weight files, and what the manifest lists."""
    if not models_dir.is_dir():
        return []
    manifest = read_manifest(models_dir)["models"]
    found = []
    for path in sorted(models_dir.iterdir()):
        if path.name.startswith(".") or path.name == MANIFEST:
            continue
        kind = model_kind(path)
        if kind is None and path.name not in manifest:
            continue
        found.append(InstalledModel(
            name=path.name, path=path, kind=kind or "unknown",
            size_bytes=sum(f.stat().st_size for f in model_files(path)),
            in_manifest=path.name in manifest, in_catalogue=path.name in CATALOGUE))
    return found


def model_kind(path: Path) -> str | None:
    """What a model folder holds, from its own description, or None if it is no model."""
    if path.is_file():
        return path.suffix.lstrip(".") if path.suffix in (".pth", ".pt", ".safetensors",
                                                          ".ckpt", ".onnx") else None
    for description, key in (("model_index.json", "_class_name"), ("config.json", "architectures")):
        file = path / description
        if file.is_file():
            value = json.loads(file.read_text(encoding="utf-8")).get(key, "unknown")
            return value[0] if isinstance(value, list) and value else str(value)
    return None


# --- verifying ------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    name: str
    path: Path
    in_manifest: bool
    checked: int = 0  # files compared with the manifest
    hashed: int = 0  # of those, hashed now (the rest came from the cache)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if not self.in_manifest:
            return f"{self.name}: not in {MANIFEST}, so its files cannot be checked"
        if self.ok:
            return f"{self.name}: {self.checked} files match {MANIFEST}"
        return f"{self.name}: " + "; ".join(self.problems)


_cache_lock = threading.Lock()


def verify(models_dir: Path, name: str) -> VerifyReport:
    """Compare every file of ``models_dir/name`` with the manifest: missing files,
    changed sizes and SHA-256 mismatches are problems; files the manifest does not know
    are not (a tokenizer saved by a newer library, notes of your own)."""
    path = models_dir / name
    entry = read_manifest(models_dir)["models"].get(name)
    report = VerifyReport(name=name, path=path, in_manifest=entry is not None)
    if entry is None:
        return report
    base = path if path.is_dir() else path.parent
    with _cache_lock:
        cache = _read_cache(models_dir)
        for relative, expected in sorted(entry["files"].items()):
            file = base / relative
            report.checked += 1
            if not file.is_file():
                report.problems.append(f"{relative} is missing")
                continue
            stat = file.stat()
            if stat.st_size != expected["size"]:
                report.problems.append(f"{relative} is {stat.st_size:,} bytes, not "
                                       f"{expected['size']:,} (a partial copy?)")
                continue
            key = str(file.relative_to(models_dir))
            stamp = [stat.st_size, stat.st_mtime_ns]
            cached = cache.get(key)
            if cached and cached[:2] == stamp:
                digest = cached[2]
            else:
                digest = sha256_file(file)
                cache[key] = [*stamp, digest]
                report.hashed += 1
            if digest != expected["sha256"]:
                report.problems.append(f"{relative} does not match its SHA-256")
        if report.hashed:
            _write_cache(models_dir, cache)
    return report


def _read_cache(models_dir: Path) -> dict[str, list]:
    try:
        return json.loads((models_dir / VERIFY_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_cache(models_dir: Path, cache: dict[str, list]) -> None:
    # A read-only models folder (a shared mount) only costs the hashing next time.
    if os.access(models_dir, os.W_OK):
        files.write_json(models_dir / VERIFY_CACHE, cache)


# --- resolving -------------------------------------------------------------------------------


def located(models_dir: Path, name: str | Path) -> Path:
    """Where model ``name`` is: a folder (or file) in ``models_dir``, or an absolute path."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else models_dir / path


def resolve(models_dir: Path, name: str) -> Path:
    """The local path of model ``name``: a folder (or file) in ``models_dir``, or an
    absolute path. Raises ``ModelError`` with the install command when it is missing."""
    path = located(models_dir, name)
    if path.exists() and (path.is_file() or model_kind(path) is not None):
        return path
    if Path(name).is_absolute() or name not in CATALOGUE:
        known = ", ".join(CATALOGUE)
        raise ModelError(
            f"model {name!r} is not installed: {path} is not a model folder (it needs a "
            f"model_index.json or config.json). Put one there, or use a catalogued model "
            f"({known})")
    state = "is incomplete" if path.exists() else "is not installed"
    raise ModelError(
        f"model {name!r} {state} in {models_dir}. Install it with: {install_command(name)} "
        f"on a machine with hub access, then copy models/{name} and models/{MANIFEST} "
        f"into {models_dir}/ here")


def require(models_dir: Path, name: str) -> Path:
    """``resolve`` and ``verify``: the path of an intact model, or a ``ModelError`` that
    says how to repair it. A model the manifest does not list is used unchecked."""
    path = resolve(models_dir, name)
    if path.parent.resolve() != models_dir.resolve():
        return path  # a folder of your own elsewhere: nothing to check it against
    report = verify(models_dir, path.name)
    if not report.ok:
        raise ModelError(
            f"model {path.name!r} in {models_dir} is damaged: {'; '.join(report.problems[:5])}"
            f". Copy models/{path.name} again from the machine that fetched it, or fetch it "
            f"anew: {install_command(path.name)}")
    return path

"""Reading and writing the media that job kinds take and give: video clips, images
(8- or 16-bit, with or without alpha) and bursts of images in a zip. Frames are
numpy arrays in RGB(A) order."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np

from daemon import files
from daemon.jobs import JobError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
BURST_SUFFIXES = (".zip",)
MAX_PIXELS = 8192 * 8192  # a guard against decompression bombs and absurd inputs


@dataclass
class Clip:
    frames: list[np.ndarray]  # H×W×3 uint8 RGB
    fps: float
    duration_s: float


def read_image(path: Path) -> np.ndarray:
    """An image as RGB or RGBA, uint8 or uint16 as stored."""
    data = np.fromfile(path, dtype=np.uint8)
    return decode_image(data.tobytes(), path.name)


def decode_image(data: bytes, name: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise JobError(f"{name} is not an image this server can read (PNG, JPEG, TIFF, WebP)")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise JobError(f"{name} is {image.shape[1]}×{image.shape[0]}; the limit is "
                       f"{MAX_PIXELS // 1_000_000} megapixels")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_burst(path: Path, max_frames: int) -> list[np.ndarray]:
    """The images of a zip, in name order (how cameras number a burst)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise JobError(f"{path.name} is not a valid zip archive") from None
    with archive:
        names = sorted(n for n in archive.namelist()
                       if Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.endswith("/")
                       and not Path(n).name.startswith("."))
        if not names:
            raise JobError(f"{path.name} holds no images (PNG, JPEG, TIFF, WebP)")
        if len(names) > max_frames:
            raise JobError(f"{path.name} holds {len(names)} images; the limit is {max_frames}")
        frames = []
        for name in names:
            info = archive.getinfo(name)
            if info.file_size > 512 * 1024 * 1024:
                raise JobError(f"{name} in {path.name} is larger than 512 MB")
            frames.append(decode_image(archive.read(name), name))
    return frames


@dataclass
class VideoStream:
    width: int
    height: int
    fps: float  # 0 when the file does not say
    duration_s: float
    frames: Iterator[np.ndarray]  # H×W×3 uint8 RGB, decoded as they are read


@contextlib.contextmanager
def open_video(path: Path) -> Iterator[VideoStream]:
    """Decode a video lazily, frame by frame; a file that is no video is a ``JobError``."""
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as exc:
        raise JobError(f"{path.name} is not a video this server can decode ({exc})") from None
    try:
        width, height = meta["size"]
        if width * height > MAX_PIXELS:
            raise JobError(f"{path.name} is {width}×{height}; the limit is "
                           f"{MAX_PIXELS // 1_000_000} megapixels")
        frames = (np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader)
        yield VideoStream(width, height, float(meta.get("fps") or 0.0),
                          float(meta.get("duration") or 0.0), frames)
    finally:
        reader.close()


def read_video(path: Path, max_frames: int) -> Clip:
    """Decode up to ``max_frames`` RGB frames of a video."""
    with open_video(path) as video:
        frames = list(itertools.islice(video.frames, max_frames))
    if not frames:
        raise JobError(f"{path.name} has no video frames")
    return Clip(frames, video.fps, video.duration_s)


def to_float(image: np.ndarray) -> np.ndarray:
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    return image.astype(np.float32) / scale


def from_float(image: np.ndarray, bits: int) -> np.ndarray:
    top = 65535.0 if bits == 16 else 255.0
    dtype = np.uint16 if bits == 16 else np.uint8
    return (np.clip(image, 0.0, 1.0) * top + 0.5).astype(dtype)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write RGB(A) uint8/uint16 as PNG, atomically."""
    if image.ndim == 3 and image.shape[2] == 4:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    elif image.ndim == 3:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    else:
        bgr = image
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError(f"could not encode {path.name} as PNG")
    files.write_bytes(path, encoded.tobytes())


def jpeg_bytes(image: np.ndarray, width: int = 320) -> bytes:
    """A small JPEG preview (for reports) of an RGB image of any depth."""
    preview = image[..., :3]
    if preview.dtype != np.uint8:
        preview = from_float(to_float(preview), 8)
    height = max(1, round(preview.shape[0] * width / preview.shape[1]))
    small = cv2.resize(preview, (width, height), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 85])
    return encoded.tobytes() if ok else b""


def copy_audio(video: Path, audio_source: Path, dest: Path) -> None:
    """``video``'s picture with ``audio_source``'s sound (if it has any), as ``dest``
    (atomically). The audio is copied as is, or made AAC when MP4 cannot hold it."""
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    with files.atomic_path(dest) as tmp:
        for audio_codec in ("copy", "aac"):
            result = subprocess.run(
                [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                 "-i", str(video), "-i", str(audio_source), "-map", "0:v", "-map", "1:a?",
                 "-c:v", "copy", "-c:a", audio_codec, "-movflags", "+faststart",
                 "-f", "mp4", str(tmp)], capture_output=True, text=True, check=False)
            if result.returncode == 0:
                return
        raise RuntimeError(f"ffmpeg could not add the audio: {result.stderr.strip()[-500:]}")

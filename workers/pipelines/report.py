"""The job report: ``report.json`` for programs and ``report.html`` for people.

The HTML is one self-contained file (inline CSS, thumbnails as base64 JPEG, no
network) that plays the video from a sibling file. Delivery renames the video (to
``<stem>.mp4`` beside ``<stem>.report.html``), so it calls ``write_html`` again with
the delivered names; thumbnails are found through ``report.json``, which names them
relative to the job directory.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from daemon import files
from workers import gpu
from workers.context import JobContext
from workers.fonts import has_cjk
from workers.pipelines.animatic import SceneClip
from workers.pipelines.encode import VideoInfo
from workers.pipelines.storyboard import Storyboard

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def build_report(
    job: JobContext,
    options: dict[str, Any],
    board: Storyboard,
    clips: list[SceneClip],
    video: Path,
    info: VideoInfo,
    font: Path | None,
) -> dict[str, Any]:
    """Everything worth knowing about a finished ``video`` job, as JSON-ready data."""
    spec = job.spec
    scenes = [
        {
            "number": scene.number,
            "description": scene.description,
            "duration_s": round(scene.duration_s, 3),
            "frames": scene.frames,
            "camera": scene.camera,
            "subtitle": scene.subtitle,
            "thumbnail": clip.thumbnail.relative_to(job.dir).as_posix(),
        }
        for scene, clip in zip(board.scenes, clips, strict=True)
    ]
    timings = {name: _seconds(job.timings.get(name)) for name in ("plan", "render", "encode")}
    return {
        "id": spec.id,
        "kind": spec.kind,
        "status": "done",
        "source": spec.source.model_dump(mode="json"),
        "submitted_by": spec.submitted_by,
        "created_at": spec.created_at.isoformat(),
        "prompt": spec.prompt,
        "options": options,
        "storyboard": {
            "title": board.title,
            "style": board.style,
            "seed": board.seed,
            "planner": board.planner,
            "scenes": scenes,
        },
        "timings": {"queue_wait": _seconds(job.queue_wait_s), **timings,
                    "total": _seconds(job.elapsed())},
        "device": gpu.device_name(),
        "output": {
            "path": str(video.resolve()),
            "duration_s": round(info.duration_s, 3),
            "frames": info.frames,
            "width": info.width,
            "height": info.height,
            "fps": board.fps,
            "codec": "h264",
            "pix_fmt": "yuv420p",
            "size_bytes": info.size_bytes,
        },
        "font": str(font) if font else "PIL built-in font",
        "warnings": list(job.warnings),
        "version": _version(),
    }


def write_reports(job_dir: Path, report: dict[str, Any]) -> None:
    files.write_json(job_dir / REPORT_JSON, report)
    write_html(job_dir)


def write_html(job_dir: Path, dest: Path | None = None, video_name: str = "video.mp4") -> Path:
    """Write the HTML page for the report in ``job_dir`` to ``dest`` (by default
    ``<job_dir>/report.html``), its player pointing at ``video_name`` in the same folder.
    Returns the path written."""
    report = json.loads((job_dir / REPORT_JSON).read_text(encoding="utf-8"))
    dest = dest or job_dir / REPORT_HTML
    files.write_text(dest, render_html(job_dir, report, quote(video_name)))
    return dest


def render_html(job_dir: Path, report: dict[str, Any], video_url: str) -> str:
    """The report page; ``video_url`` is the player's source, a URL relative to the page."""
    board, output, timings = report["storyboard"], report["output"], report["timings"]
    thumbnails = [_data_uri(job_dir / scene["thumbnail"]) for scene in board["scenes"]]
    poster = f' poster="{thumbnails[0]}"' if thumbnails and thumbnails[0] else ""
    source = report["source"]
    sender = f" by {_e(report['submitted_by'])}" if report["submitted_by"] else ""

    storyboard_rows = "".join(_scene_row(scene, thumb)
                              for scene, thumb in zip(board["scenes"], thumbnails, strict=True))
    timing_rows = _rows((label, _duration(timings.get(key))) for key, label in (
        ("queue_wait", "queue wait"), ("plan", "plan"), ("render", "render"),
        ("encode", "encode"), ("total", "total")))
    parameter_rows = _rows([
        ("size", f"{output['width']}×{output['height']}"),
        ("frame rate", f"{output['fps']} fps"),
        ("duration", f"{output['duration_s']:.3f} s ({output['frames']} frames)"),
        ("video", f"{output['codec']}, {output['pix_fmt']}, {_size(output['size_bytes'])}"),
        ("style", board["style"] or "—"),
        ("seed", str(board["seed"])),
        ("scenes from", "the job's own scenes" if board["planner"] == "job" else "the prompt"),
        ("options", json.dumps(report["options"], ensure_ascii=False) if report["options"]
         else "—"),
        ("device", report["device"]),
        ("font", report["font"]),
        ("reelqueue", report["version"]),
    ])
    warnings = ""
    if report["warnings"]:
        items = "".join(f"<li>{_e(w)}</li>" for w in report["warnings"])
        warnings = f"<section class=warnings><h2>Warnings</h2><ul>{items}</ul></section>"
    prompt = _e(report["prompt"]) or "<em>(no prompt: the job gave its own scenes)</em>"
    lang = "zh" if has_cjk(report["prompt"] + board["title"]) else "en"

    return f"""<!doctype html>
<html lang={lang}>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(board['title'])} — reelqueue</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>{_e(board['title'])}</h1>
<p class=meta>job {_e(report['id'])} · {_e(report['kind'])} · {_e(report['created_at'])} ·
from {_e(source['channel'])}{sender}</p>
<blockquote class=prompt>{prompt}</blockquote>
<video controls preload="metadata"{poster} src={_q(video_url)}></video>
{warnings}
<section><h2>Storyboard</h2>
<table class=storyboard>
<thead><tr><th></th><th>#</th><th>camera</th><th>duration</th><th>description</th></tr></thead>
<tbody>{storyboard_rows}</tbody>
</table></section>
<section class=columns>
<div><h2>Timings</h2><table>{timing_rows}</table></div>
<div><h2>Parameters</h2><table>{parameter_rows}</table></div>
</section>
</main>
</body>
</html>
"""


def _scene_row(scene: dict[str, Any], thumbnail: str) -> str:
    image = f'<img src={_q(thumbnail)} alt="scene {scene["number"]}">' if thumbnail else ""
    subtitle = f"<div class=subtitle>{_e(scene['subtitle'])}</div>" if scene["subtitle"] else ""
    return (
        f"<tr><td>{image}</td><td class=num>{scene['number']}</td>"
        f"<td>{_e(scene['camera'])}</td><td class=num>{scene['duration_s']:.2f} s</td>"
        f"<td>{_e(scene['description'])}{subtitle}</td></tr>"
    )


_CSS = """
body{margin:0;background:#f4f4f2;color:#1d1d1f;
font:15px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC",sans-serif}
main{max-width:960px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px}
.meta{color:#6b6b70;margin:0 0 16px}
.prompt{white-space:pre-wrap;margin:0 0 16px;padding:12px 16px;background:#fff;
border-left:4px solid #3b6ef5;border-radius:4px}
video{width:100%;background:#000;border-radius:6px}
table{border-collapse:collapse;width:100%;background:#fff;border-radius:6px;overflow:hidden}
th,td{text-align:left;vertical-align:top;padding:6px 10px;border-bottom:1px solid #e6e6e3}
th{font-weight:600;color:#6b6b70}
td.num{white-space:nowrap;font-variant-numeric:tabular-nums}
.storyboard img{display:block;width:160px;border-radius:3px}
.subtitle{color:#8a6d00;margin-top:4px}
.columns{display:grid;grid-template-columns:1fr 1.6fr;gap:20px}
.columns td{overflow-wrap:anywhere}
.warnings{background:#fff4e0;border:1px solid #f0c36d;border-radius:6px;padding:0 16px}
@media (max-width:700px){.columns{grid-template-columns:1fr}.storyboard img{width:96px}}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _q(value: str) -> str:
    """An attribute value, quoted and escaped."""
    return f'"{_e(value)}"'


def _rows(pairs: Any) -> str:
    return "".join(f"<tr><th>{_e(label)}</th><td>{_e(value)}</td></tr>" for label, value in pairs)


def _data_uri(path: Path) -> str:
    try:
        return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:  # a report must still render if a thumbnail went missing
        return ""


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _duration(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} s"


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f} MB" if size_bytes >= 1e5 else f"{size_bytes / 1e3:.0f} kB"


def _version() -> str:
    try:
        return importlib.metadata.version("reelqueue")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout
        return "unknown"

"""The job report: ``report.json`` for programs and ``report.html`` for people.

``report.json`` holds everything needed to make the video again: the request, every
setting as resolved (config defaults included), the storyboard with each scene's
prompt, the subtitles, timings per stage, the device, degradations and warnings.

The HTML is one self-contained file (inline CSS, SVG charts and script, thumbnails as
base64 JPEG, no network) that plays the video from a sibling file. It is written once,
here, and copied or served unchanged: a tiny inline script (``PLAYER_JS``) finds the
video wherever the page is opened. In the job directory that is ``video.mp4``; delivered
to a folder as ``<stem>.report.html`` it is ``<stem>.mp4`` beside it; served by the
HTTP API under a signed link (``…/files/report.html?expires=…&sig=…``) it is
``video.mp4`` with the same query, since a signature opens all of one job's files
(``daemon.links``). Without script the player falls back to ``video.mp4``. The page
renders older reports too: every section whose data is missing is left out.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from daemon import files
from daemon.storyboard import Storyboard
from daemon.text import has_cjk
from workers import reports
from workers.context import JobContext
from workers.pipelines.animatic import SceneClip
from workers.pipelines.post import Production
from workers.pipelines.subtitles import VTT_FILE
from workers.pipelines.video_settings import PostConfig

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
ANIMATIC = "animatic — no video model configured"
ANIMATIC_HOW = ("This video is an animatic: the storyboard drawn as titled shots with camera "
                "moves, because no video model is configured. To render with one, set [video] "
                'backend = "diffusers" and model = "<a model folder in [models] dir>" (see '
                "docs/gpu.md for the models and how to install them).")
STAGES = (("queue_wait", "queue wait", "#aeaeb2"), ("plan", "plan", "#8e8cf0"),
          ("render", "render", "#3a86ff"), ("post", "post", "#2bb673"))


def build_report(
    job: JobContext,
    options: dict[str, Any],
    post_settings: PostConfig,
    board: Storyboard,
    clips: list[SceneClip],
    production: Production,
    font: Path | None,
) -> dict[str, Any]:
    """Everything worth knowing about a finished ``video`` job, as JSON-ready data."""
    video, info = job.config.video, production.info
    scenes = []
    start = 0
    for scene, clip in zip(board.scenes, clips, strict=True):
        scenes.append({
            "number": scene.number,
            "description": scene.description,
            "prompt": board.scene_prompt(scene),
            "start_s": round(start / board.fps, 3),
            "duration_s": round(scene.duration_s, 3),
            "frames": scene.frames,
            "camera": scene.camera,
            "subtitle": scene.subtitle,
            "thumbnail": clip.thumbnail.relative_to(job.dir).as_posix(),
        })
        start += scene.frames
    return {
        **reports.job_fields(job, options),
        "settings": {
            "video": {"backend": video.backend, "width": info.width, "height": info.height,
                      "fps": board.fps, "scene_seconds": video.scene_seconds,
                      "crf": options.get("crf", video.crf)},
            "post": {**post_settings.model_dump(mode="json"),
                     "look_values": dataclasses.asdict(production.look)},
        },
        "storyboard": {
            "title": board.title,
            "style": board.style,
            "seed": board.seed,
            "planner": board.planner,
            "fps": board.fps,
            "scenes": scenes,
        },
        "subtitles": {
            "mode": post_settings.subtitles,
            "burned_in": production.burned_in,
            "files": [path.name for path in production.subtitle_files],
            "cues": [{"start_s": round(cue.start / board.fps, 3),
                      "end_s": round(cue.end / board.fps, 3), "text": cue.text}
                     for cue in production.cues],
        },
        "music": production.music,
        "poster": production.poster.name,
        "output": {
            "path": str(production.video.resolve()),
            "duration_s": round(info.duration_s, 3),
            "frames": info.frames,
            "width": info.width,
            "height": info.height,
            "fps": production.fps,
            "codec": "h264",
            "pix_fmt": "yuv420p",
            "size_bytes": info.size_bytes,
            "streams": [f"{s.kind}: {s.codec}" for s in info.streams],
            "fitted_kbps": production.fitted_kbps,
        },
        "font": str(font) if font else "PIL built-in font",
        "degradations": list(production.degradations),
    }


def write_reports(job_dir: Path, report: dict[str, Any]) -> None:
    files.write_json(job_dir / REPORT_JSON, report)
    write_html(job_dir)


def write_html(job_dir: Path, video_name: str = "video.mp4") -> Path:
    """Write ``<job_dir>/report.html`` for the report in ``job_dir``, its player pointing
    at ``video_name`` in the same folder. Returns the path written."""
    report = json.loads((job_dir / REPORT_JSON).read_text(encoding="utf-8"))
    dest = job_dir / REPORT_HTML
    files.write_text(dest, render_html(job_dir, report, quote(video_name)))
    return dest


# --- the page ----------------------------------------------------------------------------


# Where the video is, wherever the page was opened (the module docstring says where).
# The player's src is the job directory's name, e.g. "video.mp4"; a page named
# "<stem>.report.html" (folder delivery) plays "<stem>" + that name's suffixes, e.g.
# "fox-2.mp4"; a page opened with a signed query passes the query on. Both names stay
# percent-encoded as the URL has them. No network, no dependencies: it works as file://.
PLAYER_JS = r"""(function () {
  var video = document.getElementById("film"), src = video.getAttribute("src");
  var page = /\/([^\/]+)\.report\.html$/.exec(location.pathname);
  if (page) src = page[1] + src.slice(src.indexOf("."));
  if (/[?&]sig=/.test(location.search)) src += location.search;
  if (src !== video.getAttribute("src")) video.setAttribute("src", src);
})();"""


def render_html(job_dir: Path, report: dict[str, Any], video_url: str) -> str:
    """The report page; ``video_url`` is the player's source in the job directory, a URL
    relative to the page (``PLAYER_JS`` adapts it where the page is delivered)."""
    board, output = report["storyboard"], report["output"]
    thumbnails = [data_uri(job_dir / scene["thumbnail"]) for scene in board["scenes"]]
    still = data_uri(job_dir / report["poster"]) if report.get("poster") else ""
    still = still or (thumbnails[0] if thumbnails else "")
    poster = f" poster={_q(still)}" if still else ""
    subtitles = report.get("subtitles") or {}
    # A player shows the soft track only when the words are not in the picture already.
    vtt = job_dir / VTT_FILE
    track = ""
    if vtt.name in subtitles.get("files", []) and not subtitles.get("burned_in"):
        track = (f'<track kind="subtitles" label="Subtitles" default '
                 f'src="{data_uri(vtt, "text/vtt")}">')
    source = report["source"]
    sender = f" · by {_e(report['submitted_by'])}" if report["submitted_by"] else ""
    prompt = _e(report["prompt"]) or "<em>(no prompt: the job gave its own scenes)</em>"
    lang = "zh" if has_cjk(report["prompt"] + board["title"]) else "en"
    facts = [
        ("made by", made_by(report)),
        ("length", f"{output['duration_s']:.1f} s"),
        ("picture", f"{output['width']}×{output['height']} · {output['fps']} fps"),
        ("file", _size(output["size_bytes"])),
        ("run time", _duration(report["timings"].get("total"))),
        ("device", report["device"]),
    ]
    fact_cards = "".join(f"<div class=fact><span>{_e(label)}</span><b>{_e(value)}</b></div>"
                         for label, value in facts)
    return f"""<!doctype html>
<html lang={lang}>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(board['title'])} — reelqueue</title>
<style>{BASE_CSS}{_CSS}</style>
</head>
<body>
<main>
<header>
<p class=eyebrow>reelqueue report · {_e(report['kind'])}</p>
<h1>{_e(board['title'])}</h1>
<p class=meta>job <code>{_e(report['id'])}</code> · {_e(_when(report['created_at']))} ·
from {_e(source['channel'])}{sender}</p>
</header>
<blockquote class=prompt>{prompt}</blockquote>
<video id=film controls preload="metadata"{poster} src={_q(video_url)}>{track}</video>
<script>{PLAYER_JS}</script>
<div class=facts>{fact_cards}</div>
{_notices(report)}
<section><h2>Storyboard</h2>
<div class=scenes>{"".join(_scene_card(s, t) for s, t in zip(board["scenes"], thumbnails,
                                                               strict=True))}</div>
</section>
{_subtitle_section(subtitles)}
<section><h2>Timings</h2>{_timing_bar(report["timings"])}</section>
{_vram_section(report.get("vram"))}
<section><h2>Parameters</h2>{_parameters(report)}</section>
</main>
</body>
</html>
"""


def made_by(report: dict[str, Any]) -> str:
    """What made the picture, in plain words: the animatic, or which model and steps."""
    generation = report.get("generation")
    if not generation:
        return ANIMATIC
    return f"{generation['model']} · {generation['steps']} steps"


def _notices(report: dict[str, Any]) -> str:
    items = [("note", ANIMATIC_HOW)] if made_by(report) == ANIMATIC else []
    items += [("warning", w) for w in report.get("warnings", [])]
    items += [("degraded", d) for d in report.get("degradations", [])]
    if not items:
        return ""
    rows = "".join(f"<li><span class=tag>{kind}</span>{_e(text)}</li>" for kind, text in items)
    return f"<section class=notices><h2>Warnings</h2><ul>{rows}</ul></section>"


def _scene_card(scene: dict[str, Any], thumbnail: str) -> str:
    image = (f'<img src={_q(thumbnail)} alt="scene {scene["number"]}">' if thumbnail
             else "<div class=noimage></div>")
    start = scene.get("start_s")
    when = (f"{_clock(start)}–{_clock(start + scene['duration_s'])}" if start is not None
            else f"{scene['duration_s']:.2f} s")
    subtitle = scene.get("subtitle")
    said = (f"<p class=said>“{_e(subtitle)}”</p>" if subtitle
            else "<p class=said><em>no subtitle</em></p>" if subtitle == "" else "")
    return (f"<article class=scene><div class=frame>{image}<span class=badge>"
            f"{scene['number']}</span></div><div class=body><p class=shot>"
            f"{_e(scene['camera'])} · {when}</p><p>{_e(scene['description'])}</p>{said}"
            "</div></article>")


def _subtitle_section(subtitles: dict[str, Any]) -> str:
    cues = subtitles.get("cues") or []
    if not cues:
        return ""
    where = ["in the picture"] if subtitles.get("burned_in") else []
    where += ["as a subtitle track in the video"]
    where += [f"as {' and '.join(subtitles['files'])}"] if subtitles.get("files") else []
    how = ", ".join(where[:-1]) + (" and " if len(where) > 1 else "") + where[-1]
    rows = "".join(f"<tr><td class=num>{_clock(c['start_s'])} → {_clock(c['end_s'])}</td>"
                   f"<td>{_e(c['text']).replace(chr(10), '<br>')}</td></tr>" for c in cues)
    return (f"<section><h2>Subtitles</h2><p class=note>{_e(how.capitalize())}.</p>"
            f"<table class=cues>{rows}</table></section>")


def _timing_bar(timings: dict[str, Any]) -> str:
    """The stages as one horizontal bar (inline SVG), each segment as long as it took."""
    spans = [(label, colour, timings.get(key) or 0.0) for key, label, colour in STAGES]
    shown = sum(seconds for _, _, seconds in spans)
    total = max(timings.get("total") or 0.0, shown) or 1.0
    x, segments, legend = 0.0, [], []
    for label, colour, seconds in spans:
        width = 1000 * seconds / total
        if width > 0:
            segments.append(f'<rect x="{x:.1f}" y="0" width="{width:.1f}" height="28" '
                            f'fill="{colour}"><title>{label}: {seconds:.2f} s</title></rect>')
            if width > 70:
                segments.append(f'<text x="{x + 8:.1f}" y="19">{label}</text>')
        legend.append(f"<span><i style='background:{colour}'></i>{label} "
                      f"<b>{_duration(seconds if seconds else None)}</b></span>")
        x += width
    return (f'<svg class="bar" viewBox="0 0 1000 28" preserveAspectRatio="none" role="img" '
            f'aria-label="time per stage"><rect width="1000" height="28" fill="#e8e8ed"/>'
            f'{"".join(segments)}</svg><div class="legend">{"".join(legend)}'
            f"<span>total <b>{_duration(timings.get('total'))}</b></span></div>")


def _vram_section(vram: dict[str, Any] | None) -> str:
    """GPU memory in use over the job's run (inline SVG), when the worker sampled it."""
    timeline = (vram or {}).get("timeline") or []
    if len(timeline) < 2:
        return ""
    total = float(vram.get("total") or max(used for _, used in timeline)) or 1.0
    end = float(timeline[-1][0]) or 1.0
    width, height, left, right, top, bottom = 1000, 220, 56, 992, 8, 196

    def x(t: float) -> float:
        return left + (right - left) * float(t) / end

    def y(used: float) -> float:
        return bottom - (bottom - top) * float(used) / total

    line = " ".join(f"{x(t):.1f},{y(used):.1f}" for t, used in timeline)
    area = f"{left},{bottom} {line} {right},{bottom}"
    grid = "".join(
        f'<line x1="{left}" x2="{right}" y1="{y(total * share):.0f}" y2="{y(total * share):.0f}"'
        f' class="grid"/><text x="{left - 6}" y="{y(total * share) + 4:.0f}" class="axis" '
        f'text-anchor="end">{total * share / 1e9:.0f} GB</text>' for share in (0, 0.5, 1))
    peak = max(used for _, used in timeline)
    return f"""<section><h2>GPU memory</h2>
<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="GPU memory over time">
{grid}<polygon points="{area}" class="area"/><polyline points="{line}" class="line"/>
<text x="{left}" y="{height - 4}" class="axis">0 s</text>
<text x="{right}" y="{height - 4}" class="axis" text-anchor="end">{end:.0f} s</text>
</svg><p class=note>peak {peak / 1e9:.2f} GB of {total / 1e9:.1f} GB</p></section>"""


def _parameters(report: dict[str, Any]) -> str:
    settings = report.get("settings") or {}
    video, post = settings.get("video") or {}, settings.get("post") or {}
    board, output = report["storyboard"], report["output"]
    look = post.get("look")
    rows = [
        ("size", f"{output['width']}×{output['height']}, {output['fps']} fps"),
        ("video", f"{output['codec']} ({output['pix_fmt']}), {_size(output['size_bytes'])}"
                  + (f", CRF {video['crf']}" if "crf" in video else "")),
        ("streams", ", ".join(output.get("streams", [])) or "—"),
        ("style", board["style"] or "—"),
        ("seed", str(board["seed"])),
        ("scenes from", "the job's own scenes" if board["planner"] == "job" else "the prompt"),
        ("look", json.dumps(look, ensure_ascii=False) if isinstance(look, dict)
         else look or "—"),
        ("transition", f"{post['transition']}, {post['transition_duration']:g} s"
         if post else "—"),
        ("music", report.get("music") or "none (silent track)"),
        ("smooth motion", f"× {post['smooth_motion']}" if post else "—"),
        ("size cap", f"{post['max_mb']:g} MB" if post.get("max_mb") else "none"),
        ("options", json.dumps(report["options"], ensure_ascii=False) if report["options"]
         else "—"),
        ("font", report["font"]),
        ("reelqueue", report["version"]),
    ]
    return _rows(rows)


# The look every reelqueue page shares (the digest too).
BASE_CSS = """
:root{--ink:#1d1d1f;--muted:#6e6e73;--line:#e5e5ea;--card:#fff;--accent:#3a86ff}
*{box-sizing:border-box}
body{margin:0;background:#f2f2f4;color:var(--ink);
font:15px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC",sans-serif}
main{max-width:1040px;margin:0 auto;padding:32px 24px 48px}
header{margin-bottom:16px}
.eyebrow{margin:0;color:var(--accent);font-size:12px;font-weight:600;letter-spacing:.08em;
text-transform:uppercase}
h1{font-size:30px;line-height:1.2;margin:4px 0 6px}
h2{font-size:18px;margin:36px 0 12px}
.meta,.note{color:var(--muted);margin:0}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;background:#e8e8ed;padding:1px 5px;
border-radius:4px}
table{border-collapse:collapse;width:100%;background:var(--card);border-radius:10px;
overflow:hidden;box-shadow:0 1px 2px #0000000d}
th,td{text-align:left;vertical-align:top;padding:8px 14px;border-bottom:1px solid var(--line)}
tr:last-child th,tr:last-child td{border-bottom:0}
th{font-weight:600;color:var(--muted);width:26%}
td{overflow-wrap:anywhere}
"""

_CSS = """
.prompt{white-space:pre-wrap;margin:0 0 20px;padding:14px 18px;background:var(--card);
border-left:4px solid var(--accent);border-radius:8px;box-shadow:0 1px 2px #0000000d}
video{display:block;width:100%;background:#000;border-radius:12px;
box-shadow:0 6px 24px #00000026}
.facts{display:grid;grid-template-columns:repeat(5,1fr);gap:12px;margin-top:16px}
.fact{background:var(--card);border-radius:10px;padding:10px 14px;box-shadow:0 1px 2px #0000000d}
.fact span{display:block;color:var(--muted);font-size:12px;text-transform:uppercase;
letter-spacing:.05em}
.fact b{font-size:16px;font-weight:600;overflow-wrap:anywhere}
.notices{background:#fff7e6;border:1px solid #f3c969;border-radius:10px;padding:2px 18px 8px;
margin-top:24px}
.notices h2{margin:14px 0 6px;font-size:16px}
.notices ul{margin:0;padding-left:0;list-style:none}
.notices li{margin:6px 0}
.tag{display:inline-block;font-size:11px;font-weight:700;text-transform:uppercase;
letter-spacing:.05em;color:#8a5a00;background:#fde7b0;border-radius:4px;padding:1px 6px;
margin-right:8px}
.scenes{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:16px}
.scene{background:var(--card);border-radius:12px;overflow:hidden;box-shadow:0 1px 3px #00000014}
.frame{position:relative;background:#000}
.frame img,.noimage{display:block;width:100%;aspect-ratio:16/9;object-fit:cover}
.badge{position:absolute;top:8px;left:8px;background:#000000a6;color:#fff;font-weight:700;
font-size:13px;border-radius:6px;padding:1px 8px}
.body{padding:10px 14px 14px}
.body p{margin:0 0 6px}
.shot{color:var(--muted);font-size:13px;font-variant-numeric:tabular-nums}
.said{color:#7a5c00}
td.num{white-space:nowrap;width:1%;font-variant-numeric:tabular-nums;color:var(--muted)}
.bar{display:block;width:100%;height:28px;border-radius:8px;overflow:hidden}
.bar text{fill:#fff;font-size:13px;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:6px 20px;margin-top:10px;color:var(--muted)}
.legend i{display:inline-block;width:10px;height:10px;border-radius:3px;margin-right:6px}
.legend b{color:var(--ink);font-weight:600;font-variant-numeric:tabular-nums}
.chart{display:block;width:100%;background:var(--card);border-radius:10px;margin-bottom:6px}
.chart .grid{stroke:var(--line)}
.chart .axis{fill:var(--muted);font-size:12px}
.chart .area{fill:#3a86ff26}
.chart .line{fill:none;stroke:var(--accent);stroke-width:2}
@media (max-width:760px){.facts{grid-template-columns:repeat(2,1fr)}h1{font-size:24px}}
"""


# --- small helpers -----------------------------------------------------------------------


def data_uri(path: Path, media_type: str = "image/jpeg") -> str:
    """A file as a data: URI, or "" when it is gone (a report still renders)."""
    try:
        return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()
    except OSError:
        return ""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _q(value: str) -> str:
    """An attribute value, quoted and escaped."""
    return f'"{_e(value)}"'


def _rows(pairs: Any) -> str:
    rows = "".join(f"<tr><th>{_e(label)}</th><td>{_e(value)}</td></tr>"
                   for label, value in pairs)
    return f"<table>{rows}</table>"


def _clock(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}:{rest:04.1f}"


def _when(iso: str) -> str:
    return iso.replace("T", " ")[:19] + " UTC" if iso.endswith(("+00:00", "Z")) else iso


def _duration(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f} MB" if size_bytes >= 1e5 else f"{size_bytes / 1e3:.0f} kB"


"""What every job kind's report shares: the job's identity and timings as JSON, and a
plain self-contained HTML page (inline CSS and images, no network) for kinds whose
output is an image or text rather than a film."""

from __future__ import annotations

import base64
import html
import importlib.metadata
import json
from typing import Any

import numpy as np

from daemon import files
from workers import media
from workers.context import JobContext
from workers.device import device_name

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def human_duration(seconds: float) -> str:
    """A span of time as a person reads it: "42 s", "2.8 min", "3.5 h" (ETAs here, the
    digest's run times)."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def version() -> str:
    try:
        return importlib.metadata.version("reelqueue")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout
        return "unknown"


def seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def job_fields(job: JobContext, options: dict[str, Any]) -> dict[str, Any]:
    """The fields every report starts with."""
    spec = job.spec
    return {
        "id": spec.id,
        "kind": spec.kind,
        "status": "done",
        "source": spec.source.model_dump(mode="json"),
        "submitted_by": spec.submitted_by,
        "created_at": spec.created_at.isoformat(),
        "prompt": spec.prompt,
        "inputs": list(spec.inputs),
        "options": options,
        "timings": {"queue_wait": seconds(job.queue_wait_s),
                    **{name: seconds(value) for name, value in job.timings.items()},
                    "total": seconds(job.elapsed())},
        "device": device_name(),
        "warnings": list(job.warnings),
        "version": version(),
    }


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def table(pairs: Any) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


STYLE = """
body{font:15px/1.45 system-ui,sans-serif;color:#1d1d1f;background:#f5f5f7;margin:0}
main{max-width:960px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#6e6e73}
figure{margin:0;display:inline-block;vertical-align:top;margin:0 12px 12px 0}
figure img{max-width:440px;border-radius:8px;display:block}
figcaption{color:#6e6e73;font-size:13px}
table{border-collapse:collapse;background:#fff;border-radius:8px;width:100%}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #eee;vertical-align:top}
th{color:#6e6e73;font-weight:600;width:30%}
pre{background:#fff;padding:12px;border-radius:8px;overflow:auto;font-size:13px}
.warnings{background:#fff4e0;border:1px solid #f0c36d;border-radius:6px;padding:4px 16px}
"""


def write_still(job: JobContext, options: dict[str, Any], details: dict[str, Any],
                images: dict[str, np.ndarray], title: str, text: str | None = None) -> None:
    """report.json (common fields + ``details``) and a report.html showing ``images``
    (captioned by their keys) and ``text`` (e.g. a caption), then the details."""
    report = {**job_fields(job, options), **details}
    files.write_json(job.dir / REPORT_JSON, report)
    figures = "".join(
        f'<figure><img alt="{escape(name)}" src="data:image/jpeg;base64,'
        f'{base64.b64encode(media.jpeg_bytes(image, 440)).decode()}">'
        f"<figcaption>{escape(name)}</figcaption></figure>"
        for name, image in images.items())
    warnings = "".join(f"<li>{escape(w)}</li>" for w in report["warnings"])
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · {escape(report['id'])}</title><style>{STYLE}</style></head>
<body><main>
<h1>{escape(title)}</h1>
<div class="meta">job {escape(report['id'])} · {escape(report['kind'])} ·
{escape(report['created_at'])} · from {escape(report['source']['channel'])}</div>
{f'<h2>Result</h2><p>{escape(text)}</p>' if text else ''}
{f'<h2>Images</h2>{figures}' if figures else ''}
{f'<h2>Warnings</h2><ul class="warnings">{warnings}</ul>' if warnings else ''}
<h2>Timings</h2>{table((k, '—' if v is None else f'{v:.3f} s')
                       for k, v in report['timings'].items())}
<h2>Details</h2><pre>{escape(json.dumps(details, indent=2, ensure_ascii=False))}</pre>
<h2>Parameters</h2>{table([('inputs', ', '.join(report['inputs']) or '—'),
                           ('options', json.dumps(options, ensure_ascii=False)),
                           ('device', report['device']), ('reelqueue', report['version'])])}
</main></body></html>
"""
    files.write_text(job.dir / REPORT_HTML, page)

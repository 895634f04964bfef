"""Render a report page (or a digest) with headless Chromium into a PNG, to look at it.

    .venv/bin/python scripts/screenshot_report.py                      # a demo job's report
    .venv/bin/python scripts/screenshot_report.py var/jobs/<id>/report.html -o report.png
    .venv/bin/python scripts/screenshot_report.py --digest             # a demo digest

Without a page, it runs a small demo job (animatic, subtitles, a warm look) in a
temporary state folder and adds a made-up VRAM timeline, so every section of the page
shows. Needs Chromium (or Chrome) on PATH; CI machines usually have none.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.compose import config_class  # noqa: E402
from daemon.config import StateConfig  # noqa: E402
from daemon.jobs import JobSpec, Source, write_spec  # noqa: E402
from workers.pipelines import digest, report  # noqa: E402
from workers.runner import run_job_sync  # noqa: E402

Config = config_class()  # the core's tables and the kinds'

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEMO_PROMPT = ("A lighthouse keeper climbs the stairs at dusk. The lamp turns, its beam "
               "sweeps the sea. 远处，一艘小船驶向港口。Morning comes, calm and grey.")


def demo_job(state: Path) -> Path:
    """A finished demo job's directory, its report given a VRAM timeline to draw."""
    config = Config(state=StateConfig(dir=state))
    spec = JobSpec(id="demo", kind="video", prompt=DEMO_PROMPT,
                   options={"duration": 16, "look": "warm", "style": "watercolour"},
                   source=Source(channel="folder", folder=str(state), filename="lighthouse.txt"),
                   submitted_by="ada")
    write_spec(config.jobs_dir, spec)
    outcome = run_job_sync(spec, config)
    if outcome.error:
        sys.exit(f"the demo job failed: {outcome.error}")
    job_dir = config.jobs_dir / spec.id
    data = json.loads((job_dir / report.REPORT_JSON).read_text(encoding="utf-8"))
    total = data["timings"]["total"]
    data["vram"] = {"total": 24e9, "timeline": [
        [total * i / 40, 1.2e9 + 9e9 * min(1, i / 6) + 2e9 * (i % 7 == 3)] for i in range(41)]}
    report.write_reports(job_dir, data)
    return job_dir / report.REPORT_HTML


def demo_digest(state: Path) -> Path:
    demo_job(state)
    config = Config(state=StateConfig(dir=state))
    failed = JobSpec(id="broken", kind="video", prompt="", options={},
                     source=Source(channel="http", client="default"))
    write_spec(config.jobs_dir, failed)
    run_job_sync(failed, config)  # fails: the prompt is empty
    now = datetime.now().astimezone()
    return Path(digest.write(config, now - timedelta(days=1), now + timedelta(minutes=1))["html"])


def screenshot(page: Path, png: Path, width: int, height: int) -> None:
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        sys.exit("no Chromium or Chrome on PATH: install chromium to take screenshots")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--hide-scrollbars", f"--screenshot={png.resolve()}",
                        page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", nargs="?", type=Path, help="an HTML page (default: a demo)")
    parser.add_argument("--digest", action="store_true", help="a demo digest, not a report")
    parser.add_argument("-o", "--out", type=Path, default=Path("report.png"))
    parser.add_argument("--size", default="1200x2400", help="window size, WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(n) for n in args.size.split("x"))
    with tempfile.TemporaryDirectory() as state:
        page = args.page or (demo_digest if args.digest else demo_job)(Path(state))
        screenshot(page, args.out, width, height)
    print(f"{args.out}: {page.name} at {width}×{height}")


if __name__ == "__main__":
    main()

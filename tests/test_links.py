"""Signed links (daemon.links): one signature opens every file of one job, until it
expires, and nothing else."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

from daemon import links

KEY = b"k" * 32


def query(link: str) -> tuple[str, str]:
    fields = parse_qs(urlsplit(link).query)
    return fields["expires"][0], fields["sig"][0]


def test_a_link_opens_every_file_of_its_job_and_no_other_job():
    link = links.file_link(KEY, "job1", "video.mp4", ttl_s=60)
    assert link.startswith("/jobs/job1/files/video.mp4?expires=")
    expires, sig = query(link)
    assert links.verify(KEY, "job1", expires, sig)
    assert links.verify(KEY, "job1", expires, sig, name="report.html")  # the page's video
    assert not links.verify(KEY, "job2", expires, sig)
    assert not links.verify(KEY, "job2", expires, sig, name="video.mp4")
    assert not links.verify(b"x" * 32, "job1", expires, sig)  # another install's key


def test_expired_or_tampered_links_are_refused():
    expires, sig = query(links.file_link(KEY, "job1", "video.mp4", ttl_s=-1))
    assert not links.verify(KEY, "job1", expires, sig)  # expired
    expires, sig = query(links.file_link(KEY, "job1", "video.mp4", ttl_s=60))
    assert not links.verify(KEY, "job1", str(int(expires) + 3600), sig)  # extended
    assert not links.verify(KEY, "job1", expires, sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    assert not links.verify(KEY, "job1", expires, "")
    assert not links.verify(KEY, "job1", "", sig)
    assert not links.verify(KEY, "job1", "-1", sig)


def test_a_link_signed_per_file_before_the_upgrade_opens_that_file_only():
    expires = int(time.time() + 60)
    old = links._mac(KEY, f"job1\0video.mp4\0{expires}")
    assert links.verify(KEY, "job1", str(expires), old, name="video.mp4")
    assert not links.verify(KEY, "job1", str(expires), old, name="report.json")
    assert not links.verify(KEY, "job1", str(expires), old)


def test_base_url_and_odd_names():
    link = links.file_link(KEY, "job1", "my clip.mp4", ttl_s=60, base="https://rq.example/")
    assert link.startswith("https://rq.example/jobs/job1/files/my%20clip.mp4?expires=")


def test_the_key_is_made_once_and_private(tmp_path):
    key = links.link_key(tmp_path)
    assert len(key) == 32 and links.link_key(tmp_path) == key
    assert (tmp_path / "http-link.key").stat().st_mode & 0o777 == 0o600

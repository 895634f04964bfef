"""Request files: every kind of bad input gets a message that says what to fix."""

import pytest

from daemon.jobs import JobError
from intake.jobfile import parse_request
from workers.pipelines import kind_registry

KINDS = kind_registry()


def parse_and_check(name: str, data: bytes) -> None:
    """What the drop folder does with a file: parse it, then submission checks it."""
    request = parse_request(name, data, "video")
    KINDS.validate(request.kind, request.prompt, request.options)


def test_text_prompt():
    request = parse_request("fox.txt", "一只红狐狸在雪地里奔跑。\n".encode(), "video")
    assert request.kind == "video"
    assert request.prompt == "一只红狐狸在雪地里奔跑。"
    assert request.options == {}


def test_json_job_file_carries_options():
    data = b'{"prompt": "a fox", "duration": 6, "width": 256, "height": 144, "fps": 8}'
    request = parse_request("fox.json", data, "video")
    assert request.prompt == "a fox"
    assert request.options == {"duration": 6, "width": 256, "height": 144, "fps": 8}


def test_toml_job_file_and_folder_defaults():
    data = b'prompt = "a fox"\nfps = 12\n'
    request = parse_request("fox.toml", data, "video", {"fps": 8, "seed": 3})
    assert request.options == {"fps": 12, "seed": 3}


def test_utf8_bom_is_accepted():
    assert parse_request("a.txt", "\ufeffhello".encode(), "video").prompt == "hello"


@pytest.mark.parametrize("name, data, message", [
    ("a.txt", b"", "the file is empty"),
    ("a.txt", b"  \n\t\n", "the file is empty"),
    ("a.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks like a binary file"),
    ("a.txt", b"caf\xe9 au lait", "not valid UTF-8 text (undecodable byte at offset 3)"),
    ("a.json", b'{"prompt": "x",', "JSON is malformed at line 1"),
    ("a.json", b'["a fox"]', "must hold one object"),
    ("a.toml", b'prompt = "x\n', "TOML is malformed"),
    ("a.json", b'{"prompt": "x", "colour": "red"}', "unknown option 'colour'"),
    ("a.json", b'{"prompt": "x", "duration": -5}', "option 'duration'"),
    ("a.json", b'{"prompt": "x", "duration": 100000}', "option 'duration'"),
    ("a.json", b'{"prompt": "x", "width": 100000}', "option 'width'"),
    ("a.json", b'{"prompt": "x", "fps": 0}', "option 'fps'"),
    ("a.json", b'{"prompt": "x", "kind": "hologram"}', "unknown job kind 'hologram'"),
    ("a.json", b'{"duration": 6}', "prompt"),
    ("a.pdf", b"%PDF-1.4", "unsupported file type '.pdf'"),
    ("README", b"hello", "unsupported file type '(no extension)'"),
])
def test_bad_requests_are_explained(name, data, message):
    with pytest.raises(JobError) as info:
        parse_and_check(name, data)
    assert message in str(info.value)


def test_overlong_prompt():
    with pytest.raises(JobError, match="limit is 10,000"):
        parse_and_check("a.txt", b"x" * 20_000)

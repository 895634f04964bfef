"""Models on disk: the manifest, verification with its cache, resolving a model for a
job, and the fetch script's behaviour without hub access."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers import models
from workers.models import CatalogueEntry, ModelError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import fetch_models  # noqa: E402


def make_model(models_dir: Path, name: str = "Wan2.1-T2V-1.3B-Diffusers") -> Path:
    path = models_dir / name
    (path / "transformer").mkdir(parents=True)
    (path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    (path / "transformer" / "weights.safetensors").write_bytes(b"\1" * 1000)
    (path / ".cache").mkdir()  # a download's bookkeeping: not part of the model
    (path / ".cache" / "lock").write_text("x")
    return path


def test_the_manifest_records_and_verify_checks_every_file(tmp_path):
    path = make_model(tmp_path)
    entry = models.record_in_manifest(tmp_path, path.name, {"repo": "Wan-AI/x", "revision": "abc"})
    assert sorted(entry["files"]) == ["model_index.json", "transformer/weights.safetensors"]
    assert entry["revision"] == "abc"

    first = models.verify(tmp_path, path.name)
    assert first.ok and first.checked == 2 and first.hashed == 2
    again = models.verify(tmp_path, path.name)
    assert again.ok and again.hashed == 0  # size and mtime unchanged: the cached hash serves


def test_verify_finds_changed_truncated_and_missing_files(tmp_path):
    path = make_model(tmp_path)
    models.record_in_manifest(tmp_path, path.name, {"repo": "r", "revision": "1"})
    weights = path / "transformer" / "weights.safetensors"
    weights.write_bytes(b"\2" * 1000)  # same size, new content, new mtime
    os.utime(weights, ns=(1, 1))
    assert models.verify(tmp_path, path.name).problems == [
        "transformer/weights.safetensors does not match its SHA-256"]
    weights.write_bytes(b"\1" * 10)
    summary = models.verify(tmp_path, path.name).summary()
    assert "is 10 bytes, not 1,000 (a partial copy?)" in summary
    (path / "model_index.json").unlink()
    assert "model_index.json is missing" in models.verify(tmp_path, path.name).problems


def test_list_models_finds_folders_and_single_files(tmp_path):
    make_model(tmp_path)
    (tmp_path / "Qwen2.5-1.5B-Instruct").mkdir()
    (tmp_path / "Qwen2.5-1.5B-Instruct" / "config.json").write_text(
        '{"architectures": ["Qwen2ForCausalLM"]}')
    (tmp_path / "RealESRGAN_x4plus.pth").write_bytes(b"0" * 64)
    (tmp_path / "notes").mkdir()  # no model description: not a model
    models.record_in_manifest(tmp_path, "RealESRGAN_x4plus.pth", {"url": "https://x"})

    found = {m.name: m for m in models.list_models(tmp_path)}
    assert sorted(found) == ["Qwen2.5-1.5B-Instruct", "RealESRGAN_x4plus.pth",
                             "Wan2.1-T2V-1.3B-Diffusers"]
    wan, upscaler = found["Wan2.1-T2V-1.3B-Diffusers"], found["RealESRGAN_x4plus.pth"]
    assert wan.kind == "WanPipeline" and wan.in_catalogue
    assert wan.size_bytes == 1000 + len('{"_class_name": "WanPipeline"}')
    assert found["Qwen2.5-1.5B-Instruct"].kind == "Qwen2ForCausalLM"
    assert upscaler.in_manifest and upscaler.kind == "pth"
    assert models.verify(tmp_path, "RealESRGAN_x4plus.pth").ok


def test_a_missing_model_fails_at_once_with_the_command_that_installs_it(tmp_path):
    with pytest.raises(ModelError) as error:
        models.require(tmp_path, "Wan2.1-T2V-1.3B-Diffusers")
    assert str(error.value) == (
        f"model 'Wan2.1-T2V-1.3B-Diffusers' is not installed in {tmp_path}. Install it with: "
        "python scripts/fetch_models.py Wan2.1-T2V-1.3B-Diffusers --dest models/ on a machine "
        "with hub access, then copy models/Wan2.1-T2V-1.3B-Diffusers and models/manifest.json "
        f"into {tmp_path}/ here")
    with pytest.raises(ModelError, match="my-finetune.*is not a model folder"):
        models.require(tmp_path, "my-finetune")


def test_a_damaged_model_is_refused_and_an_unlisted_one_is_used_unchecked(tmp_path):
    path = make_model(tmp_path)
    models.record_in_manifest(tmp_path, path.name, {"repo": "r", "revision": "1"})
    assert models.require(tmp_path, path.name) == path
    (path / "transformer" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="is damaged: transformer/weights.safetensors is 0 "
                                         "bytes.*fetch_models.py Wan2.1"):
        models.require(tmp_path, path.name)
    own = make_model(tmp_path, "my-finetune")
    assert models.require(tmp_path, "my-finetune") == own
    assert models.require(tmp_path / "elsewhere", str(own)) == own  # an absolute path


# --- the fetch script -------------------------------------------------------------------------


def test_fetching_without_hub_access_fails_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_models.py"), "LTX-Video",
         "--dest", str(tmp_path)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == fetch_models.NO_HUB
    assert "HF_HUB_OFFLINE is set, so nothing can be downloaded" in result.stderr
    assert not (tmp_path / "manifest.json").exists()


def test_a_single_file_download_lands_with_its_checksum(tmp_path, monkeypatch, capsys):
    source = tmp_path / "release" / "upscaler.pth"
    source.parent.mkdir()
    source.write_bytes(b"weights" * 100)
    monkeypatch.setitem(models.CATALOGUE, "upscaler.pth",
                        CatalogueEntry("upscale", url=source.as_uri()))
    dest = tmp_path / "models"

    assert fetch_models.main(["upscaler.pth", "--dest", str(dest)]) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["models"]["upscaler.pth"]["url"] == source.as_uri()
    assert models.verify(dest, "upscaler.pth").ok and "1 file," in capsys.readouterr().out


def test_the_fetch_script_refuses_unknown_names():
    with pytest.raises(SystemExit) as exit_info:
        fetch_models.main(["Nope-7B"])
    assert exit_info.value.code == 2

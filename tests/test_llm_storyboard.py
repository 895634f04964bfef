"""The storyboard from a local chat model: a tiny random-weight Qwen2 through the real
loading code, constrained decoding with outlines, and the fallback chain."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from daemon.storyboard import PlanRequest, Scene
from tests import tiny_models
from workers.context import JobCancelled
from workers.pipelines import llm_storyboard
from workers.pipelines.llm_storyboard import LlmSettings
from workers.residency import Residency

PROMPT = "A red fox runs through the snow. The sun sets. It looks back at the camera."
VALID_REPLY = json.dumps({
    "title": "The fox", "total_duration": 12, "scenes": [
        {"scene_number": n, "description": f"A red fox in deep snow, shot {n}",
         "subtitle": "狐狸", "duration": 4, "camera": "wide shot", "action": "runs"}
        for n in (1, 2, 3)]})


# What a worker process keeps between jobs, kept here between tests.
RESIDENCY = Residency()


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_unload_after():
    yield from tiny_models.one_thread()
    RESIDENCY.evict()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return tiny_models.session_model("tiny-llm", tmp_path_factory)


def request(duration: float | None = 12, **fields) -> PlanRequest:
    return PlanRequest(prompt=PROMPT, fps=8, scene_seconds=5, duration=duration,
                       style="watercolour, soft light", seed=7, **fields)


def plan(request: PlanRequest, settings: LlmSettings, **kwargs):
    return llm_storyboard.plan_storyboard(request, settings, resident=RESIDENCY, **kwargs)


def settings(model_dir, **fields) -> LlmSettings:
    # Short strings and replies keep a random-weight model's output small.
    return LlmSettings(model_dir=model_dir, **{"text_limit": 12, "max_new_tokens": 40, **fields})


def test_constrained_decoding_gives_a_valid_storyboard_even_from_random_weights(llm):
    result = plan(request(), settings(llm, max_new_tokens=600))

    assert result.path == "llm-constrained", result.reason
    assert result.reason == "the model wrote it under the JSON schema"
    board = result.board
    assert 3 <= len(board.scenes) <= 4  # 12 s: scenes of 3–8 s, at least three
    assert board.duration_s == 12 and board.frames == 96
    assert all(3 <= s.duration_s <= 8 for s in board.scenes)
    assert board.style == "watercolour, soft light" and board.seed == 7
    assert board.inputs_hash == request().digest()  # a restarted job finds it again
    assert all(p.endswith("Style: watercolour, soft light.") for p in result.video_prompts)
    assert len(result.video_prompts) == len(board.scenes)


def test_without_constrained_decoding_a_bad_reply_falls_back_to_the_rules(llm):
    progress = []
    result = plan(
        request(), settings(llm, constrained=False), on_tokens=lambda done, most:
        progress.append(done))

    assert result.path == "rules"
    assert [a.path for a in result.attempts] == ["llm", "llm-repaired"]
    assert not any(a.ok for a in result.attempts)
    assert result.reason.startswith("llm: ") and "llm-repaired: " in result.reason
    assert result.reason.endswith("planned by rules")
    assert result.board.planner == "rules" and result.board.duration_s == 12
    assert progress and max(progress) <= 40


def test_when_outlines_is_missing_the_plain_path_takes_over(llm, monkeypatch):
    RESIDENCY.evict()  # generators built earlier would hide the missing library
    monkeypatch.setitem(sys.modules, "outlines", None)  # import outlines → ImportError
    replies = iter(["Here you go: {\"title\": \"The fox\"", VALID_REPLY])
    monkeypatch.setattr(llm_storyboard, "_generate_plain", lambda *args: next(replies))

    result = plan(request(), settings(llm, text_limit=60))

    assert [(a.path, a.ok) for a in result.attempts] == [
        ("llm-constrained", False), ("llm", False), ("llm-repaired", True)]
    assert result.path == "llm-repaired"
    assert result.reason.startswith("llm-constrained: outlines is not installed")
    assert result.reason.endswith("then the model corrected its reply")
    first = result.board.scenes[0]
    assert first.description == "A red fox in deep snow, shot 1. Runs."
    assert [s.subtitle for s in result.board.scenes] == ["狐狸"] * 3
    assert result.board.title == "The fox"


def test_a_cancel_while_the_model_writes_stops_it(llm):
    def cancel(done: int, most: int) -> None:
        raise JobCancelled()

    with pytest.raises(JobCancelled):
        plan(request(), settings(llm), on_tokens=cancel)


def test_out_of_gpu_memory_unloads_the_model_and_the_rules_take_over(llm):
    def out_of_memory(done: int, most: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    result = plan(request(), settings(llm), on_tokens=out_of_memory)
    assert result.path == "rules"
    assert result.reason == ("llm: out of GPU memory (OutOfMemoryError: CUDA out of memory. "
                             "Tried to allocate 1.00 GiB); planned by rules")
    assert RESIDENCY.get(llm_storyboard.ROLE) is None


def test_a_job_with_its_own_scenes_needs_no_model():
    scenes = [Scene(description="A lighthouse at night", camera="wide shot", duration_s=4)]
    result = plan(request(None, scenes=scenes), LlmSettings(model_dir=Path("/nowhere")))
    assert result.path == "job" and result.video_prompts == [
        "A lighthouse at night. Wide shot. Style: watercolour, soft light."]


# --- the reply ----------------------------------------------------------------------------


def test_the_schema_bounds_every_number_and_string():
    schema = llm_storyboard.storyboard_schema(3, 4, (12,), 50).model_json_schema()
    scene = schema["$defs"]["StoryboardReplyScene"]["properties"]
    assert scene["duration"]["enum"] == [3, 4, 5, 6, 7, 8]
    assert scene["scene_number"]["enum"] == list(range(1, 9))
    assert scene["description"]["maxLength"] == 50
    assert schema["properties"]["total_duration"]["const"] == 12
    assert (schema["properties"]["scenes"]["minItems"],
            schema["properties"]["scenes"]["maxItems"]) == (3, 4)


@pytest.mark.parametrize(("duration", "bounds"), [
    (None, (3, 8)), (3, (1, 1)), (6, (2, 2)), (12, (3, 4)), (20, (3, 6)), (64, (8, 8))])
def test_scene_count_bounds(duration, bounds):
    assert llm_storyboard.scene_count_bounds(duration) == bounds


@pytest.mark.parametrize(("durations", "total"), [
    ([4, 4, 4], 12), ([8, 3], 6), ([3, 3, 3], 24), ([8, 8, 3, 3], 14.5), ([5] * 8, 64)])
def test_fit_durations_adds_up_within_limits(durations, total):
    fitted = llm_storyboard.fit_durations(durations, total)
    assert sum(fitted) == pytest.approx(total)
    assert all(3 <= d <= 8 for d in fitted)


def test_json_is_cut_out_of_a_chatty_reply():
    assert llm_storyboard.extract_json('Sure!\n```json\n{"a": 1}\n```\nEnjoy.') == '{"a": 1}'
    assert llm_storyboard.extract_json('The board: {"a": {"b": 2}} done') == '{"a": {"b": 2}}'
    with pytest.raises(ValueError, match="no JSON object"):
        llm_storyboard.extract_json("I cannot do that.")

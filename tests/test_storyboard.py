"""The storyboard planner and the ``video`` options: pure functions, no rendering."""

from __future__ import annotations

import pytest

from daemon import storyboard
from daemon.jobs import JobError
from daemon.storyboard import PlanRequest, Scene, plan
from workers.pipelines import kind_registry

KINDS = kind_registry()

FOX_ZH = "一只红狐狸在雪地里奔跑。夕阳西下，它回头看向镜头。"
FOX_EN = ("A red fox runs through the snow at dawn. The sun rises over the mountains. "
          "The fox stops and looks into the camera.")


def request(prompt: str = FOX_EN, **fields: object) -> PlanRequest:
    return PlanRequest(prompt=prompt, **{"fps": 16, "scene_seconds": 5.0, **fields})


def assert_frames_exact(board: storyboard.Storyboard, duration: float) -> None:
    assert board.frames == round(duration * board.fps)
    for scene in board.scenes:
        assert scene.duration_s == scene.frames / board.fps
        assert 3 - 1 / board.fps <= scene.duration_s <= 8 + 1 / board.fps


# --- sentences -----------------------------------------------------------------------


def test_chinese_prompt_is_split_on_chinese_punctuation() -> None:
    assert storyboard.split_sentences(FOX_ZH) == ["一只红狐狸在雪地里奔跑。", "夕阳西下，",
                                                  "它回头看向镜头。"]
    board = plan(request(FOX_ZH))
    assert [s.description for s in board.scenes] == ["一只红狐狸在雪地里奔跑。", "夕阳西下，",
                                                     "它回头看向镜头。"]
    assert board.title == "一只红狐狸在雪地里奔跑"
    assert [s.camera for s in board.scenes] == ["wide shot", "medium shot", "close up"]


def test_english_prompt_is_split_into_sentences_but_not_decimals() -> None:
    text = "The car drives at 3.5 km/h... It stops! Why would it? Nobody knows; the end"
    assert storyboard.split_sentences(text) == [
        "The car drives at 3.5 km/h...", "It stops!", "Why would it?", "Nobody knows;", "the end",
    ]
    assert [s.description for s in plan(request(FOX_EN)).scenes] == [
        "A red fox runs through the snow at dawn.", "The sun rises over the mountains.",
        "The fox stops and looks into the camera.",
    ]


def test_closing_quotes_stay_with_their_sentence() -> None:
    assert storyboard.split_sentences('She says "Run!" They run.') == ['She says "Run!"',
                                                                       "They run."]


def test_very_short_fragments_merge_into_a_neighbour() -> None:
    assert storyboard.prompt_sentences("A fox runs through the snow. Then. It stops by a river.") \
        == ["A fox runs through the snow. Then.", "It stops by a river."]
    # A clause that ends in a comma leads into the next one.
    assert storyboard.prompt_sentences("森林里很安静。突然，狐狸停了下来。") == [
        "森林里很安静。", "突然，狐狸停了下来。"]
    assert storyboard.prompt_sentences("Wow! Look.") == ["Wow! Look."]


def test_more_than_eight_sentences_become_eight_scenes() -> None:
    sentences = [f"Shot number {n} shows the harbour." for n in range(1, 12)]
    board = plan(request(" ".join(sentences)))
    assert len(board.scenes) == 8
    joined = " ".join(s.description for s in board.scenes)
    assert all(sentence in joined for sentence in sentences)


def test_punctuation_only_prompt_has_no_sentences() -> None:
    assert storyboard.split_sentences(" ... ！？ ") == []


# --- durations and frames ---------------------------------------------------------------


def test_without_duration_each_scene_gets_the_configured_length() -> None:
    board = plan(request(FOX_EN))
    assert [s.frames for s in board.scenes] == [80, 80, 80]
    assert board.duration_s == 15


def test_too_short_a_duration_merges_scenes() -> None:
    board = plan(request(FOX_EN + " Night falls. Stars come out over the lake.", duration=7))
    assert len(board.scenes) == 2  # floor(7 / 3)
    assert_frames_exact(board, 7)
    assert board.scenes[0].description.startswith("A red fox")
    assert board.scenes[-1].description.endswith("over the lake.")


def test_very_short_duration_gives_one_scene() -> None:
    board = plan(request(FOX_ZH, duration=3.5))
    assert [s.description for s in board.scenes] == [FOX_ZH]
    assert_frames_exact(board, 3.5)


def test_long_duration_repeats_sentences_as_extra_shots() -> None:
    board = plan(request("A lighthouse stands on a rocky coast.", duration=30))
    assert len(board.scenes) == 6  # 30 s at the usual 5 s per scene
    assert {s.description for s in board.scenes} == {"A lighthouse stands on a rocky coast."}
    cameras = [s.camera for s in board.scenes]
    assert all(a != b for a, b in zip(cameras, cameras[1:], strict=False))
    assert_frames_exact(board, 30)


def test_longest_duration_stays_within_eight_scenes() -> None:
    board = plan(request(FOX_EN, duration=64))
    assert len(board.scenes) == 8
    assert_frames_exact(board, 64)


@pytest.mark.parametrize(("duration", "fps"), [(3, 1), (10.3, 7), (25, 16), (41.7, 24),
                                                (64, 60), (12.345, 30)])
def test_frames_add_up_exactly(duration: float, fps: int) -> None:
    for prompt in (FOX_ZH, FOX_EN, "Rain."):
        assert_frames_exact(plan(request(prompt, duration=duration, fps=fps)), duration)


def test_split_frames_keeps_shares_within_a_frame() -> None:
    frames = storyboard.split_frames([3.3, 4.1, 5.0], 8)
    assert sum(frames) == round(12.4 * 8)
    assert all(abs(f - d * 8) <= 1 for f, d in zip(frames, [3.3, 4.1, 5.0], strict=True))


# --- cameras --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "camera"), [
    ("Her eyes open slowly.", "close up"),
    ("A close-up of the old man's hands.", "close up"),
    ("它回头看向镜头。", "close up"),
    ("特写：她的脸。", "close up"),
    ("The city at night, seen from above.", "aerial view"),
    ("Clouds drift across the sky.", "aerial view"),
    ("俯瞰整座城市。", "aerial view"),
    ("天空中飞过一群鸟。", "aerial view"),
    ("A wide shot of the desert.", "wide shot"),
    ("A bird's-eye view of the village.", "aerial view"),  # a shot name beats "eye"
    ("Close-up: the sky reflected in her glasses.", "close up"),
    ("A cat sleeps on the sofa.", None),
    ("The skyscraper's facade is grey.", None),  # "sky" only as a whole word
])
def test_camera_hints(text: str, camera: str | None) -> None:
    assert storyboard.camera_hint(text) == camera


def test_cameras_rotate_from_a_wide_shot_without_hints() -> None:
    prompt = "A cat sleeps. A dog barks loudly. A bird sings outside. The kettle boils."
    assert [s.camera for s in plan(request(prompt)).scenes] == [
        "wide shot", "medium shot", "close up", "medium shot"]


# --- a job's own scenes -----------------------------------------------------------------------


def test_job_scenes_are_used_as_given() -> None:
    scenes = [
        Scene(description="A harbour at dawn, boats rocking.", camera="aerial view"),
        Scene(description="A fisherman mends his net.", duration_s=4, subtitle="Another day."),
        Scene(description="His hands, close.", duration_s=3.5),
    ]
    board = plan(request("", scenes=scenes))
    assert board.planner == "job"
    assert [s.description for s in board.scenes] == [s.description for s in scenes]
    assert [s.duration_s for s in board.scenes] == [5.0, 4.0, 3.5]
    assert [s.camera for s in board.scenes] == ["aerial view", "medium shot", "close up"]
    assert board.scenes[1].subtitle == "Another day."
    assert board.title == "A harbour at dawn, boats rocking"


def test_job_scenes_without_durations_share_the_requested_duration() -> None:
    scenes = [Scene(description="One.", duration_s=6), Scene(description="Two."),
              Scene(description="Three.")]
    board = plan(request("A story in three parts.", scenes=scenes, duration=14))
    assert [s.duration_s for s in board.scenes] == [6.0, 4.0, 4.0]
    assert board.title == "A story in three parts"


# --- stored storyboard ------------------------------------------------------------------------


def test_storyboard_is_saved_and_reused_for_the_same_request(tmp_path) -> None:
    first, reused = storyboard.load_or_plan(tmp_path, request(FOX_ZH, duration=12))
    assert not reused
    assert (tmp_path / "storyboard.json").is_file()
    again, reused = storyboard.load_or_plan(tmp_path, request(FOX_ZH, duration=12))
    assert reused and again == first
    changed, reused = storyboard.load_or_plan(tmp_path, request(FOX_ZH, duration=15))
    assert not reused and changed.frames == 15 * 16


def test_damaged_storyboard_file_is_planned_again(tmp_path) -> None:
    (tmp_path / "storyboard.json").write_text("{not json")
    board, reused = storyboard.load_or_plan(tmp_path, request(FOX_EN))
    assert not reused and len(board.scenes) == 3


def test_same_words_give_the_same_seed_whatever_the_format() -> None:
    assert plan(request(FOX_EN)).seed == plan(request(FOX_EN, fps=24, duration=9)).seed
    assert plan(request(FOX_EN)).seed != plan(request(FOX_ZH)).seed
    assert plan(request(FOX_EN, seed=7)).seed == 7


# --- request validation (what every intake calls before queueing) -----------------------


def test_valid_request_returns_normalised_options() -> None:
    options = KINDS.validate("video", FOX_EN, {"duration": "12", "width": 640, "fps": 24})
    assert options == {"duration": 12.0, "width": 640, "fps": 24}


@pytest.mark.parametrize(("options", "expected"), [
    ({"colour": "red"}, "unknown option 'colour'"),
    ({"duration": -5}, "'duration'"),
    ({"duration": 1000}, "'duration': Input should be less than or equal to 64"),
    ({"width": 5000}, "'width'"),
    ({"width": 641}, "'width': must be even"),
    ({"height": 10}, "'height'"),
    ({"fps": 0}, "'fps'"),
    ({"fps": 240}, "'fps'"),
    ({"seed": -1}, "'seed'"),
    ({"style": "x" * 201}, "'style'"),
    ({"scenes": []}, "'scenes'"),
    ({"scenes": [{"description": "   "}]}, "'scenes.0.description': must not be blank"),
    ({"scenes": [{"description": "A cat.", "camera": "dolly zoom"}]}, "'scenes.0.camera'"),
    ({"scenes": [{"description": "A cat.", "duration_s": 20}]}, "'scenes.0.duration_s'"),
    ({"scenes": [{"description": "A cat.", "lens": "35mm"}]}, "unknown option 'scenes.0.lens'"),
    ({"scenes": [{"description": f"Shot {i}."} for i in range(9)]}, "'scenes'"),
])
def test_bad_options_are_rejected_naming_the_field(options: dict, expected: str) -> None:
    with pytest.raises(JobError) as error:
        KINDS.validate("video", FOX_EN, options)
    assert expected in str(error.value)


def test_empty_prompt_without_scenes_is_rejected() -> None:
    with pytest.raises(JobError, match="the prompt is empty.*scenes"):
        KINDS.validate("video", "  \n", {})
    with pytest.raises(JobError, match="no words"):
        KINDS.validate("video", "!!! ...", {})


def test_empty_prompt_with_scenes_is_fine() -> None:
    assert KINDS.validate("video", "", {"scenes": [{"description": "A cat."}]})


def test_scene_durations_that_disagree_with_duration_are_rejected() -> None:
    scenes = [{"description": "One.", "duration_s": 4}, {"description": "Two.", "duration_s": 5}]
    with pytest.raises(JobError, match=r"add up to 9 s but duration is 12 s"):
        KINDS.validate("video", "", {"scenes": scenes, "duration": 12})
    KINDS.validate("video", "", {"scenes": scenes, "duration": 9})


def test_duration_that_leaves_too_little_for_open_scenes_is_rejected() -> None:
    scenes = [{"description": "One.", "duration_s": 8}, {"description": "Two."}]
    with pytest.raises(JobError, match=r"leaves 2.00 s for each of the 1 scene"):
        KINDS.validate("video", "", {"scenes": scenes, "duration": 10})


def test_an_encoding_that_can_never_succeed_is_refused_at_submission():
    """crf = 0 used to be accepted and fail after all the rendering."""
    with pytest.raises(JobError, match="0 is lossless"):
        KINDS.validate("video", FOX_EN, {"crf": 0})
    assert KINDS.validate("video", FOX_EN, {"crf": 1})["crf"] == 1

"""The storyboard: what each scene shows, from where, and for how many frames.

``plan`` either takes a job's own scenes as they are, or turns the prompt into scenes
by rules: one sentence per scene, very short fragments merged into a neighbour, at
most eight scenes of 3–8 s each that add up to the requested duration. Durations are
allotted in whole frames, so the scene clips add up to the final video exactly.

``load_or_plan`` keeps the result in ``storyboard.json``, so a job that restarts
renders the very same scenes (and can reuse the clips it already has).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daemon import files
from daemon.jobs import JobError
from daemon.text import CJK

Camera = Literal["wide shot", "medium shot", "close up", "aerial view"]
# Establish the place, move closer, show the detail, step back again.
ROTATION: tuple[Camera, ...] = ("wide shot", "medium shot", "close up", "medium shot")
# The angle for one more shot of the same sentence.
NEXT_ANGLE: dict[Camera, Camera] = {
    "wide shot": "medium shot",
    "medium shot": "close up",
    "close up": "medium shot",
    "aerial view": "wide shot",
}
MAX_SCENES = 8
MIN_SCENE_S = 3.0
MAX_SCENE_S = 8.0
TITLE_WIDTH = 60  # columns; a CJK character takes two
PLANNER_VERSION = 1  # bump when the rules change, so stored storyboards are re-planned
STORYBOARD_FILE = "storyboard.json"


class Scene(BaseModel):
    """One scene as a job may give it in ``options.scenes``."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(min_length=1, max_length=1000,
                             description="what the scene shows, in a sentence or two",
                             json_schema_extra={"pattern": r"\S"})  # _not_blank checks it
    duration_s: float | None = Field(default=None, ge=MIN_SCENE_S, le=MAX_SCENE_S)
    camera: Camera | None = None
    subtitle: str | None = Field(default=None, max_length=500)

    @field_validator("description")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must not be blank; say what the scene shows")
        return text.strip()


class StoryboardScene(BaseModel):
    number: int  # from 1
    description: str
    duration_s: float
    frames: int
    camera: Camera
    subtitle: str | None = None


class Storyboard(BaseModel):
    title: str
    style: str
    seed: int
    fps: int
    # scenes from the prompt by rules, from the job itself, or written by a local LLM
    planner: Literal["rules", "job", "llm"]
    inputs_hash: str
    scenes: list[StoryboardScene]

    @property
    def frames(self) -> int:
        return sum(scene.frames for scene in self.scenes)

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps

    def text(self) -> str:
        """Every piece of text the video shows, to pick a font that can draw it."""
        parts = [self.title, self.style]
        for scene in self.scenes:
            parts += [scene.description, scene.subtitle or ""]
        return "\n".join(parts)

    def scene_prompt(self, scene: StoryboardScene) -> str:
        """What a render backend is asked to show for ``scene``: its description in the
        job's style."""
        return f"{scene.description}, {self.style}" if self.style else scene.description


# --- the prompt as sentences ---------------------------------------------------------

_SENTENCE_END = re.compile(
    r"""(?: [。！？；，!?;]+        # Chinese and English sentence and clause marks
          | \.+(?!\d)              # full stops and ellipses, but not the point in 3.5
        )
        [”’"'」』）)\]]*           # closing quotes and brackets stay with their sentence
    """,
    re.VERBOSE,
)
_CLAUSE_MARKS = ("，", "；", ";")  # a fragment ending so leads into the next one
_SHORT_WEIGHT = 4  # below this a fragment is too short to be a scene of its own


def split_sentences(text: str) -> list[str]:
    """Cut text after each sentence or clause mark, keeping the mark with its sentence."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        sentences.append(text[start:match.end()])
        start = match.end()
    sentences.append(text[start:])
    result: list[str] = []
    for sentence in (s.strip() for s in sentences):
        if not sentence:
            continue
        if result and _weight(sentence) == 0:  # stray punctuation: keep it where it was
            result[-1] = _join(result[-1], sentence)
        else:
            result.append(sentence)
    return [s for s in result if _weight(s) > 0]


def prompt_sentences(prompt: str) -> list[str]:
    """The prompt as at most ``MAX_SCENES`` sentences, none of them a mere fragment."""
    sentences = merge_short(split_sentences(prompt))
    return merge_to_count(sentences, MAX_SCENES)


def merge_short(sentences: list[str]) -> list[str]:
    """Merge fragments like "Then." or "突然，" into a neighbour."""
    sentences = list(sentences)
    while len(sentences) > 1:
        short = next((i for i, s in enumerate(sentences) if _weight(s) < _SHORT_WEIGHT), None)
        if short is None:
            break
        leads_on = sentences[short].endswith(_CLAUSE_MARKS)
        into_next = short == 0 or (leads_on and short + 1 < len(sentences))
        first = short if into_next else short - 1
        sentences[first:first + 2] = [_join(sentences[first], sentences[first + 1])]
    return sentences


def merge_to_count(sentences: list[str], count: int) -> list[str]:
    """Merge the shortest adjacent pair until at most ``count`` sentences are left."""
    sentences = list(sentences)
    while len(sentences) > count:
        first = min(range(len(sentences) - 1),
                    key=lambda i: _weight(sentences[i]) + _weight(sentences[i + 1]))
        sentences[first:first + 2] = [_join(sentences[first], sentences[first + 1])]
    return sentences


def _weight(text: str) -> int:
    """How much a text says: CJK characters count one, other words two."""
    cjk = sum(1 for ch in CJK.findall(text) if ch.isalnum())
    words = len(re.findall(r"[^\W_]+", CJK.sub(" ", text)))
    return cjk + 2 * words


def _join(first: str, second: str) -> str:
    # CJK text has no spaces between sentences; other scripts do.
    cjk_seam = CJK.match(first[-1]) or CJK.match(second[0])
    return first + second if cjk_seam else f"{first} {second}"


# --- cameras --------------------------------------------------------------------------

_Hints = tuple[tuple[Camera, tuple[str, ...]], ...]
# Words that name a shot win over words that merely suggest one: "a bird's-eye view"
# is aerial even though it mentions an eye.
_SHOT_NAMES: _Hints = (
    ("close up", ("close up", "close-up", "closeup", "特写", "近景")),
    ("aerial view", ("aerial", "from above", "bird's-eye", "birds-eye", "drone shot",
                     "航拍", "俯瞰", "鸟瞰")),
    ("wide shot", ("wide shot", "long shot", "establishing shot", "全景", "远景")),
    ("medium shot", ("medium shot", "中景")),
)
_SUBJECT_HINTS: _Hints = (
    ("close up", ("face", "faces", "eyes", "eye", "smile", "smiles", "tears", "lips",
                  "portrait", "looks at the camera", "looking at the camera", "into the camera",
                  "脸", "眼睛", "眼神", "微笑", "看向镜头", "看着镜头", "表情")),
    ("aerial view", ("sky", "skyline", "city", "cityscape", "clouds", "drone", "overhead",
                     "天空", "城市", "云层", "高空")),
    ("wide shot", ("landscape", "horizon", "panorama", "field", "desert", "ocean",
                   "远处", "地平线", "原野", "大海")),
    ("medium shot", ("talks", "talking", "conversation", "sits", "sitting",
                     "交谈", "对话", "坐在")),
)


def camera_hint(text: str) -> Camera | None:
    """The camera a sentence asks for by its words (English or Chinese), if any."""
    lowered = text.lower()
    for hints in (_SHOT_NAMES, _SUBJECT_HINTS):
        for camera, keywords in hints:
            if any(_mentions(lowered, keyword) for keyword in keywords):
                return camera
    return None


def _mentions(text: str, keyword: str) -> bool:
    if CJK.match(keyword[0]):  # no spaces in CJK: any occurrence counts
        return keyword in text
    return re.search(rf"\b{re.escape(keyword)}\b", text) is not None


def _rotation_camera(index: int, previous: Camera | None) -> Camera:
    camera = ROTATION[index % len(ROTATION)]
    return ROTATION[(index + 1) % len(ROTATION)] if camera == previous else camera


# --- planning -------------------------------------------------------------------------


def durations_for_total(scenes: list[Scene], total_s: float) -> list[float]:
    """Scene durations that add up to ``total_s``: scenes without ``duration_s`` share
    what the others leave. Raises ``JobError`` when that cannot work."""
    given = sum(s.duration_s for s in scenes if s.duration_s is not None)
    open_count = sum(1 for s in scenes if s.duration_s is None)
    if open_count == 0:
        if abs(given - total_s) > 0.05:
            raise JobError(
                f"the scenes add up to {given:g} s but duration is {total_s:g} s; leave out "
                "duration (the scenes set it) or make the scene durations add up to it"
            )
        return [s.duration_s for s in scenes if s.duration_s is not None]
    share = (total_s - given) / open_count
    if not MIN_SCENE_S - 1e-9 <= share <= MAX_SCENE_S + 1e-9:
        raise JobError(
            f"duration {total_s:g} s leaves {share:.2f} s for each of the {open_count} "
            f"scene(s) without duration_s, but a scene lasts {MIN_SCENE_S:g}–{MAX_SCENE_S:g} s; "
            "change duration or the scene durations"
        )
    return [s.duration_s if s.duration_s is not None else share for s in scenes]


def split_frames(durations_s: list[float], fps: int) -> list[int]:
    """Whole frames per scene that add up to exactly ``round(sum * fps)``: cutting at
    rounded cumulative times keeps each scene within one frame of its share."""
    total_s = sum(durations_s)
    total_frames = round(total_s * fps)
    cuts, elapsed = [0], 0.0
    for duration in durations_s:
        elapsed += duration
        cuts.append(round(total_frames * elapsed / total_s))
    return [end - start for start, end in zip(cuts, cuts[1:], strict=False)]


class PlanRequest(BaseModel):
    """Everything the storyboard depends on; its digest tells whether a stored one fits."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    fps: int
    scene_seconds: float
    duration: float | None = None
    style: str = ""
    seed: int | None = None
    scenes: list[Scene] | None = None
    # Who writes the scenes: "rules", or "llm:<model>"; a change of writer re-plans.
    writer: str = "rules"

    def digest(self) -> str:
        data = f"planner {PLANNER_VERSION}\n{self.model_dump_json()}"
        return hashlib.sha256(data.encode()).hexdigest()


def plan(request: PlanRequest) -> Storyboard:
    """The storyboard for a request already checked by the pipeline's ``check_request``."""
    if request.scenes:
        scenes = request.scenes
        durations = (
            durations_for_total(scenes, request.duration) if request.duration is not None
            else [s.duration_s or request.scene_seconds for s in scenes]
        )
        shots = [(s.description, s.camera, s.subtitle) for s in scenes]
        title = _title_sentence(request.prompt) or scenes[0].description
    else:
        sentences = prompt_sentences(request.prompt)
        if not sentences:
            raise JobError("the prompt is empty: describe the video in a sentence or more")
        planned = _shots_for_duration(sentences, request.duration, request.scene_seconds)
        total_s = request.duration or len(planned) * request.scene_seconds
        durations = [total_s / len(planned)] * len(planned)
        shots = [(text, camera, None) for text, camera in planned]
        title = _title_sentence(request.prompt)
    cameras = _fill_cameras([camera for _, camera, _ in shots])
    frames = split_frames(durations, request.fps)
    digest = request.digest()
    return Storyboard(
        title=shorten_title(title),
        style=request.style,
        seed=request.seed if request.seed is not None else _content_seed(request),
        fps=request.fps,
        planner="job" if request.scenes else "rules",
        inputs_hash=digest,
        scenes=[
            StoryboardScene(number=i + 1, description=description, duration_s=count / request.fps,
                            frames=count, camera=camera, subtitle=subtitle)
            for i, ((description, _, subtitle), camera, count)
            in enumerate(zip(shots, cameras, frames, strict=True))
        ],
    )


def _content_seed(request: PlanRequest) -> int:
    # Without a seed the look still follows from the words: same story, same colours,
    # whatever the size, frame rate or duration.
    scenes = [s.description for s in request.scenes or []]
    words = "\n".join([request.prompt, *scenes]).encode()
    return int(hashlib.sha256(words).hexdigest()[:8], 16)


def _shots_for_duration(
    sentences: list[str], duration: float | None, scene_seconds: float
) -> list[tuple[str, Camera | None]]:
    """(sentence, camera or None for the rotation) per shot, so each lasts 3–8 s."""
    hinted = [(s, camera_hint(s)) for s in sentences]
    if duration is None:
        return hinted
    if duration / len(sentences) < MIN_SCENE_S:  # too short for a scene per sentence
        merged = merge_to_count(sentences, max(1, math.floor(duration / MIN_SCENE_S)))
        return [(s, camera_hint(s)) for s in merged]
    if duration / len(sentences) <= MAX_SCENE_S:
        return hinted
    # Too long for one shot per sentence: film sentences again from another angle,
    # aiming for scenes of the usual length.
    shot_count = min(MAX_SCENES, math.floor(duration / MIN_SCENE_S),
                     max(math.ceil(duration / MAX_SCENE_S), round(duration / scene_seconds)))
    base, extra = divmod(shot_count, len(sentences))
    shots: list[tuple[str, Camera | None]] = []
    for index, (sentence, hint) in enumerate(hinted):
        camera = hint or _rotation_camera(len(shots), shots[-1][1] if shots else None)
        for _ in range(base + (1 if index < extra else 0)):
            shots.append((sentence, camera))
            camera = NEXT_ANGLE[camera]
    return shots


def _fill_cameras(cameras: list[Camera | None]) -> list[Camera]:
    filled: list[Camera] = []
    for index, camera in enumerate(cameras):
        filled.append(camera or _rotation_camera(index, filled[-1] if filled else None))
    return filled


def _title_sentence(prompt: str) -> str:
    """The prompt's first sentence that says something on its own."""
    sentences = split_sentences(prompt)
    return next((s for s in sentences if _weight(s) >= _SHORT_WEIGHT), "".join(sentences[:1]))


def shorten_title(sentence: str) -> str:
    text = sentence.strip().rstrip("。！？；，.!?;:： ")
    width, cut = 0, len(text)
    for index, ch in enumerate(text):
        width += 2 if CJK.match(ch) else 1
        if width > TITLE_WIDTH:
            cut = index
            break
    if cut == len(text):
        return text or sentence.strip()
    shortened = text[:cut]
    if " " in shortened and not CJK.match(text[cut]):  # end on a whole word
        shortened = shortened.rsplit(" ", 1)[0]
    return shortened.rstrip(" ,，") + "…"


def load_or_plan(job_dir: Path, request: PlanRequest,
                 make: Callable[[PlanRequest], Storyboard] | None = None
                 ) -> tuple[Storyboard, bool]:
    """The job's storyboard: the stored one if it was made from the same request, else a
    new one made by ``make`` (default: the rule-based ``plan``), saved. Returns
    ``(storyboard, reused)``."""
    path = job_dir / STORYBOARD_FILE
    try:
        stored = Storyboard.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        stored = None
    if stored is not None and stored.inputs_hash == request.digest():
        return stored, True
    board = (make or plan)(request)
    files.write_json(path, board.model_dump(mode="json"))
    return board, False

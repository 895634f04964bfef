"""The storyboard from a local chat model: the prompt → scenes as JSON → a ``Storyboard``.

A chat model saved on disk (e.g. Qwen2.5-Instruct) gets a system prompt asking for
the scenes as JSON: a title, the total duration, and 3–8 scenes, each with a
description in English for the video model, a subtitle in the prompt's own language,
a duration of 3–8 s, a camera ("wide shot", "medium shot", "close up", "aerial view")
and the action. The first path that gives a valid storyboard wins:

1. ``llm-constrained``: outlines decodes under the JSON schema of a pydantic model,
   so the reply is valid by construction (strings and numbers bounded, so even a
   model that rambles has to close them);
2. ``llm``: plain generation, the JSON cut out of the reply, parsed and validated;
3. ``llm-repaired``: one more turn showing the model its reply and what was wrong;
4. ``rules``: the rule-based planner of ``storyboard.py``, which always works.

``plan_storyboard`` returns the storyboard with the path that made it, why the
earlier ones failed, and the prompt each scene will send to the video model (the
description, the camera and the job's style line; the job's seed is the
storyboard's and serves every scene).

The model stays resident between jobs (in the worker's ``Residency``, role
``"storyboard"``); when the video model needs its VRAM it is moved off the GPU. It
runs whole: out of GPU memory, it is unloaded and the rules planner takes over.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from daemon import storyboard
from daemon.storyboard import (
    MAX_SCENE_S,
    MAX_SCENES,
    MIN_SCENE_S,
    Camera,
    PlanRequest,
    Scene,
    Storyboard,
    StoryboardScene,
)
from workers.device import GpuSettings, pick_device, pick_dtype
from workers.gpu import is_gpu_error, is_out_of_memory, one_line
from workers.ladder import Rung
from workers.models import ModelError
from workers.residency import Acquired, ModelWith, Residency, Resident

ROLE = "storyboard"
PREFERRED_MIN_SCENES = 3
REPLY_KEPT_CHARS = 2000  # of each reply, in the report
PROGRESS_EVERY_TOKENS = 16
MAX_TEXT = Scene.model_fields["subtitle"].metadata[0].max_length

PlanPath = Literal["llm-constrained", "llm", "llm-repaired", "rules", "job"]
TokenCallback = Callable[[int, int], None]  # (tokens so far, at most); may raise to cancel

SYSTEM_PROMPT = """\
You write storyboards for a text-to-video model. Turn the user's idea into {count} scenes \
that tell it from beginning to end, and reply with JSON only, in this form:
{{"title": "...", "total_duration": {total_example}, "scenes": [{{"scene_number": 1, \
"description": "...", "subtitle": "...", "duration": 5, "camera": "wide shot", \
"action": "..."}}]}}
- description: what the camera sees, in English: the subject, the place, the light, \
the colours; concrete and visual, one or two sentences. The video model reads only \
this, so name the characters and the place again in every scene.
- subtitle: one short line for the viewer, in the language of the user's idea.
- duration: whole seconds, {min_s} to {max_s}.
- total_duration: {total_rule}.
- camera: one of "wide shot", "medium shot", "close up", "aerial view".
- action: what moves in the scene, in English, a few words.
- title: a few words, in the language of the user's idea.
Keep characters, place and look the same from scene to scene.{style}"""


@dataclass(frozen=True)
class LlmSettings:
    """``[storyboard]`` in the config, with the model resolved to its folder."""

    model_dir: Path
    constrained: bool = True  # schema-constrained decoding with outlines
    max_new_tokens: int = 2048
    text_limit: int = 300  # characters per title, description, subtitle and action
    device: str | None = None  # None: the GPU if there is one
    keep_resident: bool = True  # False: unload the model once the storyboard is written
    gpu: GpuSettings = GpuSettings()

    def __post_init__(self) -> None:
        if not 1 <= self.text_limit <= MAX_TEXT:
            raise ValueError(f"text_limit must be 1–{MAX_TEXT} (a scene's subtitle holds at "
                             f"most {MAX_TEXT} characters), not {self.text_limit}")


@dataclass
class Attempt:
    path: PlanPath
    ok: bool
    error: str
    reply: str
    seconds: float


@dataclass
class LlmStoryboard:
    board: Storyboard
    path: PlanPath  # what made it
    reason: str  # why that path, in a sentence, for the report
    video_prompts: list[str]  # per scene, what the video model is asked for
    attempts: list[Attempt] = field(default_factory=list)
    load_s: float = 0.0
    reused_model: bool = False

    def report(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "video_prompts": self.video_prompts,
                "attempts": [asdict(a) for a in self.attempts], "load_s": round(self.load_s, 3),
                "reused_model": self.reused_model}


def video_prompt(scene: StoryboardScene, style: str) -> str:
    """What the video model is asked for in one scene: the picture, the shot, the look."""
    parts = [scene.description.rstrip(". "), scene.camera.capitalize()]
    if style.strip():
        parts.append(f"Style: {style.strip().rstrip('.')}")
    return ". ".join(parts) + "."


def plan_storyboard(request: PlanRequest, settings: LlmSettings,
                    on_tokens: TokenCallback | None = None,
                    log: Callable[..., None] | None = None, *,
                    resident: Residency) -> LlmStoryboard:
    """The storyboard for ``request`` (checked by the video pipeline already), the model
    loaded into (or reused from) ``resident``, the worker's (``job.gpu.resident``).

    ``on_tokens(done, most)`` is called while the model writes; an exception raised in
    it (a cancel) stops the generation at the next token and comes out of here.
    ``log(event, **fields)`` hears about each attempt.
    """
    log = log or (lambda event, **fields: None)
    if request.scenes:
        board = storyboard.plan(request)
        return LlmStoryboard(board, "job", "the job gave its own scenes",
                             [video_prompt(s, board.style) for s in board.scenes])

    low, high = scene_count_bounds(request.duration)
    schema = storyboard_schema(low, high, _total_choices(request.duration, low, high),
                               settings.text_limit)
    messages = [{"role": "system", "content": system_prompt(request, low, high)},
                {"role": "user", "content": request.prompt}]
    attempts: list[Attempt] = []
    board, load_s, reused = None, 0.0, False
    try:
        acquired = _acquire(settings, resident)
        load_s, reused = acquired.load_s, acquired.reused
        error = ""
        try:
            board = _ask(acquired.resident, request, messages, schema, settings, on_tokens,
                         attempts)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            error = one_line(exc)
        if error:  # out of the except block: the failed call's tensors are free to go
            resident.evict(ROLE)
            attempts.append(Attempt("llm", False, f"out of GPU memory ({error})", "", 0.0))
    finally:
        if not settings.keep_resident:
            resident.evict(ROLE)
    for attempt in attempts:
        log("storyboard attempt", path=attempt.path, ok=attempt.ok, error=attempt.error,
            seconds=round(attempt.seconds, 2))

    if board is None:
        board = storyboard.plan(request)
        path: PlanPath = "rules"
        reason = "; ".join(f"{a.path}: {a.error}" for a in attempts) + "; planned by rules"
    else:
        path = attempts[-1].path
        reason = _success_reason(attempts)
    return LlmStoryboard(board, path, reason, [video_prompt(s, board.style) for s in board.scenes],
                         attempts, load_s, reused)


def _ask(resident: Resident, request: PlanRequest, messages: list[dict[str, str]],
         schema: type[BaseModel], settings: LlmSettings, on_tokens: TokenCallback | None,
         attempts: list[Attempt]) -> Storyboard | None:
    """Constrained, then plain, then one repair: the storyboard of the first valid reply."""
    chat = resident.model
    steps = [lambda: _plain(chat, messages, settings, on_tokens),
             lambda: _repair(chat, messages, attempts[-1], settings, on_tokens)]
    if settings.constrained:
        steps.insert(0, lambda: _constrained(chat, resident, messages, schema, settings,
                                             on_tokens))
    for step in steps:
        path, reply, error, started = step()
        board, attempt = _checked(path, reply, error, schema, request, started)
        attempts.append(attempt)
        if board is not None:
            return board
    return None


# --- the schema -------------------------------------------------------------------------


def scene_count_bounds(duration: float | None) -> tuple[int, int]:
    """How many scenes of 3–8 s fit ``duration``: 3–8 when free, fewer for a short video."""
    if duration is None:
        return PREFERRED_MIN_SCENES, MAX_SCENES
    high = min(MAX_SCENES, math.floor(duration / MIN_SCENE_S))
    low = max(1, math.ceil(duration / MAX_SCENE_S), min(PREFERRED_MIN_SCENES, high))
    return low, high


def _total_choices(duration: float | None, low: int, high: int) -> tuple[int, ...]:
    if duration is not None:
        return (round(duration),)
    return tuple(range(low * int(MIN_SCENE_S), high * int(MAX_SCENE_S) + 1))


def storyboard_schema(low: int, high: int, totals: tuple[int, ...],
                      text_limit: int) -> type[BaseModel]:
    """The reply as a pydantic model. Every number is an enum and every string has a
    maximum length: a grammar built from it ends in a bounded number of tokens, and
    ``scene_number``, ``duration`` and ``total_duration`` cannot run on forever."""
    text = Field(min_length=1, max_length=text_limit)
    scene = create_model(
        "StoryboardReplyScene", __config__=ConfigDict(extra="forbid"),
        scene_number=(Literal[tuple(range(1, MAX_SCENES + 1))], ...),
        description=(str, text), subtitle=(str, text),
        duration=(Literal[tuple(range(int(MIN_SCENE_S), int(MAX_SCENE_S) + 1))], ...),
        camera=(Camera, ...), action=(str, text),
    )
    return create_model(
        "StoryboardReply", __config__=ConfigDict(extra="forbid"),
        title=(str, text), total_duration=(Literal[totals], ...),
        scenes=(list[scene], Field(min_length=low, max_length=high)),
    )


def system_prompt(request: PlanRequest, low: int, high: int) -> str:
    count = f"{low}" if low == high else f"{low} to {high}"
    if request.duration is not None:
        total = round(request.duration)
        total_rule = f"{total}, and the scene durations add up to it"
    else:
        total, total_rule = 5 * low, "the sum of the scene durations"
    style = (f"\nThe look of every scene is: {request.style.strip()}; do not describe "
             "another look." if request.style.strip() else "")
    return SYSTEM_PROMPT.format(count=count, total_example=total, total_rule=total_rule,
                                min_s=int(MIN_SCENE_S), max_s=int(MAX_SCENE_S), style=style)


# --- the model ---------------------------------------------------------------------------


@dataclass
class ChatModel(ModelWith):
    """A causal LM and its tokenizer."""

    tokenizer: Any

    @property
    def device(self) -> Any:
        return self.model.device


def _acquire(settings: LlmSettings, resident: Residency) -> Acquired:
    device = pick_device(settings.device)
    dtype = pick_dtype(device)
    # The storyboard model runs whole: other roles' models are parked to make room for
    # it, and if it still does not fit, the rules planner is a better storyboard writer
    # than a model offloaded layer by layer for every one of a thousand tokens.
    return resident.acquire(ROLE, settings.model_dir, dtype=dtype, device=device,
                            settings=settings.gpu, rungs=(Rung.ON_DEVICE,),
                            load=lambda rung: _load(settings.model_dir, dtype, device))


def _load(model_dir: Path, dtype: Any, device: Any) -> ChatModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # for terminals; the worker logs JSON lines
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                     local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"the storyboard model in {model_dir} cannot be loaded as a chat model "
            f"({type(exc).__name__}: {exc}); set [storyboard] model to an Instruct model "
            "such as Qwen2.5-1.5B-Instruct, or use the rules planner") from None
    model.eval()
    return ChatModel(model=model.to(device), tokenizer=tokenizer)


class _TokenWatch:
    """A stopping criterion that reports progress; an exception from the callback stops
    generation at the next token and is raised again once ``generate`` has returned."""

    def __init__(self, prompt_tokens: int, most: int, on_tokens: TokenCallback | None):
        self.prompt_tokens = prompt_tokens
        self.most = most
        self.on_tokens = on_tokens
        self.error: BaseException | None = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = input_ids.shape[-1] - self.prompt_tokens
        if self.on_tokens and done % PROGRESS_EVERY_TOKENS == 0:
            try:
                self.on_tokens(done, self.most)
            except BaseException as exc:  # raised again once generate has returned
                self.error = exc
        return torch.full((input_ids.shape[0],), self.error is not None, dtype=torch.bool,
                          device=input_ids.device)

    def raise_if_stopped(self) -> None:
        if self.error is not None:
            raise self.error


def _generation_kwargs(chat: ChatModel, text: str, settings: LlmSettings,
                       on_tokens: TokenCallback | None) -> tuple[dict[str, Any], _TokenWatch]:
    from transformers import StoppingCriteriaList

    prompt_tokens = len(chat.tokenizer(text).input_ids)
    watch = _TokenWatch(prompt_tokens, settings.max_new_tokens, on_tokens)
    # Greedy decoding: the same prompt gives the same storyboard.
    return {"max_new_tokens": settings.max_new_tokens, "do_sample": False,
            "stopping_criteria": StoppingCriteriaList([watch])}, watch


def _chat_text(chat: ChatModel, messages: list[dict[str, str]]) -> str:
    if not getattr(chat.tokenizer, "chat_template", None):
        raise ValueError("the model has no chat template (is it an Instruct/chat model?)")
    return chat.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)


def _generate_plain(chat: ChatModel, messages: list[dict[str, str]], settings: LlmSettings,
                    on_tokens: TokenCallback | None) -> str:
    import torch

    text = _chat_text(chat, messages)
    kwargs, watch = _generation_kwargs(chat, text, settings, on_tokens)
    inputs = chat.tokenizer(text, return_tensors="pt").to(chat.device)
    with torch.inference_mode():
        output = chat.model.generate(**inputs, pad_token_id=chat.tokenizer.pad_token_id
                                     or chat.tokenizer.eos_token_id, **kwargs)
    watch.raise_if_stopped()
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return chat.tokenizer.decode(new_tokens, skip_special_tokens=True)


# --- the attempts ---------------------------------------------------------------------------


# Each attempt returns (path, reply, why there is no reply, when it started).
Asked = tuple[PlanPath, str, str, float]


def _constrained(chat: ChatModel, resident: Resident, messages: list[dict[str, str]],
                 schema: type[BaseModel], settings: LlmSettings,
                 on_tokens: TokenCallback | None) -> Asked:
    started = time.monotonic()
    try:
        generator = _outlines_generator(chat, resident, schema)
        text = _chat_text(chat, messages)
        kwargs, watch = _generation_kwargs(chat, text, settings, on_tokens)
        reply = generator(text, **kwargs)
    except ImportError as exc:
        return "llm-constrained", "", f"outlines is not installed ({exc})", started
    except Exception as exc:
        if is_gpu_error(exc):
            raise
        # A tokenizer or model outlines cannot build a grammar for: plain decoding may.
        return ("llm-constrained", "", f"constrained decoding failed "
                f"({type(exc).__name__}: {exc})", started)
    watch.raise_if_stopped()
    return "llm-constrained", reply, "", started


def _outlines_generator(chat: ChatModel, resident: Resident,
                        schema: type[BaseModel]) -> Any:
    """outlines' generator for ``schema``, built once per model and schema (building the
    grammar's index over a large vocabulary takes seconds)."""
    import outlines

    key = json.dumps(schema.model_json_schema(), sort_keys=True)
    generators = resident.extras.setdefault("outlines_generators", {})
    if key not in generators:
        if "outlines_model" not in resident.extras:
            resident.extras["outlines_model"] = outlines.from_transformers(chat.model,
                                                                           chat.tokenizer)
        generators[key] = outlines.Generator(resident.extras["outlines_model"], schema)
    return generators[key]


def _plain(chat: ChatModel, messages: list[dict[str, str]], settings: LlmSettings,
           on_tokens: TokenCallback | None) -> Asked:
    started = time.monotonic()
    try:
        return "llm", _generate_plain(chat, messages, settings, on_tokens), "", started
    except ValueError as exc:  # no chat template
        return "llm", "", str(exc), started


def _repair(chat: ChatModel, messages: list[dict[str, str]], failed: Attempt,
            settings: LlmSettings, on_tokens: TokenCallback | None) -> Asked:
    started = time.monotonic()
    if not failed.reply:  # nothing to repair: the model could not even be asked
        return "llm-repaired", "", "skipped: there was no reply to repair", started
    turn = [*messages, {"role": "assistant", "content": failed.reply},
            {"role": "user", "content": f"That is not a valid storyboard: {failed.error}. "
                                        "Reply with the corrected JSON only."}]
    return "llm-repaired", _generate_plain(chat, turn, settings, on_tokens), "", started


def _checked(path: PlanPath, reply: str, error: str, schema: type[BaseModel],
             request: PlanRequest, started: float) -> tuple[Storyboard | None, Attempt]:
    """The reply as a storyboard, if it holds one, and the attempt for the report."""
    board = None
    if not error:
        try:
            data = schema.model_validate_json(extract_json(reply))
            board = board_from_reply(data.model_dump(), request)
        except ValueError as exc:  # no JSON object, bad JSON, a field out of bounds
            error = describe_reply_error(exc)
    attempt = Attempt(path, board is not None, error, reply[:REPLY_KEPT_CHARS],
                      time.monotonic() - started)
    return board, attempt


def _success_reason(attempts: list[Attempt]) -> str:
    last = attempts[-1]
    earlier = "; ".join(f"{a.path}: {a.error}" for a in attempts[:-1])
    done = {"llm-constrained": "the model wrote it under the JSON schema",
            "llm": "the model's reply was valid JSON",
            "llm-repaired": "the model corrected its reply"}[last.path]
    return f"{earlier}; then {done}" if earlier else done


# --- the reply ------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def extract_json(reply: str) -> str:
    """The JSON object in a reply: inside a ```json fence if there is one, else from the
    first ``{`` to the last ``}``."""
    if fenced := _FENCE.search(reply):
        reply = fenced.group(1)
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0 or end < start:
        raise ValueError("the reply has no JSON object")
    return reply[start:end + 1]


def describe_reply_error(error: Exception) -> str:
    if isinstance(error, ValidationError):
        problems = [f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}"
                    for e in error.errors()[:3]]
        more = f" (and {error.error_count() - 3} more)" if error.error_count() > 3 else ""
        return "; ".join(problems) + more
    return str(error).splitlines()[0]


def board_from_reply(data: dict[str, Any], request: PlanRequest) -> Storyboard:
    """A schema-valid reply as the job's storyboard: durations fitted to the requested
    total, frames allotted by ``storyboard.plan``, the model's title kept. Raises a
    ``ValidationError`` for what the schema cannot say (a blank description)."""
    scenes = data["scenes"]
    durations = [float(s["duration"]) for s in scenes]
    if request.duration is not None:
        durations = fit_durations(durations, request.duration)
    given = [Scene(description=_with_action(s["description"], s["action"]), duration_s=d,
                   camera=s["camera"], subtitle=s["subtitle"])
             for s, d in zip(scenes, durations, strict=True)]
    board = storyboard.plan(request.model_copy(update={"scenes": given, "duration": None}))
    # Stored with the digest of the prompt-only request, so a restarted job finds it.
    return board.model_copy(update={"title": storyboard.shorten_title(data["title"]),
                                    "inputs_hash": request.digest(), "planner": "llm"})


def _with_action(description: str, action: str) -> str:
    description, action = description.strip(), action.strip()
    if not action or action.lower() in description.lower():
        return description
    return f"{description.rstrip('.')}. {action[0].upper()}{action[1:].rstrip('.')}."


def fit_durations(durations: list[float], total: float) -> list[float]:
    """Scale ``durations`` to add up to ``total``, keeping each within 3–8 s: a scene
    pushed past a limit stays at it and the others share the rest. ``total`` must be
    reachable (``scene_count_bounds`` sees to that)."""
    fitted = list(durations)
    fixed = [False] * len(fitted)
    for _ in fitted:
        free_total = total - sum(d for d, f in zip(fitted, fixed, strict=True) if f)
        free_sum = sum(d for d, f in zip(fitted, fixed, strict=True) if not f)
        fitted = [d if f else d * free_total / free_sum for d, f in zip(fitted, fixed, strict=True)]
        over = [i for i, d in enumerate(fitted) if not fixed[i] and not
                MIN_SCENE_S <= d <= MAX_SCENE_S]
        if not over:
            break
        for i in over:
            fitted[i] = min(max(fitted[i], MIN_SCENE_S), MAX_SCENE_S)
            fixed[i] = True
    return fitted

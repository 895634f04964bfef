"""The video model families the diffusers render backend runs, and how each is loaded.

The model is a local diffusers folder; its family comes from ``_class_name`` in
``model_index.json``: ``WanPipeline`` (Wan 2.1 / 2.2), ``LTXPipeline`` (LTX-Video) or
``CogVideoXPipeline``. Each family has its own rules, read from the loaded pipeline's
configs (``family_rules``): frame counts ``step·k + 1`` (the VAE's temporal
compression: 4 for Wan and CogVideoX, 8 for LTX; CogVideoX 1.5 pads its latent frames
itself), sizes a multiple of the VAE's spatial compression times the patch size (16 for
Wan 2.1 and CogVideoX, 32 for LTX and Wan 2.2 5B), its native frame rate and the most
frames one generation takes. Which image-to-video pipeline runs on text-to-video
weights (``same_weights_image_to_video``), and composing it over the loaded modules,
are here too; loading places the pipeline on a rung of the memory ladder, with the
Wan VAE always in fp32, as its authors advise.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.ladder import Rung, apply_rung
from workers.models import ModelError

TEXT_TO_VIDEO = ("WanPipeline", "LTXPipeline", "CogVideoXPipeline")
IMAGE_TO_VIDEO = ("WanImageToVideoPipeline", "LTXImageToVideoPipeline",
                  "CogVideoXImageToVideoPipeline")


@dataclass(frozen=True)
class FamilyRules:
    frame_step: int  # a generation has frame_step·k + 1 frames
    size_multiple: int
    native_fps: int
    max_frames: int
    steps: int
    guidance_scale: float
    extra: dict[str, Any] = field(default_factory=dict)  # the family's own call arguments



def model_index(model_dir: Path) -> dict[str, Any]:
    """A diffusers folder's ``model_index.json``: the pipeline class and its config."""
    index = model_dir / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{model_dir} is not a diffusers model folder (no model_index.json); "
                         "the diffusers backend needs one, e.g. Wan2.1-T2V-1.3B-Diffusers")
    return json.loads(index.read_text(encoding="utf-8"))


def family_rules(pipe: Any) -> FamilyRules:
    """How the family of ``pipe`` is driven, from its own configs. Sizes are a multiple
    of both what the pipeline's ``check_inputs`` demands and what its VAE and patches
    divide evenly."""
    name = type(pipe).__name__
    transformer = pipe.transformer or getattr(pipe, "transformer_2", None)
    if name.startswith("Wan"):
        # Wan 2.2 TI2V 5B expands timesteps per token; it runs at 24 fps for 121 frames,
        # Wan 2.1 and 2.2 A14B at 16 fps for 81.
        fast = bool(pipe.config.get("expand_timesteps", False))
        return FamilyRules(
            frame_step=pipe.vae_scale_factor_temporal,
            size_multiple=math.lcm(16, pipe.vae_scale_factor_spatial
                                   * transformer.config.patch_size[1]),
            native_fps=24 if fast else 16, max_frames=121 if fast else 81, steps=50,
            guidance_scale=5.0)
    if name.startswith("LTX"):
        # LTX-Video 0.9.1+ decodes with timestep conditioning, and wants a little noise.
        decode = {"decode_timestep": 0.03, "decode_noise_scale": 0.025} \
            if pipe.vae.config.get("timestep_conditioning") else {}
        return FamilyRules(
            frame_step=pipe.vae_temporal_compression_ratio,
            size_multiple=math.lcm(32, pipe.vae_spatial_compression_ratio
                                   * transformer.config.patch_size),
            native_fps=24, max_frames=161, steps=50, guidance_scale=3.0,
            extra={"frame_rate": 24, **decode})
    if name.startswith("CogVideoX"):
        # CogVideoX 1.5 (temporal patches) runs at 16 fps, 2b and 5b at 8. The text
        # length is part of the transformer's positions, so it must be passed.
        version_1_5 = transformer.config.patch_size_t is not None
        return FamilyRules(
            frame_step=pipe.vae_scale_factor_temporal,
            size_multiple=math.lcm(8, pipe.vae_scale_factor_spatial
                                   * transformer.config.patch_size),
            native_fps=16 if version_1_5 else 8, max_frames=transformer.config.sample_frames,
            steps=50, guidance_scale=6.0,
            extra={"max_sequence_length": transformer.config.max_text_seq_length})
    raise ModelError(f"no rules for {name}")


def same_weights_image_to_video(index: dict[str, Any]) -> str | None:
    """The image-to-video pipeline that runs on these text-to-video weights, if any."""
    name = index.get("_class_name")
    if name == "LTXPipeline":
        return "LTXImageToVideoPipeline"
    if name == "WanPipeline" and index.get("expand_timesteps"):
        return "WanImageToVideoPipeline"  # Wan 2.2 TI2V: one model for both
    return None


# --- loading ----------------------------------------------------------------------------------


def load_pipeline(model_dir: Path, dtype: Any, device: Any, rung: Rung) -> Any:
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars are for terminals; the worker logs JSON lines.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    dtypes: Any = dtype
    if model_index(model_dir)["_class_name"].startswith("Wan"):
        dtypes = {"default": dtype, "vae": torch.float32}  # Wan's VAE decodes best in fp32
    pipe = DiffusionPipeline.from_pretrained(model_dir, dtype=dtypes, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    apply_rung(pipe, rung, device)
    return pipe


def check_pipeline_class(model_dir: Path, allowed: tuple[str, ...], what: str) -> dict[str, Any]:
    """The folder's model index, if its pipeline is one of ``allowed``."""
    index = model_index(model_dir)
    name = index.get("_class_name", "")
    if name not in allowed:
        raise ModelError(f"{model_dir.name} is a {name or 'pipeline of no known class'}; as "
                         f"the {what} model the diffusers backend runs {', '.join(allowed)}")
    return index


def check_requirements(class_name: str) -> None:
    # diffusers' Wan image-to-video pipeline cleans prompts with ftfy without checking
    # that it is installed, and would fail mid-job with a NameError.
    if class_name == "WanImageToVideoPipeline" and importlib.util.find_spec("ftfy") is None:
        raise ModelError("continuity with WanImageToVideoPipeline needs the ftfy package: "
                         "pip install ftfy (or set [video] continuity = false)")


def compose_pipeline(pipe: Any, class_name: str) -> Any:
    """``class_name`` over the very modules of ``pipe``: no copy, no dtype change (unlike
    ``from_pipe``, which casts everything to one dtype and would take Wan's VAE out of
    fp32), and the offload hooks on the modules keep working."""
    import diffusers

    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in accepted}
    config = {k: v for k, v in pipe.config.items() if k in accepted and k not in components}
    composed = cls(**components, **config)
    composed.set_progress_bar_config(disable=True)
    return composed

"""How much the diffusers render path costs beyond the pipeline itself, and what the
memory ladder and model residency buy. One run, measured side by side.

    .venv/bin/python scripts/bench_gpu.py                    # on a GPU: Wan 2.1 1.3B and LTX-Video
    .venv/bin/python scripts/bench_gpu.py --device cpu --small   # anywhere: tiny models

The models are built here at their published configurations with random weights (no
download) and saved once under ``--models-dir``, so the render path loads them as a
job would. Random weights compute exactly as much as trained ones. For each model, one
scene (480×832, 81 frames, 30 steps by default, at the model's native rate so it is
one generation):

- first job and second job through ``diffusion.render_scene``: load time, total time,
  and the share of the job spent outside the denoising steps;
- the raw diffusers call on the same pipeline with the same arguments, timed right
  after: our path / raw call (target ≤ 1.03);
- every rung of the ladder, forced, with its peak VRAM (NVML, the whole card, less
  what was in use before) and torch's peak allocation (``--rung-steps`` steps: the
  peak does not grow with more);
- a run under ``--budget-gb`` (default 8) with the rung chosen by the ladder: its peak
  must stay under the budget.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tests import tiny_models  # noqa: E402
from workers.device import GB, GpuSettings, empty_cache, pick_device  # noqa: E402
from workers.ladder import LADDER, Rung, ladder_for  # noqa: E402
from workers.pipelines import diffusion, diffusion_families  # noqa: E402
from workers.residency import Residency  # noqa: E402
from workers.vram import VramMonitor  # noqa: E402

# The bench is its own process: it owns the GPU's resident models, as a worker does.
RESIDENCY = Residency()
PROMPT = ("A red fox runs through deep snow at sunset, its breath steaming. Wide shot. "
          "Style: cinematic, soft light.")


# --- full-size models, random weights ------------------------------------------------------


def _umt5_xxl(vocab_size: int, umt5: bool) -> Any:
    """The T5-XXL encoder (UMT5 for Wan, T5 v1.1 for LTX-Video): 4.7–5.7 B parameters."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config,
                                                                              T5EncoderModel)
    config = config_class(vocab_size=vocab_size, d_model=4096, d_kv=64, d_ff=10240,
                          num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                          relative_attention_num_buckets=32, relative_attention_max_distance=128,
                          tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=1)
    return model_class._from_config(config, dtype=torch.bfloat16)


def build_wan_1_3b(dest: Path) -> None:
    """Wan2.1-T2V-1.3B-Diffusers' configuration."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ).to(torch.bfloat16)
    pipe = WanPipeline(
        tokenizer=tiny_models.t5_tokenizer(), text_encoder=_umt5_xxl(256384, umt5=True),
        vae=AutoencoderKLWan(),  # its defaults are Wan 2.1's VAE
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=3.0),
        transformer=transformer)
    pipe.save_pretrained(dest)


def build_ltx_video(dest: Path) -> None:
    """LTX-Video 0.9's configuration (2 B transformer; its class defaults)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
        max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(
        scheduler=scheduler, vae=AutoencoderKLLTXVideo().to(torch.bfloat16),
        text_encoder=_umt5_xxl(32128, umt5=False), tokenizer=tiny_models.t5_tokenizer(),
        transformer=LTXVideoTransformer3DModel().to(torch.bfloat16))
    pipe.save_pretrained(dest)


# name → (builder, native frame rate): a scene at the native rate is one generation.
FULL_SIZE = {"Wan2.1-T2V-1.3B (random)": (build_wan_1_3b, 16),
             "LTX-Video (random)": (build_ltx_video, 24)}
SMALL = {"tiny-wan": (tiny_models.build_wan, 16), "tiny-ltx": (tiny_models.build_ltx, 24)}


def built(name: str, builder: Callable[[Path], None], models_dir: Path, device: str) -> Path:
    dest = models_dir / name.split(" ")[0]
    if not (dest / "model_index.json").exists():
        started = time.monotonic()
        # Built on the GPU when there is one: initialising billions of weights on the CPU
        # takes minutes.
        with torch.device(device if device.startswith("cuda") else "cpu"):
            builder(dest)
        print(f"built {name} in {time.monotonic() - started:.0f} s → {dest}", flush=True)
        empty_cache()
    return dest


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    what: str
    value: str
    note: str = ""


def synchronized() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def render(scene: diffusion.SceneRequest, settings: diffusion.DiffusionSettings
           ) -> tuple[diffusion.SceneResult, float, VramMonitor]:
    """One scene through the job path, frames discarded; (result, seconds, monitor)."""
    monitor = VramMonitor(settings.gpu)
    synchronized()
    started = time.monotonic()
    with monitor:
        result = diffusion.render_scene(scene, settings, lambda frame: None,
                                        resident=RESIDENCY)
    synchronized()
    return result, time.monotonic() - started, monitor


def raw_call(settings: diffusion.DiffusionSettings, scene: diffusion.SceneRequest,
             result: diffusion.SceneResult) -> float:
    """The resident pipeline called directly with the arguments the render path used."""
    pipe = RESIDENCY.get(diffusion.ROLE).model
    rules = diffusion_families.family_rules(pipe)
    arguments = {
        "prompt": scene.prompt, "negative_prompt": settings.negative_prompt,
        "width": result.generated_size[0], "height": result.generated_size[1],
        "num_frames": result.generations[0], "num_inference_steps": settings.steps,
        "guidance_scale": rules.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(scene.seed), "output_type": "np",
        **rules.extra,
    }
    synchronized()
    started = time.monotonic()
    pipe(**arguments)
    synchronized()
    return time.monotonic() - started


def baseline_used() -> int:
    """What the card holds before a run (other programs, our CUDA context)."""
    monitor = VramMonitor()
    monitor.start()
    monitor.stop()
    return monitor.peak


def peak_note(monitor: VramMonitor, before: int) -> tuple[str, int]:
    report = monitor.report()
    if not report:
        return "n/a (CPU)", 0
    peak = report["peak"] - before
    return f"{peak / GB:.2f} GB (allocated {report['max_allocated'] / GB:.2f})", peak


def bench_model(name: str, model_dir: Path, native_fps: int,
                args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    RESIDENCY.evict()
    settings = diffusion.DiffusionSettings(model_dir=model_dir, steps=args.steps,
                                           device=args.device)
    scene = diffusion.SceneRequest(number=1, scenes=1, prompt=PROMPT, frames=args.frames,
                                   fps=native_fps, width=args.width, height=args.height, seed=0)

    first, first_s, _ = render(scene, settings)
    second, second_s, _ = render(scene, settings)
    rows += [
        Row(name, "scene", f"{second.generated_size[0]}×{second.generated_size[1]}, "
            f"{second.generations} frames, {args.steps} steps",
            f"{second.dtype} on {second.device}"),
        Row(name, "load: first job / second job", f"{first.load_s:.2f} s / {second.load_s:.3f} s",
            "target: second ≈ 0"),
        Row(name, "outside denoising: first / second job",
            f"{1 - first.denoise_s / first_s:.1%} / {1 - second.denoise_s / second_s:.1%}",
            "load, text encoding, VAE decode, frames out"),
    ]

    ours, raw = [], []
    for repeat in range(args.repeats):  # alternating which goes first: no order bias
        for run_raw in (repeat % 2 == 0, repeat % 2 == 1):
            if run_raw:
                raw.append(raw_call(settings, scene, second))
            else:
                ours.append(render(scene, settings)[1])
    ratio = statistics.median(ours) / statistics.median(raw)
    rows.append(Row(name, "our path / raw diffusers call",
                    f"{statistics.median(ours):.2f} s / {statistics.median(raw):.2f} s = "
                    f"{ratio:.3f}", "target ≤ 1.03" + (" ✓" if ratio <= 1.03 else " ✗")))

    rung_settings = diffusion.DiffusionSettings(model_dir=model_dir, steps=args.rung_steps,
                                                device=args.device)
    for rung in args.rungs:
        if rung not in ladder_for(pick_device(args.device)):
            continue
        RESIDENCY.evict()
        before = baseline_used()
        result, seconds, monitor = render(scene, _with(rung_settings, rung=rung))
        peak, _ = peak_note(monitor, before)
        rows.append(Row(name, f"rung {rung}", peak,
                        f"{seconds:.1f} s for {args.rung_steps} steps incl. load "
                        f"{result.load_s:.1f} s"))

    if args.budget_gb and torch.cuda.is_available():
        RESIDENCY.evict()
        before = baseline_used()
        budget = GpuSettings(vram_budget_gb=args.budget_gb)
        result, seconds, monitor = render(scene, _with(rung_settings, gpu=budget))
        peak, used = peak_note(monitor, before)
        torch.cuda.set_per_process_memory_fraction(1.0)
        ok = used < args.budget_gb * GB
        rows.append(Row(name, f"budget {args.budget_gb:g} GB", f"{result.rung}: {peak}",
                        f"target < {args.budget_gb:g} GB" + (" ✓" if ok else " ✗")
                        + f"; step downs {len(result.step_downs)}"))
    RESIDENCY.evict()
    return rows


def _with(settings: diffusion.DiffusionSettings, **changes: Any) -> diffusion.DiffusionSettings:
    from dataclasses import replace

    return replace(settings, **changes)


def print_table(rows: list[Row]) -> None:
    widths = [max(len(getattr(row, column)) for row in rows) for column in ("model", "what",
                                                                             "value")]
    for row in rows:
        print(f"{row.model:<{widths[0]}}  {row.what:<{widths[1]}}  {row.value:<{widths[2]}}  "
              f"{row.note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: the GPU)")
    parser.add_argument("--small", action="store_true", help="tiny models, sizes and steps")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="where built models are kept between runs (default: a temp dir)")
    parser.add_argument("--only", choices=["wan", "ltx"], default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rung-steps", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 832x480)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="raw/ours pairs, the median counts (default 1, 9 with --small)")
    parser.add_argument("--rungs", default=",".join(LADDER),
                        help="rungs to measure, comma-separated")
    parser.add_argument("--budget-gb", type=float, default=8.0)
    args = parser.parse_args()

    small = args.small
    args.steps = args.steps or (2 if small else 30)
    args.repeats = args.repeats or (9 if small else 1)
    args.rung_steps = args.rung_steps or (2 if small else 4)
    args.frames = args.frames or (9 if small else 81)
    width, height = (args.size or ("64x32" if small else "832x480")).split("x")
    args.width, args.height = int(width), int(height)
    args.rungs = [Rung(rung) for rung in args.rungs.split(",") if rung]
    device = str(pick_device(args.device))
    if small:
        torch.set_num_threads(1)  # tiny models: a second thread only spins

    builders = SMALL if small else FULL_SIZE
    chosen = {name: b for name, b in builders.items()
              if args.only is None or args.only in name.lower()}
    with tempfile.TemporaryDirectory() as scratch:
        models_dir = args.models_dir or Path(scratch)
        rows = []
        for name, (builder, native_fps) in chosen.items():
            model_dir = built(name, builder, models_dir, device)
            rows += bench_model(name, model_dir, native_fps, args)
            print(f"{name} done", flush=True)  # a sign of life on long GPU runs
        print()
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

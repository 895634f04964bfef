"""Tiny models with random weights, built offline and saved like real ones.

Each builder writes a model directory with ``save_pretrained`` exactly as a download
would lay it out (``model_index.json`` and one folder per component for diffusers;
``config.json``, weights and tokenizer files for the LLM), so tests and the benchmark
load them through the real ``from_pretrained`` path. Tokenizers are trained here on a
few sentences with ``tokenizers``; nothing is ever fetched.

The text encoders' width (``TEXT_DIM``) matches each transformer's text input, the
sizes are the smallest the architectures accept, and everything is seeded, so a model
built twice is the same model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

if TYPE_CHECKING:
    import pytest

TEXT_DIM = 32
SENTENCES = [
    "A red fox runs through the snow. The sun sets and it looks back at the camera.",
    "A lighthouse on a cliff at night, waves below, the beam sweeps the sea.",
    "wide shot, medium shot, close up, aerial view; soft light, watercolour, cinematic.",
    "一只红狐狸在雪地里奔跑。夕阳西下，它回头看向镜头。",
    '{"title": "The fox", "total_duration": 12, "scenes": [{"scene_number": 1, '
    '"description": "A fox in the snow", "subtitle": "狐狸", "duration": 4, '
    '"camera": "wide shot", "action": "runs"}]}',
]
# The chat format of Qwen2.5-Instruct, reduced to what the storyboard sends.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


# --- tokenizers -----------------------------------------------------------------------


def t5_tokenizer(vocab_size: int = 120) -> T5Tokenizer:
    """A sentencepiece-style unigram tokenizer trained on ``SENTENCES``, as T5 uses."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                      special_tokens=["<pad>", "</s>", "<unk>"])
    unigram.train_from_iterator(SENTENCES * 4, trainer)
    vocab = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def chat_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE chat tokenizer (every byte is a token, as in Qwen2), with the
    special tokens and chat template of Qwen2.5-Instruct."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def _t5_encoder(vocab_size: int, umt5: bool = False) -> T5EncoderModel | UMT5EncoderModel:
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config,
                                                                              T5EncoderModel)
    config = config_class(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37,
                          num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    _seeded()
    return model_class(config)


# --- the storyboard LLM -----------------------------------------------------------------


def build_llm(dest: Path) -> Path:
    """A two-layer Qwen2 chat model (Qwen2.5-Instruct's architecture) at ``dest``."""
    tokenizer = chat_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    _seeded()
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


# --- video pipelines -----------------------------------------------------------------------


def build_wan(dest: Path) -> Path:
    """WanPipeline (Wan 2.1 text-to-video) with a tiny transformer, VAE and UMT5."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    tokenizer = t5_tokenizer()
    _seeded()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(len(tokenizer), umt5=True),
                       vae=vae, scheduler=scheduler, transformer=_wan_transformer(16, 16))
    pipe.save_pretrained(dest)
    return dest


def _wan_transformer(in_channels: int, out_channels: int) -> Any:
    from diffusers import WanTransformer3DModel

    _seeded()
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=in_channels, out_channels=out_channels, text_dim=TEXT_DIM, freq_dim=256,
        ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def build_wan_i2v(dest: Path) -> Path:
    """WanImageToVideoPipeline as a separate image-to-video model (the layout of Wan 2.2
    A14B I2V: the first frame goes in through the latents, no CLIP image encoder)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline

    tokenizer = t5_tokenizer()
    _seeded()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    # 16 noise channels + 4 mask channels + 16 channels of the encoded first frame.
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=_t5_encoder(len(tokenizer), umt5=True), vae=vae,
        scheduler=scheduler, transformer=_wan_transformer(36, 16))
    pipe.save_pretrained(dest)
    return dest


def build_wan22_ti2v(dest: Path) -> Path:
    """WanPipeline in the layout of Wan 2.2 TI2V 5B: a VAE compressing 16× in space and
    timesteps expanded per token, so the same weights also continue from an image."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    tokenizer = t5_tokenizer()
    _seeded()
    vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12,
                           is_residual=True, patch_size=2, latents_mean=[0.0] * 48,
                           latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           scale_factor_spatial=16, scale_factor_temporal=4,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(len(tokenizer), umt5=True),
                       vae=vae, scheduler=scheduler, transformer=_wan_transformer(48, 48),
                       expand_timesteps=True)
    pipe.save_pretrained(dest)
    return dest


def build_ltx(dest: Path) -> Path:
    """LTXPipeline (LTX-Video) with a tiny transformer, VAE and T5."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tokenizer = t5_tokenizer()
    _seeded()
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=TEXT_DIM,
    )
    _seeded()
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                       text_encoder=_t5_encoder(len(tokenizer)), tokenizer=tokenizer,
                       transformer=transformer)
    pipe.save_pretrained(dest)
    return dest


def build_cogvideox(dest: Path) -> Path:
    """CogVideoXPipeline (CogVideoX 2b/5b) with a tiny transformer, VAE and T5."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tokenizer = t5_tokenizer()
    _seeded()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=2, text_embed_dim=TEXT_DIM, num_layers=1, sample_width=2,
        sample_height=2, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    _seeded()
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
        latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(len(tokenizer)),
                             vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.save_pretrained(dest)
    return dest


BUILDERS = {
    "tiny-llm": build_llm,
    "tiny-wan": build_wan,
    "tiny-ltx": build_ltx,
    "tiny-cogvideox": build_cogvideox,
    "tiny-wan-i2v": build_wan_i2v,
    "tiny-wan22-ti2v": build_wan22_ti2v,
}


def build(name: str, models_dir: Path) -> Path:
    """``models_dir/name`` built by its builder (once: an existing one is kept)."""
    dest = models_dir / name
    if not (dest / "config.json").exists() and not (dest / "model_index.json").exists():
        BUILDERS[name](dest)
    return dest


_session_dir: list[Path] = []


def one_thread() -> Iterator[None]:
    """A fixture body: torch on one thread while a test module runs. Tiny models do so
    little per operation that a second OpenMP thread only spins, and on a busy two-core
    CI machine that made a tiny scene 20× slower (3 s instead of 0.15 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def session_model(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``name`` built once per test session, shared by every test module."""
    if not _session_dir:
        _session_dir.append(tmp_path_factory.mktemp("tiny-models"))
    return build(name, _session_dir[0])

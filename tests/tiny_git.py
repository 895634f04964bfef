"""A tiny GIT video-captioning model built offline (random weights, a local word-piece
vocabulary, the PIL image processor), saved like a real checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

WORDS = [
    "a", "the", "fox", "red", "runs", "through", "snow", "dog", "cat", "sits", "on", "table",
    "man", "woman", "is", "in", "walking", "field", "sun", "sets", "light", "dark", "street",
    "city", "car", "drives", "water", "river",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_git(directory: Path, frames: int = 6) -> Path:
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    processor = GitProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(vocab=vocab),
    )
    config = GitConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, num_image_with_embedding=frames,
        bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"],
    )
    torch.manual_seed(0)
    model = GitForCausalLM(config)
    # Random weights would often end at once: make "[SEP]" unlikely, so a caption has words.
    with torch.no_grad():
        model.output.bias[vocab["[SEP]"]] = -10.0
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory

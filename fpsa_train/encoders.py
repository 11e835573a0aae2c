"""The text and video encoders of a Wan2.1 diffusers-format folder, and the negative prompt its models expect.

`Encoders` loads the Wan VAE and the UMT5 text encoder from a components folder (vae/, text_encoder/, tokenizer/);
`negative_prompt` picks the guidance's negative branch for that folder's models. Why a module of its own: the
cache writer (data/), the sampler and evaluation CLIs, and the training run's validation videos (lit/) all encode
with them; they lived in the `preprocess` and `sample` CLIs, which library code must not import.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Wan2.1's default negative prompt (wan/configs/shared_config.py; reference/wan.md §4), for exact reproduction.
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰"
                       "，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部"
                       "，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱"
                       "的背景，三条腿，背景人很多，倒着走")


class Encoders:
    """The Wan VAE and UMT5 text encoder from a diffusers-format folder, on one device, in eval mode."""

    def __init__(self, folder: str | Path, device: torch.device, text_len: int):
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        missing = [p for p in ("vae", "text_encoder", "tokenizer") if not (folder / p).is_dir()]
        if missing:
            raise FileNotFoundError(f"components={folder} lacks {missing}: give a Wan2.1 diffusers-format folder "
                                    "(vae/, text_encoder/, tokenizer/)")
        self.device, self.text_len = device, text_len
        self.vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32,
                                                    low_cpu_mem_usage=False).to(device).eval()
        self.text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder").to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        cfg = self.vae.config
        self.mean = torch.tensor(cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)  # (1, C, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, device=device).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def latents(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] → normalised latent means (B, 16, (T−1)/4+1, H/8, W/8)."""
        mu = self.vae.encode(clips.to(self.device)).latent_dist.mean
        return (mu - self.mean) / self.std

    @torch.no_grad()
    def text(self, captions: list[str]) -> list[torch.Tensor]:
        """Unpadded UMT5 embeddings, one (L_i, D) per caption (padded to text_len for the encoder, then trimmed)."""
        tok = self.tokenizer(captions, padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, text_len, D)
        return [h[: int(n)] for h, n in zip(hidden, mask.sum(1))]


def default_negative_prompt(components: str | Path) -> str:
    """The negative prompt the models of `components` were trained against: its model_index.json's
    `_fpsa_negative_prompt` when present, else Wan's default (real Wan2.1 folders). The synthetic world's components
    name "": the empty caption, which caption dropout taught their models as unconditional; Wan's negative prompt
    is all unknown words to their tokenizer."""
    from fpsa_train.data.tiny_models import NEGATIVE_PROMPT_KEY

    try:
        index = json.loads((Path(components) / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    value = index.get(NEGATIVE_PROMPT_KEY)
    return WAN_NEGATIVE_PROMPT if value is None else str(value)


def negative_prompt(given: str | None, components: str | Path, tokenizer=None) -> str:
    """`given`, else the components' default; warns when most of its words are unknown to the tokenizer (loaded
    from `components` when not given): an unconditional branch the model never saw makes guidance push towards
    nothing (the synthetic world's models drew empty videos for 9 of 24 held-out prompts with Wan's)."""
    text = default_negative_prompt(components) if given is None else given
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(components) / "tokenizer")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    unknown = sum(i == tokenizer.unk_token_id for i in ids) if tokenizer.unk_token_id is not None else 0
    if unknown > len(ids) / 2:
        log.warning("negative_prompt %r is %d of %d unknown tokens for %s's tokenizer: its guidance branch is out of "
                    "the model's distribution; pass negative_prompt='' (the caption-dropout prompt) or one in the "
                    "tokenizer's vocabulary", text[:40], unknown, len(ids), components)
    return text

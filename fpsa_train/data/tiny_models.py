"""A tiny Wan2.1 VAE, text encoder and tokenizer, built locally in the layout of a real diffusers checkpoint.

Why: the tiny default must run the real pipeline (mp4 → VAE latents + UMT5 embeddings → DiT → decode to video) on a
laptop with nothing downloaded. So this writes `vae/`, `text_encoder/`, `tokenizer/` and `model_index.json` as
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` has them, and `load_components` loads them with the same three `from_pretrained`
calls a real checkpoint needs: no code path is tiny-only.

- **VAE**: a diffusers `AutoencoderKLWan` with Wan's layout at base_dim 16 (4× time, 8× space, 16 latent channels,
  causal chunks of 4 frames). The demo must decode to recognisable video, so it is trained briefly on random crops
  of the synthetic clips (AdamW, L1 + MSE of decode(encode(x).mode())). A few hundred CPU steps are far too few
  from diffusers' default init (the decoder learns to ignore z: ~15 dB), so `tiny_vae.init_for_short_training` starts it
  as a smooth near-identity (block average down, bilinear up, per-frame convs, zero residual branches): ~23 dB in
  the same steps. The PSNR of full held-out clips goes in `build_report.json`. Its config's `latents_mean` /
  `latents_std` (the 16 Wan constants in a real checkpoint, reference/wan.md §5) are set to the per-channel
  statistics of its latent means on training clips, so normalised latents are ~unit variance as the DiT expects.
- **Text encoder**: a random 2-layer `UMT5EncoderModel` with d_model = TINY_TEXT_DIM. Random is enough: distinct
  captions give distinct embeddings, and the DiT learns to read them (as Wan learns to read the frozen UMT5-XXL).
- **Tokenizer**: a word-level `tokenizers` model over the synthetic captions' vocabulary with T5's special ids
  (`<pad>` 0, `</s>` 1, `<unk>` 2) and a `</s>` appended, saved as a `PreTrainedTokenizerFast`.

The folder is built in a temporary sibling and renamed at the end, so it is either complete or absent; a complete
one whose `build_report.json` has the same parameters (seed, vae_steps, hash of the clips) is reused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import torch

from fpsa_train.atomic import replacing_dir
from fpsa_train.data.synthetic_video import caption_vocabulary
from fpsa_train.data.tiny_vae import init_for_short_training, train_vae

TINY_TEXT_DIM = 64  # must equal configs/model/tiny.yaml text_dim
VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True])  # Wan's layout: 4× time, 8× space
# model_index.json's key naming the negative prompt the folder's models were trained against (underscored, so
# diffusers ignores it; read by fpsa_train.encoders.default_negative_prompt)
NEGATIVE_PROMPT_KEY = "_fpsa_negative_prompt"
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
BUILD_FORMAT = 2  # bump when the build changes, so cached folders are rebuilt
REPORT = "build_report.json"


def build_tiny_wan_components(folder: str | Path, clips_metadata: str | Path | None, *, seed: int = 0,
                              vae_steps: int = 300, force: bool = False, eval_clips: int = 2,
                              stats_clips: int = 4) -> dict:
    """Build (or reuse) the tiny component folder; return its report (paths, psnr_db, seconds, parameter counts).

    `clips_metadata` is a `video,prompt` CSV (see synthetic_video.generate_clips); its last `eval_clips` clips are
    held out for the PSNR, the first `stats_clips` set the latent statistics, and all but the held-out ones train
    the VAE. None skips training (an untrained VAE with latents_mean/std 0/1, for fast tests).
    """
    from diffusers import AutoencoderKLWan

    folder = Path(folder).resolve()
    videos, clips_hash = _clip_list(clips_metadata) if clips_metadata is not None else ([], None)
    params = {"format": BUILD_FORMAT, "seed": seed, "vae_steps": vae_steps if videos else 0,
              "eval_clips": eval_clips, "stats_clips": stats_clips, "clips_hash": clips_hash}
    try:
        cached = json.loads((folder / REPORT).read_text())
    except (OSError, ValueError):
        cached = None
    if cached is not None and cached.get("params") == params and not force:
        return _with_paths(cached, folder)

    start = time.perf_counter()
    report: dict = {"params": params, "clips_metadata": str(clips_metadata) if clips_metadata else None}
    with replacing_dir(folder) as tmp:  # built beside `folder`, swapped in complete
        with torch.random.fork_rng(devices=[]):  # seeded builds without disturbing the caller's RNG
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(**VAE_CONFIG)
            if videos:
                device = "cuda" if torch.cuda.is_available() else "cpu"
                report.update(train_vae(vae, videos, seed, vae_steps, eval_clips, stats_clips, device=device))
            else:
                init_for_short_training(vae, torch.zeros(3))
                report["vae_training"] = "skipped (clips_metadata=None): untrained VAE, latents_mean/std 0/1"
                vae.register_to_config(latents_mean=[0.0] * vae.config.z_dim, latents_std=[1.0] * vae.config.z_dim)
            vae.save_pretrained(tmp / "vae")
            tokenizer = _save_tokenizer(tmp / "tokenizer")
            torch.manual_seed(seed + 1)
            text_encoder = _build_text_encoder(len(tokenizer))
            text_encoder.save_pretrained(tmp / "text_encoder")
        _write_model_index(tmp)
        report["params_count"] = {name: sum(p.numel() for p in model.parameters())
                                  for name, model in (("vae", vae), ("text_encoder", text_encoder))}
        report["vocab_size"] = len(tokenizer)
        report["seconds"] = round(time.perf_counter() - start, 2)
        report["torch_threads"] = torch.get_num_threads()
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")  # its presence marks a complete folder
    return _with_paths(report, folder)


def load_components(folder: str | Path, device: str | torch.device = "cpu", text_dtype: torch.dtype = torch.float32):
    """(vae, text_encoder, tokenizer) in eval mode from a Wan2.1 diffusers-layout folder, tiny or real. The VAE is
    fp32 as in Wan; `text_dtype` bfloat16 halves the real UMT5-XXL (11 GB in bf16)."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = Path(folder)
    # low_cpu_mem_usage=False: plain construction + load_state_dict. Without `accelerate` diffusers falls back to
    # it anyway, with a warning; asking for it directly is silent.
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32, low_cpu_mem_usage=False)
    text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=text_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    return vae.to(device).eval(), text_encoder.to(device).eval(), tokenizer


def _clip_list(metadata: str | Path) -> tuple[list[Path], str]:
    """The clips a `video,prompt` CSV lists, and a hash of their names and bytes (the cache key)."""
    metadata, h = Path(metadata), hashlib.sha256()
    with open(metadata, newline="") as f:
        videos = [metadata.parent / row["video"] for row in csv.DictReader(f)]
    if not videos:
        raise ValueError(f"{metadata}: no clips listed (expected a `video,prompt` CSV)")
    for p in videos:
        h.update(p.name.encode() + p.read_bytes())
    return videos, h.hexdigest()[:16]


# --- text side ------------------------------------------------------------------------------------------------

def _save_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + caption_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words; punctuation becomes separate (<unk>) tokens
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    tokenizer.save_pretrained(folder)
    # transformers 5 writes `tokenizer_class: TokenizersBackend`, a name 4.x lacks; both load the generic one.
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer


def _build_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


# --- folder bookkeeping ---------------------------------------------------------------------------------------

def _write_model_index(folder: Path) -> None:
    """As in a diffusers WanPipeline folder; the transformer is this project's own DiT, so it is left empty. Names
    the empty prompt as the models' negative prompt (fpsa_train.encoders.default_negative_prompt): caption dropout
    trains them on it, and Wan's is unknown words to this tokenizer."""
    import diffusers

    index = {"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__, NEGATIVE_PROMPT_KEY: "",
             "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": [None, None],
             "scheduler": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")


def _with_paths(report: dict, folder: Path) -> dict:
    names = ("vae", "text_encoder", "tokenizer", "model_index.json", REPORT)
    return {**report, "folder": str(folder), "paths": {n: str(folder / n) for n in names}}

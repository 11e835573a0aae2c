"""FPS attention inside diffusers: a drop-in attention processor for `WanTransformer3DModel` (hence `WanPipeline`).

Why: people sample Wan with diffusers' `WanPipeline`. A model fine-tuned with FPS attention must run there with
exactly the attention it was trained with, without porting the pipeline to our DiT. diffusers lets each attention
module take a *processor* (`attn.set_processor`), so this is a transform of a built model, not a fork of it.

How it maps onto diffusers' model:
- diffusers keeps tokens in raster order and builds RoPE for raster order. The processor repeats diffusers'
  `WanAttnProcessor` self-attention math step by step (to_q/to_k/to_v or the fused to_qkv, norm_q/norm_k over
  the full width, split into heads, the interleaved rotary embedding in diffusers' precision), so q/k/v equal
  the dense path's.
  Only then does it permute them to tile-major order (TokenLayout order "tile"), run our `FPSAttention` core,
  permute the output back and apply to_out. RoPE acts on each token by itself, so rotating then permuting is
  what our DiT does (positions travel with their tokens).
- The core picks each sample's regime from its noise level σ, but a processor sees only (B, L, C) hidden states.
  A forward pre-hook on the transformer records, for each call, σ = timestep / num_train_timesteps (one per
  sample; a scalar timestep is broadcast) and the token grid (F/pt, H/ph, W/pw) of hidden_states (B, C, F, H, W)
  in a context that the transformer's processors share. A forward hook clears it when the call ends (also on an
  exception), so a processor used outside a transformer call raises instead of reusing a stale σ.
- Integer timesteps. diffusers' flow UniPC and Wan's official sampler cast t = 1000σ to int64 (a floor), so the
  processor sees σ' = ⌊1000σ⌋/1000 ≤ σ. For a regime boundary b that is a multiple of 0.001 (1000b an integer),
  σ ≥ b ⇔ 1000σ ≥ 1000b ⇔ ⌊1000σ⌋ ≥ 1000b ⇔ σ' ≥ b: floored timesteps land in the regime their true σ owns.
  E.g. step 2 of 4 with shift 3 has σ = 0.9001, arrives as t = 900 and stays in [0.9, 1]. σ' is t/1000 divided
  in fp32, which is correctly rounded, hence the same fp32 number as the boundary that `Schedule.regime_index`
  compares against (fp32(900)/fp32(1000) == fp32(0.9)).
- The cores are not submodules of the transformer (a diffusers processor is a plain object), so
  `transformer.state_dict()` keeps exactly diffusers' keys and save_pretrained / from_pretrained /
  load_state_dict are unaffected. `transformer.to(...)` does not reach them: each core follows q's device
  lazily (moved on its first call on a new device) and stays fp32, the dtype its selectors compute in anyway.
- Learned-selector regimes have one selector per layer: layer i gets `FPSAttention(..., layer=i)`, and trained
  selectors come in through `selector_state`, in our DiT's key names (`blocks.{i}.self_attn.core.<key>`).

Errors rather than silent mistakes: cross-attention calls (attn2 keeps diffusers' dense processor, as in the
paper), per-token timesteps (Wan2.2 TI2V `expand_timesteps`), gradient checkpointing (its backward recomputes the
blocks after the call has ended and the context is cleared: fine-tune with our WanModel instead), and a sequence
that is not the whole token grid (e.g. diffusers' context parallelism, which hands each rank a shard).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fpsa_train.fps.schedule import Schedule, ScheduleError
from fpsa_train.fps.transform import FPSAttention
from fpsa_train.models.token_order import TokenLayout

log = logging.getLogger(__name__)

_STATE_ATTR = "_fps_diffusers"  # where the transformer keeps its FPSContext and hook handles


class FPSContext:
    """Per-call state shared by one transformer's FPS processors: σ per sample and the token layout."""

    def __init__(self, schedule: Schedule, tile_shape: tuple[int, int, int], patch_size: tuple[int, int, int],
                 num_train_timesteps: int):
        self.schedule = schedule
        self.tile_shape = tile_shape
        self.patch_size = patch_size
        self.num_train_timesteps = num_train_timesteps
        self.sigma: torch.Tensor | None = None  # (B,) fp32, during a transformer call only
        self.layout: TokenLayout | None = None
        self._checked_grids: set[tuple[int, int, int]] = set()
        self._perms: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, hidden_states: torch.Tensor, timestep) -> None:
        """Record σ and the token grid of a transformer call (hidden_states (B, C, F, H, W), timestep (B,) or ())."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(f"FPS attention: expected hidden_states (B, C, F, H, W), got {shape}")
        if timestep is None:
            raise ValueError("FPS attention: the transformer was called without `timestep`; σ picks the regime")
        b = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device)
        if t.dim() > 1 and t[0].numel() > 1:
            raise ValueError(f"FPS attention: per-token timesteps {tuple(t.shape)} (Wan2.2 expand_timesteps) are not "
                             "supported; expected one timestep per sample (B,) or a scalar")
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        elif t.numel() != b:
            raise ValueError(f"FPS attention: {t.numel()} timesteps for a batch of {b}")
        self.sigma = t.to(torch.float32) / float(self.num_train_timesteps)  # (B,), see the module docstring
        grid = tuple(int(n) // p for n, p in zip(hidden_states.shape[2:], self.patch_size))  # as diffusers floors
        layout = TokenLayout(grid, "tile", self.tile_shape)
        if grid not in self._checked_grids:
            self.schedule.validate_grid(layout.tile_grid, grid)  # e.g. topk larger than the number of tiles
            self._checked_grids.add(grid)
        self.layout = layout

    def end(self) -> None:
        self.sigma, self.layout = None, None

    def current(self) -> tuple[torch.Tensor, TokenLayout]:
        if self.sigma is None or self.layout is None:
            raise RuntimeError("FPS attention processor called outside a transformer forward: σ and the token grid "
                               "come from the forward pre-hook that apply_fps_attention_diffusers installs; call the "
                               "transformer, not the processor")
        return self.sigma, self.layout

    def permutations(self, layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(raster → tile-major, tile-major → raster) gather indices on `device`, cached per grid and device."""
        key = (layout.grid, str(device))
        if key not in self._perms:
            if len(self._perms) >= 8:  # sampling uses one grid; bound the cache for callers that vary it
                self._perms.clear()
            self._perms[key] = (layout.permutation(device), layout.inverse_permutation(device))
        return self._perms[key]


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE with diffusers' tables, in diffusers' precision, so q/k equal its dense path bit for bit.

    x (B, L, H, D); freqs (1, L, 1, D) hold each angle twice (`repeat_interleave_real`). Each pair
    (x[2i], x[2i+1]) rotates by angle i; the products are taken in the tables' dtype (float64) and rounded once
    to x's dtype."""
    even, odd = x[..., 0::2], x[..., 1::2]  # (B, L, H, D/2) each
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 0::2]  # (1, L, 1, D/2): one entry per angle
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


class FPSAttnProcessor:
    """diffusers attention processor for a Wan self-attention module (attn1) that runs FPS attention."""

    # Read and written by diffusers (set_attention_backend, context parallelism); FPS attention picks its own
    # implementation (`backend` of the core) and needs the whole sequence.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: FPSAttention, context: FPSContext):
        self.core = core
        self.context = context

    def _core_on(self, device: torch.device) -> FPSAttention:
        first = next(itertools.chain(self.core.parameters(), self.core.buffers()), None)
        if first is not None and first.device != device:
            self.core.to(device)
        return self.core

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("FPSAttnProcessor is for self-attention (attn1); cross-attention keeps diffusers' "
                             "processor")
        if attention_mask is not None:
            raise ValueError("FPSAttnProcessor: an attention_mask is not supported (Wan self-attention has none)")
        if rotary_emb is None:
            raise ValueError("FPSAttnProcessor: rotary_emb is required (Wan self-attention always passes it)")
        sigma, layout = self.context.current()
        seq_len = hidden_states.shape[1]
        if seq_len != layout.seq_len:
            raise ValueError(f"FPSAttnProcessor: {seq_len} tokens but the call's token grid {layout.grid} has "
                             f"{layout.seq_len} (a sequence shard, e.g. context parallelism, is not supported)")

        # diffusers' WanAttnProcessor, self-attention branch (raster order).
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, L, H, D)
        key = key.unflatten(2, (attn.heads, -1))  # (B, L, H, D)
        value = value.unflatten(2, (attn.heads, -1))  # (B, L, H, D)
        query = _apply_rotary_emb(query, *rotary_emb)
        key = _apply_rotary_emb(key, *rotary_emb)

        perm, inv = self.context.permutations(layout, hidden_states.device)
        q, k, v = (x[:, perm].transpose(1, 2) for x in (query, key, value))  # (B, H, L, D), tile-major
        out = self._core_on(q.device)(q, k, v, layout, sigma=sigma)  # (B, H, L, D), tile-major
        out = out.transpose(1, 2)[:, inv].flatten(2).type_as(query)  # (B, L, H·D), raster
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _check_tile_shape(schedule: Schedule, tile_shape) -> tuple[int, int, int]:
    try:
        tile = tuple(int(t) for t in tile_shape)
    except (TypeError, ValueError):
        tile = ()
    if len(tile) != 3 or any(t < 1 for t in tile):
        raise ScheduleError(f"tile_shape={tile_shape!r}: expected three positive integers (t, h, w) in tokens")
    for regime in schedule.regimes:
        if regime.quant is not None:
            try:
                regime.quant.group_shape(tile)
            except ValueError as err:
                raise ScheduleError(f"regime {regime.name!r}: {err}") from None
    return tile


def _load_selector_state(cores: list[FPSAttention], state: Mapping[str, torch.Tensor]) -> None:
    """Load `blocks.{i}.self_attn.core.<key>` entries into core i, strictly (every key, nothing else)."""
    expected = {f"blocks.{i}.self_attn.core.{k}": (i, k) for i, core in enumerate(cores) for k in core.state_dict()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"selector_state does not match the FPS cores: missing {missing}, unexpected {unexpected} "
                         "(keys are blocks.{i}.self_attn.core.<core key>, e.g. "
                         "blocks.0.self_attn.core.selectors.<regime>.bias)")
    per_core: list[dict[str, torch.Tensor]] = [{} for _ in cores]
    for name, (i, k) in expected.items():
        per_core[i][k] = state[name]
    for core, sd in zip(cores, per_core):
        core.load_state_dict(sd, strict=True)


def apply_fps_attention_diffusers(transformer: nn.Module, schedule: Schedule, tile_shape, backend: str = "auto",
                                  materialize: bool = False, num_train_timesteps: int = 1000,
                                  selector_state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Put FPS attention into every block's self-attention (attn1) of a diffusers `WanTransformer3DModel`, in place.

    `tile_shape` (t, h, w) in patched tokens must be the one the schedule was built and trained with (the model's
    `tile_shape`). `backend`/`materialize` are FPSAttention's. `selector_state` holds trained learned selectors in
    our key names, e.g. `{k: v for k, v in our_state_dict.items() if ".self_attn.core." in k}`; it must match the
    cores exactly. Cross-attention (attn2) is untouched. Applying again replaces the previous FPS attention (after
    the new one validated). Returns the transformer.
    """
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks) or not hasattr(transformer, "config"):
        raise TypeError(f"apply_fps_attention_diffusers expects a diffusers WanTransformer3DModel (blocks[i].attn1), "
                        f"got {type(transformer).__name__}")
    tile = _check_tile_shape(schedule, tile_shape)
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps} must be positive")
    cores = [FPSAttention(schedule, block.attn1.heads, i, materialize, backend) for i, block in enumerate(blocks)]
    if selector_state is not None:
        _load_selector_state(cores, selector_state)
    elif any(c.selectors for c in cores):
        log.warning("FPS attention: learned-selector regimes without selector_state keep their initial selectors")
    if getattr(transformer, _STATE_ATTR, None) is not None:  # everything is validated: replace the previous one
        remove_fps_attention_diffusers(transformer)

    context = FPSContext(schedule, tile, tuple(int(p) for p in transformer.config.patch_size), num_train_timesteps)
    device = next(transformer.parameters()).device
    for block, core in zip(blocks, cores):
        block.attn1.set_processor(FPSAttnProcessor(core.eval().to(device), context))

    def pre_hook(module, args, kwargs):
        if getattr(module, "gradient_checkpointing", False) and torch.is_grad_enabled():
            raise RuntimeError("FPS attention in diffusers does not support gradient checkpointing (its backward "
                               "recomputes blocks after the call's σ is cleared); disable it or train our WanModel")
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        context.begin(hidden_states, timestep)

    def post_hook(module, args, output):
        context.end()

    handles = (transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
               transformer.register_forward_hook(post_hook, always_call=True))
    setattr(transformer, _STATE_ATTR, {"context": context, "handles": handles})  # a plain attribute: no state_dict key
    log.info("FPS attention (diffusers, backend %s%s) in %d blocks, tile %s:\n  %s", backend,
             ", materialised" if materialize else "", len(blocks), list(tile),
             "\n  ".join(r.describe() for r in schedule.regimes))
    return transformer


def fps_cores_diffusers(transformer: nn.Module) -> list[FPSAttention]:
    """The FPS cores of a transformer in layer order (for `last_density`, `last_backend`); [] when not applied."""
    return [b.attn1.processor.core for b in transformer.blocks if isinstance(b.attn1.processor, FPSAttnProcessor)]


def remove_fps_attention_diffusers(transformer: nn.Module) -> nn.Module:
    """Undo `apply_fps_attention_diffusers`: diffusers' default processor on every attn1, hooks removed."""
    state = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        raise ValueError("remove_fps_attention_diffusers: FPS attention is not applied to this transformer")
    for handle in state["handles"]:
        handle.remove()
    for block in transformer.blocks:
        if isinstance(block.attn1.processor, FPSAttnProcessor):
            block.attn1.set_processor(block.attn1._default_processor_cls())
    delattr(transformer, _STATE_ATTR)
    return transformer


def load_fps_transformer(folder, backend: str = "auto", torch_dtype: torch.dtype | None = None,
                         verify: bool = True) -> nn.Module:
    """A diffusers `WanTransformer3DModel` from a diffusers-format deploy folder, with FPS attention from its schedule.

    The folder is verified against its manifest first (every hash; `verify=False` skips that), the learned
    selectors are loaded when the schedule has them, and the result drops into `WanPipeline(transformer=...)`.
    """
    from diffusers import WanTransformer3DModel

    from fpsa_train.deploy import (SELECTORS, DeployError, describe_backend, load_schedule, model_config,
                                   read_manifest, verify_deploy)
    from fpsa_train.models.checkpoint import open_safetensors

    manifest = verify_deploy(folder) if verify else read_manifest(folder)
    if manifest["key_format"] != "diffusers":
        raise DeployError(f"{folder} holds {manifest['key_format']} Wan keys; export it with key_format=diffusers "
                          "for diffusers (or load it with fpsa_train.deploy.load_deploy)")
    cfg = model_config(manifest)
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    transformer = WanTransformer3DModel.from_pretrained(folder, **kwargs).eval()
    schedule = load_schedule(folder, cfg)
    if schedule is None:
        return transformer
    selectors = Path(folder) / SELECTORS
    state = None
    if selectors.is_file():  # hashed by verify_deploy; with verify=False a damaged file is still named
        with open_safetensors(selectors, "Re-export the folder, or copy it again", error=DeployError) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    apply_fps_attention_diffusers(transformer, schedule, cfg.tile_shape, backend=backend,
                                  num_train_timesteps=int(manifest["sampling"]["num_train_timesteps"]),
                                  selector_state=state)
    device = next(transformer.parameters()).device
    log.info("diffusers transformer from %s, attention: %s", folder, describe_backend(schedule, device, backend,
                                                                                      cfg.head_dim))
    return transformer

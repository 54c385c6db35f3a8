"""The improved UNet of Nichol & Dhariwal (2021): the network that predicts ε (and v, when σ is learned).

The layout, module names and parameter shapes follow the authors' ``improved_diffusion/unet.py``,
so their released checkpoints load with a plain
``model.load_state_dict(torch.load("cifar10_uncond_50M_500K.pt"))``: ``time_embed.{0,2}``, ``label_emb``,
``input_blocks.i.j``, ``middle_block.{0,1,2}``, ``output_blocks.i.j`` and ``out.{0,2}``, with ResBlocks
(``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``), attention blocks (``norm``, ``qkv``,
``proj_out``; the last two hold k=1 ``Conv1d`` weights) and resamplers (``op`` / ``conv``).

What differs from the authors' code (the numerics do not):

* A frozen :class:`UNetConfig` replaces 15 keyword arguments. It validates itself and names the released
  models' settings as presets (``UNetConfig.preset("cifar10")``).
* Attention runs through ``scaled_dot_product_attention`` on ``(B, heads, HW, head_dim)`` tokens, which is the
  authors' ``softmax(q·ch^(-1/4) · (k·ch^(-1/4))ᵀ) v`` with fused kernels on GPUs.
* ``channel_mult[0] != 1`` and ``conv_resample=False`` work (both crash in the authors' code).
* No fp16 conversion helpers: use ``torch.autocast``. GroupNorm still computes in float32 (as theirs does).

Everything in ``forward`` is static Python over modules (no branch on tensor values), so ``torch.compile`` can
trace it in one graph. It also runs on ``channels_last`` inputs and under bf16/fp16 autocast.

Chapter: book/04_variational_bound (the L_hybrid gradient demo)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "PRESETS",
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "Upsample",
    "count_parameters",
    "timestep_embedding",
]


# ------------------------------------------------------------------------------------------------------------
# Timestep embedding
# ------------------------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, in the authors' ``[cos | sin]`` order.

    ``freqs[i] = exp(-ln(max_period) · i / half)`` for ``i < half = dim // 2``, and the result is
    ``cat([cos(t·freqs), sin(t·freqs)])``, plus a zero column when ``dim`` is odd. Ho et al.'s TF code uses
    ``[sin | cos]`` and ``/(half - 1)``, so their checkpoints are not interchangeable with these.

    Args:
        t: ``(B,)`` timesteps, int (raw indices) or float (``rescale_timesteps`` maps them to ``[0, 1000)``).
        dim: embedding width, at least 1.
        max_period: the longest wavelength; controls the lowest frequency.

    Returns:
        ``(B, dim)`` float32.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (B,), got shape {tuple(t.shape)}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    # The product is formed in float32 whatever t's dtype is (int64 or a float under autocast) so that large t
    # keep their phase: bf16 cannot even represent t = 999 exactly.
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------

# The authors' create_model picks channel_mult from the image size; other sizes must give it.
_AUTHORS_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def _check_pos_int(name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"UNetConfig.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"UNetConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet` (the authors' ``create_model`` flags, validated).

    Attributes:
        image_size: training resolution ``H = W``. Must be divisible by ``2**(len(channel_mult) - 1)``.
        in_channels: image channels ``C`` (3 for RGB, 1 for digits).
        base_channels: the authors' ``model_channels`` / ``--num_channels``; level ℓ has
            ``channel_mult[ℓ] · base_channels`` channels and the time embedding has ``4 · base_channels``.
        channel_mult: per-level width multipliers; one level per entry, with a 2× downsample between levels.
            ``None`` picks the authors' choice for 32, 64 and 256 px and is an error for other sizes.
        num_res_blocks: ResBlocks per level on the way down (the way up has one more, for the extra skip).
        attention_resolutions: the *resolutions* (e.g. ``(16, 8)``) whose blocks get self-attention; each must
            be reached, i.e. equal ``image_size // 2**k`` for a level ``k``. The middle block always attends.
        num_heads: attention heads, used when ``num_head_channels == -1``.
        num_head_channels: if not -1, the width of each head (heads = channels // num_head_channels).
        dropout: dropout probability inside every ResBlock (0.3 for the released CIFAR-10 model).
        use_scale_shift_norm: FiLM-style ``GN(h)·(1 + scale) + shift`` conditioning instead of ``h + emb``.
        learn_sigma: output ``2C`` channels (ε and the variance interpolation v) instead of ``C``.
        num_classes: number of classes for class-conditional models; ``None`` for unconditional ones.
        conv_resample: strided 3×3 conv / conv after upsampling (True), or 2×2 average pooling / plain nearest
            upsampling (False).
        norm_groups: groups of every GroupNorm; the authors hard-code 32. Every width must be divisible by it
            (lower it, e.g. to 8, for very narrow toy models).
        use_checkpoint: recompute each ResBlock / attention block in the backward pass (activation
            checkpointing) to save memory while training; no effect in eval mode.
    """

    image_size: int
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] | None = None
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    learn_sigma: bool = False
    num_classes: int | None = None
    conv_resample: bool = True
    norm_groups: int = 32
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "norm_groups"):
            _check_pos_int(name, getattr(self, name))
        for name in ("use_scale_shift_norm", "learn_sigma", "conv_resample", "use_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"UNetConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.num_classes is not None:
            _check_pos_int("num_classes", self.num_classes)

        # Sequences become tuples: keeps the config hashable and lets UNetConfig(**json_dict) round-trip.
        mult = self.channel_mult
        if mult is None:
            if self.image_size not in _AUTHORS_CHANNEL_MULT:
                raise ValueError(
                    f"channel_mult=None picks the authors' multipliers, which exist only for image_size in "
                    f"{sorted(_AUTHORS_CHANNEL_MULT)}; got image_size={self.image_size}. Pass channel_mult "
                    "explicitly, e.g. (1, 2, 2) for 28 px (28 -> 14 -> 7)."
                )
            mult = _AUTHORS_CHANNEL_MULT[self.image_size]
        if isinstance(mult, str | bytes) or not isinstance(mult, Sequence) or len(mult) == 0:
            raise ValueError(f"UNetConfig.channel_mult must be a non-empty sequence of ints, got {mult!r}")
        object.__setattr__(self, "channel_mult", tuple(mult))
        for m in self.channel_mult:
            _check_pos_int("channel_mult entries", m)
        attn = self.attention_resolutions
        if isinstance(attn, int) and not isinstance(attn, bool):
            attn = (attn,)
        if isinstance(attn, str | bytes) or not isinstance(attn, Sequence):
            raise ValueError(f"UNetConfig.attention_resolutions must be a sequence of ints, got {attn!r}")
        object.__setattr__(self, "attention_resolutions", tuple(attn))
        for r in self.attention_resolutions:
            _check_pos_int("attention_resolutions entries", r)

        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2**(len(channel_mult)-1) = {factor}, so "
                "the "
                f"{len(self.channel_mult)} levels of channel_mult={self.channel_mult} cannot each halve it. "
                "Use fewer levels or another image size."
            )
        reachable = self.resolutions
        bad = [r for r in self.attention_resolutions if r not in reachable]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad} are never reached; with image_size={self.image_size} and "
                f"{len(self.channel_mult)} levels the resolutions are {reachable}"
            )

        widths = sorted({m * self.base_channels for m in self.channel_mult})
        bad_w = [w for w in widths if w % self.norm_groups]
        if bad_w:
            raise ValueError(
                f"GroupNorm({self.norm_groups}) needs every width divisible by {self.norm_groups}, but "
                f"base_channels={self.base_channels} × channel_mult={self.channel_mult} gives {bad_w}. "
                "Change base_channels or lower norm_groups."
            )

        # Heads must divide the width of every block that attends: the chosen levels and the middle block.
        attn_widths = sorted(
            {self.channel_mult[lvl] * self.base_channels for lvl in self.attention_levels}
            | {self.channel_mult[-1] * self.base_channels}
        )
        if self.num_head_channels == -1:
            _check_pos_int("num_heads", self.num_heads)
            bad_h = [w for w in attn_widths if w % self.num_heads]
            if bad_h:
                raise ValueError(
                    f"num_heads={self.num_heads} must divide the width of every attention block, got widths "
                    f"{bad_h}"
                )
        else:
            _check_pos_int("num_head_channels (or -1)", self.num_head_channels)
            bad_h = [w for w in attn_widths if w % self.num_head_channels]
            if bad_h:
                raise ValueError(
                    f"num_head_channels={self.num_head_channels} must divide the width of every attention "
                    f"block, got widths {bad_h}"
                )

    # -- derived quantities ----------------------------------------------------------------------------------

    @property
    def out_channels(self) -> int:
        """``2 · in_channels`` when σ is learned (ε then v), else ``in_channels``."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Resolution of each level, e.g. ``(32, 16, 8, 4)`` for CIFAR-10."""
        return tuple(self.image_size // 2**k for k in range(len(self.channel_mult)))  # type: ignore[arg-type]

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """Indices of the levels with attention (the authors' downsample factors ``ds = 2**level``)."""
        return tuple(k for k, r in enumerate(self.resolutions) if r in self.attention_resolutions)

    def heads_for(self, channels: int) -> int:
        """Number of attention heads for a block of ``channels`` channels."""
        return self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels

    # -- presets ---------------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: object) -> UNetConfig:
        """A named configuration (see :data:`PRESETS`), optionally with fields replaced.

        ``UNetConfig.preset("cifar10", dropout=0.1)`` is
        ``dataclasses.replace(PRESETS["cifar10"], dropout=0.1)``, validated again.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
        bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if bad:
            raise TypeError(
                f"UNetConfig has no field(s) {bad}; fields: {[f.name for f in dataclasses.fields(cls)]}"
            )
        return dataclasses.replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


PRESETS: dict[str, UNetConfig] = {
    # The released models. The parameter counts are those of the authors' code.
    # cifar10_uncond_50M_500K.pt: 52,546,438 parameters.
    "cifar10": UNetConfig(
        image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
        attention_resolutions=(16, 8), num_heads=4, dropout=0.3, learn_sigma=True,
    ),
    # imagenet64_uncond_100M_1500K.pt: 121,063,942 parameters.
    "imagenet64": UNetConfig(
        image_size=64, base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3, learn_sigma=True,
    ),
    # imagenet64_cond_270M_250K.pt: 273,049,350 parameters.
    "imagenet64-cond": UNetConfig(
        image_size=64, base_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3, learn_sigma=True,
        num_classes=1000,
    ),
    # lsun_uncond_100M_*.pt (bedroom 256): 113,676,678 parameters.
    "lsun256": UNetConfig(
        image_size=256, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(16,), num_heads=1, use_scale_shift_norm=False, learn_sigma=True,
    ),
    # Small models for the book and quick GPU demos (not from the paper).
    # CIFAR-10 at ~1/7 the size (7.3 M parameters): 32 -> 16 -> 8, attention at 16 and 8.
    "cifar10-small": UNetConfig(
        image_size=32, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
        attention_resolutions=(16, 8), num_heads=4, dropout=0.1, learn_sigma=True,
    ),
    # 28 px is not divisible by 8, so three levels: 28 -> 14 -> 7 (widths 32, 64, 128), attention at 14 and 7;
    # 4.2 M parameters.
    "mnist": UNetConfig(
        image_size=28, in_channels=1, base_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
        attention_resolutions=(14, 7), num_heads=4, dropout=0.1, learn_sigma=True,
    ),
    # scikit-learn's 8×8 digits (1.1 M parameters): 8 -> 4, attention at 4.
    "digits8": UNetConfig(
        image_size=8, in_channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=2,
        attention_resolutions=(4,), num_heads=2, learn_sigma=True,
    ),
    # For CPU tests (0.76 M parameters): forward + backward of 4 images in a few tens of milliseconds.
    "tiny": UNetConfig(
        image_size=16, in_channels=3, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), num_heads=2, learn_sigma=True,
    ),
}  # fmt: skip
# Class-conditional variants of the digit models (10 classes).
PRESETS["mnist-cond"] = dataclasses.replace(PRESETS["mnist"], num_classes=10)
PRESETS["digits8-cond"] = dataclasses.replace(PRESETS["digits8"], num_classes=10)


# ------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 for half-precision inputs, cast back to the input dtype (the authors'
    ``GroupNorm32``).

    Under autocast (or for a model cast to bf16/fp16) the statistics stay accurate, and the result goes back
    to bf16/fp16 so the next conv does not keep a float32 copy alive for the backward pass. float32 and
    float64 inputs are normalised in their own precision.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        w, b = self.weight.float(), self.bias.float()  # no-ops for the usual float32 parameters
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _is_compiling() -> bool:
    """True while torch.compile traces (``torch.compiler.is_compiling`` appeared in torch 2.3)."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: the block then starts as the identity (residual) or outputs 0 (head)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding ``emb`` (time, plus class).

    ``h = conv3(SiLU(GN(x)))``; ``e = Linear(SiLU(emb))``; then either
    ``h = conv3_0(Dropout(SiLU(GN(h)·(1 + scale) + shift)))`` with ``scale, shift = e.chunk(2)`` (scale
    first), or ``h = conv3_0(Dropout(SiLU(GN(h + e))))``. Output ``skip(x) + h``, where ``conv3_0`` is
    zero-initialised so the block starts as its skip path.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        *,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x``: ``(B, channels, H, W)``, ``emb``: ``(B, emb_channels)`` -> ``(B, out_channels, H, W)``."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = rearrange(self.emb_layers(emb), "b c -> b c 1 1")
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)  # (B, C, 1, 1) each; scale first, as the authors
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the ``H·W`` positions, with a residual connection.

    ``qkv = W_qkv · GN(x)``, where each head owns a **contiguous** ``[q | k | v]`` chunk of the ``3C``
    channels (the authors' "legacy" order, so their ``qkv`` weights load unchanged); ``out = x + proj_out(a)``
    with a zero-initialised ``proj_out``. The authors scale q and k by ``d^(-1/4)`` each, i.e. ``1/√d`` in
    total, which is ``scaled_dot_product_attention``'s default scale; its fused kernels accumulate the softmax
    in float32 (the authors' explicit ``.float()``), so fp16/bf16 do not overflow.

    ``qkv`` and ``proj_out`` are kept as k=1 ``Conv1d`` modules for checkpoint compatibility, but applied as
    ``F.linear`` on ``(B, HW, C)`` tokens: for a ``channels_last`` input that token view is free.
    """

    def __init__(self, channels: int, num_heads: int, *, norm_groups: int = 32, use_checkpoint: bool = False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, H, W)``. Returns ``(B, C, H, W)``."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        tokens = rearrange(self.norm(x), "b c x y -> b (x y) c")
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # (B, L, 3C)
        q, k, v = rearrange(qkv, "b l (h three d) -> three b h l d", three=3, h=self.num_heads)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, d)
        out = F.linear(
            rearrange(a, "b h l d -> b l (h d)"), self.proj_out.weight.squeeze(-1), self.proj_out.bias
        )
        return x + rearrange(out, "b (x y) c -> b c x y", x=height)


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3×3 conv, or 2×2 average pooling when ``use_conv=False``.

    (The authors' pooling branch passes no kernel size and raises; here it works.)
    """

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H/2, W/2)``."""
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour ×2, then a 3×3 conv when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, 2H, 2W)``."""
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class EmbedSequential(nn.Sequential):
    """A ``Sequential`` that also hands the embedding to the ResBlocks it contains."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# ------------------------------------------------------------------------------------------------------------
# The UNet
# ------------------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """The improved-DDPM UNet, built from a :class:`UNetConfig`.

    Down path: a 3×3 conv, then per level ``num_res_blocks`` × [ResBlock (+ attention)] and a Downsample
    between levels. Middle: ResBlock, attention, ResBlock. Up path: levels reversed, ``num_res_blocks + 1`` ×
    [ResBlock on ``cat([h, skip])`` (+ attention) (+ Upsample after a level's last block, except level 0)],
    where the skips are the outputs of *every* input block, used last-in first-out. Head: GN → SiLU → zero
    conv3×3, so the output is exactly 0 at initialisation.

    Example:
        >>> model = UNet(UNetConfig.preset("tiny"))
        >>> model(torch.randn(2, 3, 16, 16), torch.tensor([0, 999])).shape
        torch.Size([2, 6, 16, 16])
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if not isinstance(cfg, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        mc = cfg.base_channels
        emb_ch = 4 * mc
        mult: tuple[int, ...] = cfg.channel_mult  # type: ignore[assignment]  # a tuple after __post_init__

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(
                ch_in, emb_ch, ch_out, dropout=cfg.dropout, use_scale_shift_norm=cfg.use_scale_shift_norm,
                norm_groups=cfg.norm_groups, use_checkpoint=cfg.use_checkpoint,
            )  # fmt: skip

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(
                ch, cfg.heads_for(ch), norm_groups=cfg.norm_groups, use_checkpoint=cfg.use_checkpoint
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)

        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chs = [mc]  # channels of every input block's output, in order
        ch = mc
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, m * mc)]
                ch = m * mc
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chs.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch, cfg.conv_resample)))
                skip_chs.append(ch)

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), m * mc)]
                ch = m * mc
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, cfg.conv_resample))
                self.output_blocks.append(EmbedSequential(*layers))

        # `ch` is channel_mult[0]·mc here; the authors use mc, which crashes when channel_mult[0] != 1.
        self.out = nn.Sequential(
            GroupNorm32(cfg.norm_groups, ch), nn.SiLU(), _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict ε (and v) for a batch of noisy images.

        Args:
            x: ``(B, in_channels, H, W)`` noisy images; ``H`` and ``W`` divisible by ``2**(levels-1)``
                (normally ``image_size``). Any memory format.
            t: ``(B,)`` model timesteps (int, or float when rescaled), or a 0-d tensor shared by the batch.
            y: ``(B,)`` int64 class labels in ``[0, num_classes)``; required iff ``cfg.num_classes`` is set.
                The range is checked for CPU tensors; on GPUs the embedding's own device assertion catches it
                (a check there would force a host sync and break CUDA-graph capture).

        Returns:
            ``(B, out_channels, H, W)``: ε in the first ``in_channels`` channels, then v when ``learn_sigma``.
        """
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"x must be (B, {cfg.in_channels}, H, W) for this model, got shape {tuple(x.shape)}"
            )
        factor = 2 ** (len(cfg.channel_mult) - 1)  # type: ignore[arg-type]
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"H and W must be divisible by {factor} (one halving per level), got {tuple(x.shape[-2:])}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")

        # The sinusoids are float32; follow the parameters' dtype so a .double() model runs in float64.
        t_emb = timestep_embedding(t, cfg.base_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)  # (B, 4·mc)
        if cfg.num_classes is None:
            if y is not None:
                raise ValueError("y was given but this model is unconditional (cfg.num_classes is None)")
        else:
            if y is None:
                raise ValueError(
                    f"this model is class-conditional: pass y, (B,) labels in [0, {cfg.num_classes})"
                )
            if y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"y must be (B,) = ({x.shape[0]},) int64 labels, got {tuple(y.shape)} {y.dtype}"
                )
            if y.device.type == "cpu" and not _is_compiling():
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= cfg.num_classes:
                    raise ValueError(
                        f"labels y must lie in [0, {cfg.num_classes}), got values from {lo} to {hi}"
                    )
            # Added after the time MLP, as the authors do.
            emb = emb + self.label_emb(y)

        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        # The head runs in float32 even under autocast (as the authors keep it): eps and v feed
        # x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps and the log-variance interpolation, which would amplify
        # bf16/fp16 rounding of the network's output. One small conv, so the cost is negligible.
        if h.dtype in (torch.float16, torch.bfloat16) or _autocast_enabled(h.device.type):
            with torch.autocast(device_type=h.device.type, enabled=False):
                return self.out(h.float())
        return self.out(h)


def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; torch < 2.4 only has the per-backend functions."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (trainable or not); works on ``meta``-device models."""
    return sum(p.numel() for p in model.parameters())

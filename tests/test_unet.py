"""Tests of iddpm.unet: layout and parameter counts of the authors' models, numerics of each block,
conditioning, memory formats and input validation. All on CPU with tiny configs; big models are built on
``meta``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from iddpm.unet import (
    PRESETS,
    AttentionBlock,
    ResBlock,
    UNet,
    UNetConfig,
    count_parameters,
    timestep_embedding,
)

TINY = UNetConfig.preset("tiny")  # 16×16×3, widths 32/64, one ResBlock per level, attention at 8 px


def _perturb_zero_init(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give the all-zero parameters (the three zero-init convs, GroupNorm biases) random values, so that every
    path through the network contributes to the output and to the gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _inputs(cfg: UNetConfig, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t


# ----------------------------------------------------------------------------------------- timestep embedding


def test_timestep_embedding_matches_closed_form() -> None:
    dim, half = 10, 5
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, dim)
    assert emb.dtype == torch.float32 and emb.shape == (4, dim)
    for row, tv in enumerate(t.tolist()):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / half)
            assert emb[row, i].item() == pytest.approx(math.cos(tv * freq), abs=1e-5)  # cos first
            assert emb[row, half + i].item() == pytest.approx(math.sin(tv * freq), abs=1e-5)
    # t = 0 gives cos = 1 and sin = 0 in every column.
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(half), torch.zeros(half)]))


def test_timestep_embedding_float_t_odd_dim_and_max_period() -> None:
    t = torch.tensor([2.5, 250.0], dtype=torch.float64)  # rescaled timesteps are fractional
    emb = timestep_embedding(t, 7, max_period=100.0)
    assert emb.shape == (2, 7) and emb.dtype == torch.float32
    assert torch.equal(emb[:, -1], torch.zeros(2))  # the padding column of an odd dim
    freqs = torch.exp(-math.log(100.0) * torch.arange(3, dtype=torch.float64) / 3)
    args = t[:, None] * freqs
    torch.testing.assert_close(emb[:, :6], torch.cat([args.cos(), args.sin()], dim=1).float())
    # An integer t and the same value as a float give the same embedding.
    torch.testing.assert_close(
        timestep_embedding(torch.tensor([3]), 8), timestep_embedding(torch.tensor([3.0]), 8)
    )
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        timestep_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="positive int"):
        timestep_embedding(torch.zeros(2), 0)


# -------------------------------------------------------------------------------- layout and parameter counts


@pytest.mark.parametrize(
    ("name", "expected"),
    # Parameter counts of the authors' code for the released models, spec §13 ("Parameter counts (computed)").
    [
        ("cifar10", 52_546_438),
        ("imagenet64", 121_063_942),
        ("imagenet64-cond", 273_049_350),
        ("lsun256", 113_676_678),
    ],
)
def test_released_model_parameter_counts(name: str, expected: int) -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = UNet(UNetConfig.preset(name))
    assert count_parameters(model) == expected


def test_cifar10_preset_is_the_authors_config() -> None:
    cfg = UNetConfig.preset("cifar10")  # spec §15 MODEL_FLAGS plus the defaults it relies on
    assert (cfg.image_size, cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks) == (
        32,
        128,
        (1, 2, 2, 2),
        3,
    )
    assert (cfg.attention_resolutions, cfg.num_heads, cfg.dropout) == ((16, 8), 4, 0.3)
    assert cfg.use_scale_shift_norm and cfg.learn_sigma and cfg.num_classes is None and cfg.out_channels == 6
    assert cfg.attention_levels == (1, 2)  # the authors' downsample factors ds = 2, 4
    with torch.device("meta"):
        model = UNet(cfg)
    assert len(model.input_blocks) == 16 and len(model.output_blocks) == 16  # spec §13


def _expected_state_dict_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape, derived from the layout rule of spec §13 (the authors' UNetModel)."""
    mc, emb = cfg.base_channels, 4 * cfg.base_channels
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(key: str, cin: int, cout: int, k: int) -> None:
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (cout, cin, k, k), (cout,)

    def conv1d(key: str, cin: int, cout: int) -> None:
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (cout, cin, 1), (cout,)

    def norm(key: str, c: int) -> None:
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (c,), (c,)

    def res(key: str, cin: int, cout: int) -> None:
        norm(f"{key}.in_layers.0", cin)
        conv(f"{key}.in_layers.2", cin, cout, 3)
        e_out = 2 * cout if cfg.use_scale_shift_norm else cout
        shapes[f"{key}.emb_layers.1.weight"], shapes[f"{key}.emb_layers.1.bias"] = (e_out, emb), (e_out,)
        norm(f"{key}.out_layers.0", cout)
        conv(f"{key}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{key}.skip_connection", cin, cout, 1)

    def attn(key: str, c: int) -> None:
        norm(f"{key}.norm", c)
        conv1d(f"{key}.qkv", c, 3 * c)
        conv1d(f"{key}.proj_out", c, c)

    shapes["time_embed.0.weight"], shapes["time_embed.0.bias"] = (emb, mc), (emb,)
    shapes["time_embed.2.weight"], shapes["time_embed.2.bias"] = (emb, emb), (emb,)
    if cfg.num_classes is not None:
        shapes["label_emb.weight"] = (cfg.num_classes, emb)
    conv("input_blocks.0.0", cfg.in_channels, mc, 3)
    skips, ch, i, n_levels = [mc], mc, 1, len(cfg.channel_mult)
    for level, m in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            res(f"input_blocks.{i}.0", ch, m * mc)
            ch = m * mc
            if cfg.image_size // 2**level in cfg.attention_resolutions:
                attn(f"input_blocks.{i}.1", ch)
            skips.append(ch)
            i += 1
        if level < n_levels - 1:
            if cfg.conv_resample:
                conv(f"input_blocks.{i}.0.op", ch, ch, 3)
            skips.append(ch)
            i += 1
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    i = 0
    for level in reversed(range(n_levels)):
        m = cfg.channel_mult[level]
        for j in range(cfg.num_res_blocks + 1):
            res(f"output_blocks.{i}.0", ch + skips.pop(), m * mc)
            ch, sub = m * mc, 1
            if cfg.image_size // 2**level in cfg.attention_resolutions:
                attn(f"output_blocks.{i}.{sub}", ch)
                sub += 1
            if level > 0 and j == cfg.num_res_blocks and cfg.conv_resample:
                conv(f"output_blocks.{i}.{sub}.conv", ch, ch, 3)
            i += 1
    assert not skips  # every input block's output is consumed exactly once
    norm("out.0", ch)
    conv("out.2", ch, cfg.out_channels, 3)
    return shapes


@pytest.mark.parametrize(
    "cfg",
    [
        dataclasses.replace(TINY, num_res_blocks=2, num_classes=5),
        dataclasses.replace(
            TINY, channel_mult=(2, 1, 3), attention_resolutions=(16, 4), use_scale_shift_norm=False
        ),
        dataclasses.replace(TINY, conv_resample=False, learn_sigma=False),
        UNetConfig.preset("cifar10"),
    ],
    ids=["cond-2blocks", "mult0=2-additive", "avgpool", "cifar10"],
)
def test_state_dict_follows_authors_names_and_shapes(cfg: UNetConfig) -> None:
    with torch.device("meta"):
        model = UNet(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_state_dict_shapes(cfg)


# ------------------------------------------------------------------------------------------ forward behaviour


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_is_exactly_zero_at_init(learn_sigma: bool) -> None:
    cfg = dataclasses.replace(TINY, learn_sigma=learn_sigma)
    x, t = _inputs(cfg)
    out = UNet(cfg)(x, t)
    assert out.shape == (3, 6 if learn_sigma else 3, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("scale_shift", [True, False])
def test_scale_shift_and_additive_conditioning_depend_on_t(scale_shift: bool) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, use_scale_shift_norm=scale_shift)
    model = UNet(cfg).eval()
    _perturb_zero_init(model)
    x, _ = _inputs(cfg, batch=2)
    out_a = model(x, torch.tensor([10, 10]))
    out_b = model(x, torch.tensor([900, 900]))
    assert out_a.shape == (2, 6, 16, 16) and torch.isfinite(out_a).all()
    assert not torch.allclose(out_a, out_b)
    # Level 0 has 32 channels; scale-shift needs a scale and a shift per channel.
    assert model.input_blocks[1][0].emb_layers[1].out_features == (64 if scale_shift else 32)
    # A 0-d t is shared by the batch.
    torch.testing.assert_close(model(x, torch.tensor(10)), out_a)


def test_class_conditioning_changes_output_and_validates_y() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, num_classes=4)
    model = UNet(cfg).eval()
    _perturb_zero_init(model)
    x, t = _inputs(cfg, batch=2)
    out0 = model(x, t, torch.tensor([0, 0]))
    out1 = model(x, t, torch.tensor([3, 3]))
    assert not torch.allclose(out0, out1)
    # Every ResBlock sees time_embed(timestep_embedding(t)) + label_emb(y): the label is added after the MLP.
    seen = []
    hook = model.middle_block[0].emb_layers.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    y = torch.tensor([1, 2])
    model(x, t, y)
    hook.remove()
    expected = model.time_embed(timestep_embedding(t, cfg.base_channels)) + model.label_emb(y)
    torch.testing.assert_close(seen[0], expected)
    with pytest.raises(ValueError, match="class-conditional: pass y"):
        model(x, t)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        model(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        model(x, t, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="int64 labels"):
        model(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="int64 labels"):
        model(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(TINY)(x, t, torch.tensor([0, 0]))


@pytest.mark.parametrize("scale_shift", [True, False])
def test_res_block_matches_its_formula(scale_shift: bool) -> None:
    """Spec §13: h = conv(SiLU(GN(x))); e = Linear(SiLU(emb)); scale-shift: GN(h)·(1 + scale) + shift with the
    scale in the first half of e, else GN(h + e); then SiLU → conv; output skip(x) + h (1×1 conv skip)."""
    torch.manual_seed(0)
    block = ResBlock(32, 16, 64, use_scale_shift_norm=scale_shift).double().eval()
    _perturb_zero_init(block, std=0.1)
    x, emb = torch.randn(2, 32, 4, 4, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)

    def gn(h: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
        return F.group_norm(h, 32, norm.weight, norm.bias)

    h = block.in_layers[2](F.silu(gn(x, block.in_layers[0])))
    e = block.emb_layers[1](F.silu(emb))[:, :, None, None]
    if scale_shift:
        scale, shift = e[:, :64], e[:, 64:]
        h = gn(h, block.out_layers[0]) * (1 + scale) + shift
    else:
        h = gn(h + e, block.out_layers[0])
    expected = block.skip_connection(x) + block.out_layers[3](F.silu(h))
    torch.testing.assert_close(block(x, emb), expected)


def test_attention_block_matches_naive_multihead_attention() -> None:
    """SDPA + einops vs the authors' computation written out: conv1d qkv on GN(x), per-head contiguous [q|k|v]
    chunks, softmax(qᵀk/√d) in float64."""
    torch.manual_seed(0)
    channels, heads = 64, 4
    block = AttentionBlock(channels, heads).double()
    _perturb_zero_init(block, std=0.2)  # proj_out starts at zero
    x = torch.randn(2, channels, 4, 5, dtype=torch.float64)

    b, c, hh, ww = x.shape
    d = c // heads
    flat = x.reshape(b, c, hh * ww)
    qkv = F.conv1d(
        F.group_norm(flat, 32, block.norm.weight, block.norm.bias), block.qkv.weight, block.qkv.bias
    )
    qkv = qkv.reshape(b * heads, 3 * d, hh * ww)  # each head owns a contiguous [q | k | v] slab
    q, k, v = qkv.split(d, dim=1)  # (B·heads, d, L) each
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(d), dim=-1)  # (B·heads, L, L)
    a = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(b, c, hh * ww)
    expected = x + F.conv1d(a, block.proj_out.weight, block.proj_out.bias).reshape(b, c, hh, ww)

    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "channel_mult": (2, 1, 3),
            "attention_resolutions": (16, 4),
        },  # channel_mult[0] != 1 crashes upstream
        {"conv_resample": False},  # avg-pool downsampling crashes upstream
        {"num_head_channels": 16, "num_classes": 3},
        {"norm_groups": 8, "base_channels": 16},
    ],
    ids=["mult0=2", "avgpool", "head-channels", "groups8"],
)
def test_variants_run_forward_and_backward(overrides: dict) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, **overrides)
    model = UNet(cfg)
    _perturb_zero_init(model)
    x, t = _inputs(cfg, batch=2)
    y = torch.tensor([0, 2]) if cfg.num_classes else None
    out = model(x, t, y)
    assert out.shape == (2, cfg.out_channels, 16, 16) and torch.isfinite(out).all()
    out.square().mean().backward()


def test_output_blocks_take_cat_of_h_and_skips_last_in_first_out() -> None:
    """Output block k receives cat([h, skip]) where h is the previous block's output (the middle block's for
    k = 0) and skip is the output of input block n-1-k: the channel order the authors' weights expect."""
    cfg = dataclasses.replace(TINY, num_res_blocks=2)
    model = UNet(cfg).eval()
    _perturb_zero_init(model)
    outputs: dict[str, torch.Tensor] = {}
    inputs: list[torch.Tensor] = []
    blocks = {"middle_block.0": model.middle_block}
    blocks |= {f"input_blocks.{i}": block for i, block in enumerate(model.input_blocks)}
    blocks |= {f"output_blocks.{i}": block for i, block in enumerate(model.output_blocks)}
    for key, block in blocks.items():
        block.register_forward_hook(lambda mod, args, out, key=key: outputs.__setitem__(key, out))
    for block in model.output_blocks:
        block.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    model(*_inputs(cfg, batch=2))
    n = len(model.input_blocks)
    assert len(inputs) == len(model.output_blocks) == n
    for k, got in enumerate(inputs):
        h = outputs["middle_block.0"] if k == 0 else outputs[f"output_blocks.{k - 1}"]
        assert torch.equal(got, torch.cat([h, outputs[f"input_blocks.{n - 1 - k}"]], dim=1))


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, num_classes=3, dropout=0.1)
    model = UNet(cfg).train()
    _perturb_zero_init(model)
    x, t = _inputs(cfg)
    model(x, t, torch.tensor([0, 1, 2])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = UNet(TINY).train()
    _perturb_zero_init(plain)
    ckpt = UNet(dataclasses.replace(TINY, use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = _inputs(TINY)
    for model in (plain, ckpt):
        model(x, t).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_channels_last_input_gives_the_same_output() -> None:
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    _perturb_zero_init(model)
    x, t = _inputs(TINY)
    expected = model(x, t)
    model_cl = model.to(memory_format=torch.channels_last)
    got = model_cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_and_stays_close() -> None:
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    _perturb_zero_init(model)
    x, t = _inputs(TINY)
    expected = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x, t)
    # The body runs in bf16; the output head is kept in float32 (see UNet.forward).
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bf16 keeps 8 bits of mantissa; through ~20 layers the error stays at the few-percent level.
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_fully_convolutional_on_other_sizes_but_checks_shapes() -> None:
    model = UNet(TINY)
    assert model(torch.randn(1, 3, 24, 32), torch.tensor([5])).shape == (1, 6, 24, 32)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 3, 15, 16), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([5]))


# ----------------------------------------------------------------------------------------- config and presets


def test_presets_build_and_overrides_revalidate() -> None:
    for name, cfg in PRESETS.items():
        assert UNetConfig.preset(name) == cfg
        assert cfg.out_channels == (2 if cfg.learn_sigma else 1) * cfg.in_channels
    assert UNetConfig.preset("mnist").resolutions == (28, 14, 7)
    cfg = UNetConfig.preset("cifar10", dropout=0.1, num_classes=10)
    assert (cfg.dropout, cfg.num_classes, cfg.base_channels) == (0.1, 10, 128)
    with pytest.raises(ValueError, match="unknown UNet preset 'cifar100'.*'cifar10'"):
        UNetConfig.preset("cifar100")
    with pytest.raises(TypeError, match="no field"):
        UNetConfig.preset("tiny", channels=3)
    with pytest.raises(ValueError, match="divisible by"):
        UNetConfig.preset("tiny", channel_mult=(1, 2, 2, 2, 2, 2))


def test_config_defaults_and_normalisation() -> None:
    cfg = UNetConfig(image_size=64, channel_mult=[1, 2, 3, 4], attention_resolutions=[16, 8])
    assert cfg.channel_mult == (1, 2, 3, 4) and cfg.attention_resolutions == (16, 8)  # lists become tuples
    assert UNetConfig(image_size=32).channel_mult == (1, 2, 2, 2)  # the authors' choice by image size
    assert UNetConfig(**dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="channel_mult=None.*image_size=28"):
        UNetConfig(image_size=28)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"image_size": 28, "channel_mult": (1, 2, 2, 2)}, ValueError, "not divisible by 2"),
        ({"attention_resolutions": (4,)}, ValueError, r"never reached.*\(16, 8\)"),
        ({"base_channels": 48}, ValueError, r"GroupNorm\(32\)"),
        ({"num_heads": 3}, ValueError, "num_heads=3 must divide"),
        ({"num_head_channels": 24}, ValueError, "num_head_channels=24 must divide"),
        ({"num_res_blocks": 0}, ValueError, "num_res_blocks must be >= 1"),
        ({"base_channels": 32.0}, TypeError, "base_channels must be an int"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a probability"),
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1"),
        ({"channel_mult": ()}, ValueError, "non-empty sequence"),
        ({"channel_mult": (1, 0)}, ValueError, "channel_mult entries must be >= 1"),
        ({"learn_sigma": 1}, TypeError, "learn_sigma must be a bool"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        dataclasses.replace(TINY, **overrides)


def test_double_precision_model_runs_in_float64():
    # A float64 model (e.g. for float64 reference checks in the book) must accept float64 inputs end to end.
    model = UNet(UNetConfig.preset("digits8")).double()
    out = model(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1.0, 2.0]))
    assert out.dtype == torch.float64 and out.shape == (2, 2, 8, 8)

"""What the experiments measure on a trained model: held-out NLL, samples and their quality, gradient noise.

Each function takes a model (or a checkpoint) and explicit generators, so a measurement is repeatable:

* :func:`nll` -- the full T-step variational bound in bits/dim over held-out images, with its standard error
  over images (the authors' ``image_nll.py``; one fresh noise draw per ``t``).
* :func:`generate` -- samples with K respaced steps (ancestral with the model's or another variance, or DDIM
  with ``eta = 0``), optionally starting part-way down the chain (``skip``: the paper's "skip the first x% of
  the reverse process" test of claim a).
* :func:`sample_quality` -- digit-FID and improved precision/recall (k = 3) in the digit classifier's feature
  space (:mod:`iddpm.features`); never comparable with Inception FID.
* :func:`gradient_noise_scale` -- the simple noise scale ``B = tr(Sigma) / |G|^2`` of McCandlish et al. (2018)
  from per-example gradients of the training objective, with the importance weights of the run's sampler.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .data import to_model_range, to_uint8
from .evaluate import bits_per_dim
from .losses import training_losses
from .resample import make_sampler
from .respace import respace, space_timesteps
from .sampling import sample
from .schedules import Schedule
from .train import TrainConfig

__all__ = [
    "forward_flops",
    "generate",
    "gradient_noise_scale",
    "mean_se",
    "nll",
    "noise_scale",
    "sample_quality",
]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (``std / sqrt(n)``, N-1 std; 0.0 for a single value) of a list of numbers."""
    if not values:
        raise ValueError("mean_se needs at least one value")
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(t.mean()), se


@torch.no_grad()
def nll(
    model: nn.Module,
    cfg: TrainConfig,
    images: Tensor,
    *,
    generator: torch.Generator,
    batch: int = 500,
) -> dict[str, Any]:
    """Held-out negative log-likelihood: the full ``T``-step bound in bits/dim.

    Args:
        model: in eval mode, on the device of ``generator``.
        cfg: the run's config (schedule, T, parameterisation).
        images: ``(N, C, H, W)`` uint8 held-out images.
        generator: noise for the per-``t`` draws.
        batch: images per forward pass.

    Returns:
        ``{"bpd": mean, "bpd_se": std / sqrt(N) over images, "n": N, "prior_bpd", "terms_bpd": (T,) means}``.
    """
    device = generator.device
    s = Schedule.named(cfg.schedule, cfg.diffusion_steps).to(device)
    totals, priors, terms = [], [], []
    for chunk in images.split(batch):
        r = bits_per_dim(
            model,
            s,
            to_model_range(chunk).to(device),
            mean_type=cfg.mean_type,
            var_type=cfg.var_type,  # type: ignore[arg-type]
            rescale_timesteps=cfg.rescale_timesteps,
            generator=generator,
        )
        totals.append(r.total.double().cpu())
        priors.append(r.prior.double().cpu())
        terms.append(r.terms.double().cpu())
    total = torch.cat(totals)
    n = total.numel()
    return {
        "bpd": float(total.mean()),
        "bpd_se": float(total.std() / math.sqrt(n)) if n > 1 else 0.0,
        "n": n,
        "prior_bpd": float(torch.cat(priors).mean()),
        "terms_bpd": torch.cat(terms).mean(0).tolist(),
    }


@torch.no_grad()
def generate(
    model: nn.Module,
    cfg: TrainConfig,
    num: int,
    image_shape: tuple[int, int, int],
    *,
    steps: int | None,
    generator: torch.Generator,
    var_type: str | None = None,
    method: Literal["ancestral", "ddim"] = "ancestral",
    skip: float = 0.0,
    batch: int = 500,
) -> Tensor:
    """``num`` samples as uint8 ``(num, C, H, W)``.

    Args:
        model: in eval mode, on ``generator.device``.
        cfg: the run's config.
        image_shape: ``(C, H, W)``.
        steps: K, the respaced number of sampling steps (``space_timesteps(T, str(K))``); None = all T.
        generator: the sampling noise.
        var_type: sample with this variance instead of the trained one (``"fixed_large"``: sigma^2 = beta,
            ``"fixed_small"``: sigma^2 = beta-tilde); the model's learned output, if any, is then ignored.
        method: ``"ancestral"`` or ``"ddim"`` (eta = 0).
        skip: drop the first (noisiest) ``skip`` fraction of the reverse process: the chain starts from pure
            noise at step ``(1 - skip) T`` instead of ``T`` (claim a). Applied before respacing to K steps.
    """
    if not 0.0 <= skip < 1.0:
        raise ValueError(f"skip must be in [0, 1), got {skip}")
    T = cfg.diffusion_steps
    s = Schedule.named(cfg.schedule, T)
    top = T - int(round(skip * T))  # keep original steps [0, top)
    if top < T:
        s = respace(s, range(top))
    if steps is not None and steps < s.num_steps:
        s = respace(s, space_timesteps(s.num_steps, str(steps)))
    s = s.to(generator.device)
    chunks = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        x = sample(
            model,
            s,
            (n, *image_shape),
            method=method,
            eta=0.0,
            mean_type=cfg.mean_type,  # type: ignore[arg-type]
            var_type=var_type or cfg.var_type,
            rescale_timesteps=cfg.rescale_timesteps,  # type: ignore[arg-type]
            generator=generator,
            device=generator.device,
        )
        chunks.append(to_uint8(x.float()).cpu())
    return torch.cat(chunks)


def sample_quality(real_feats: Tensor, fake_images: Tensor, k: int = 3) -> dict[str, float]:
    """digit-FID and improved precision/recall of ``fake_images`` against precomputed real features.

    Args:
        real_feats: ``(N_real, D)`` features of real images (:func:`iddpm.features.digit_features`).
        fake_images: ``(N_fake, C, H, W)`` uint8 samples.
        k: neighbours for precision/recall (Kynkäänniemi et al. 2019 use 3).
    """
    from .features import digit_features
    from .metrics import frechet_distance, precision_recall

    fake = digit_features(fake_images)
    n = min(len(real_feats), len(fake))  # precision/recall on equal-sized sets (the first n real features)
    precision, recall = precision_recall(real_feats[:n], fake[:n], k=k)
    return {"fid": frechet_distance(real_feats, fake), "precision": precision, "recall": recall}


def gradient_noise_scale(
    ck: dict[str, Any],
    cfg: TrainConfig,
    model: nn.Module,
    images: Tensor,
    *,
    examples: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """The simple gradient noise scale ``B = tr(Sigma) / |G|^2`` of the run's objective at a checkpoint.

    ``examples`` per-example gradients ``g_i`` of ``w_i L(x_i, t_i, eps_i)`` (``t_i`` and the importance
    weight ``w_i`` drawn from the run's own timestep sampler in its saved state) give the two unbiased
    estimates of McCandlish et al. (2018, App. A) with ``B_small = 1`` and ``B_big = n``::

        |G|^2    ~ (n |mean g|^2 - mean |g_i|^2) / (n - 1)
        tr Sigma ~ (mean |g_i|^2 - |mean g|^2) / (1 - 1/n)

    Args:
        ck: the loaded training checkpoint (its raw ``model`` weights and ``sampler`` state are used).
        cfg: the run's config.
        model: a UNet of the run's architecture (its weights are replaced), on ``generator.device``.
        images: ``(N, C, H, W)`` uint8 training images to draw the examples from.
        examples: n, the number of per-example gradients.
        generator: draws of images, t and noise.

    Returns:
        ``{"b_simple", "grad_sq", "trace_sigma", "n"}``.
    """
    if examples < 2:
        raise ValueError(f"examples must be >= 2, got {examples}")
    device = generator.device
    model.load_state_dict(ck["model"])
    model.train()
    s = Schedule.named(cfg.schedule, cfg.diffusion_steps).to(device)
    sampler = make_sampler(cfg.schedule_sampler, cfg.diffusion_steps)
    sampler.load_state_dict(ck["sampler"])
    params = [p for p in model.parameters() if p.requires_grad]
    cpu_gen = torch.Generator().manual_seed(
        int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    )
    idx = torch.randint(0, len(images), (examples,), generator=cpu_gen)
    grads_all = []
    for i in idx.tolist():
        x0 = to_model_range(images[i : i + 1]).to(device)
        t, w = sampler.sample(1, device, generator=cpu_gen)
        losses = training_losses(
            s,
            model,
            x0,
            t,
            loss_type=cfg.loss_type,
            mean_type=cfg.mean_type,
            var_type=cfg.var_type,  # type: ignore[arg-type]
            vlb_weight=cfg.vlb_weight,
            rescale_timesteps=cfg.rescale_timesteps,
            generator=generator,
        )
        grads = torch.autograd.grad((losses["loss"] * w).sum(), params)
        grads_all.append(torch.cat([gr.detach().double().flatten() for gr in grads]))
    return noise_scale(torch.stack(grads_all))


def noise_scale(grads: Tensor) -> dict[str, float]:
    """``B_simple = tr(Sigma) / |G|^2`` from ``(n, P)`` per-example gradients (McCandlish et al. 2018,
    App. A).

    With ``B_small = 1`` and ``B_big = n``: ``|G|^2 ~ (n |mean g|^2 - mean |g_i|^2) / (n - 1)`` and
    ``tr Sigma ~ (mean |g_i|^2 - |mean g|^2) / (1 - 1/n)``, both unbiased; ``b_simple`` is inf when the
    estimate of ``|G|^2`` is not positive (pure noise).
    """
    if grads.ndim != 2 or grads.shape[0] < 2:
        raise ValueError(f"grads must be (n >= 2, P), got {tuple(grads.shape)}")
    g = grads.double()
    n = float(g.shape[0])
    mean_sq = float(g.square().sum(1).mean())
    big_sq = float(g.mean(0).square().sum())
    grad_sq = (n * big_sq - mean_sq) / (n - 1.0)
    trace = (mean_sq - big_sq) / (1.0 - 1.0 / n)
    return {
        "b_simple": trace / grad_sq if grad_sq > 0 else float("inf"),
        "grad_sq": grad_sq,
        "trace_sigma": trace,
        "n": int(n),
    }


def forward_flops(model: nn.Module, image_shape: tuple[int, int, int]) -> float:
    """Conv + matmul FLOPs (2 per multiply-add) of one forward pass on one image (``flop_counter``).

    A training step costs about 3x this per image (forward + backward), the convention of scaling-law plots.
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(1, *image_shape, device=p.device)
    t = torch.zeros(1, dtype=torch.long, device=p.device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t)
    return float(fc.get_total_flops())


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """A JSON-able dict of a config (tuples as lists)."""
    return json_safe(asdict(cfg))


def json_safe(x: Any) -> Any:
    """Tuples to lists, recursively (for ``json.dumps``)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x

"""iddpm: Improved Denoising Diffusion Probabilistic Models (Nichol & Dhariwal, 2021), tested and explained.

The maths are pure functions of a :class:`Schedule` and tensors (see ``iddpm.schedules`` for the conventions:
0-based ``t``, images in ``[-1, 1]``, float64 schedules). Submodules hold the rest:
``iddpm.unet`` (the model),
``iddpm.data``, ``iddpm.train``, ``iddpm.viz`` (matplotlib / widgets, imported lazily), ``iddpm.runtime``,
``iddpm.metrics`` and ``iddpm.features`` (digit-FID, precision/recall), ``iddpm.experiment`` (the claims at
small scale, ``results/``), and :func:`pretrained` (the small models that ship in ``iddpm/checkpoints``).
"""

from .diffusion import (
    Gaussian,
    MeanType,
    PMeanVar,
    VarType,
    model_out_channels,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_xprev,
    q_mean_variance,
    q_posterior,
    q_sample,
    split_model_output,
)
from .evaluate import BpdResult, bits_per_dim
from .losses import (
    LossType,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    prior_bpd,
    training_losses,
    vlb_term_bpd,
)
from .model_zoo import Pretrained, pretrained
from .resample import LossSecondMomentSampler, UniformSampler, make_sampler
from .respace import respace, space_timesteps
from .sampling import SampleStep, ddim_invert, sample, sample_progressive
from .schedules import (
    Schedule,
    betas_from_alpha_bar,
    cosine_alpha_bar,
    cosine_betas,
    extract,
    get_betas,
    linear_betas,
)
from .train import TrainConfig
from .unet import UNet, UNetConfig

__version__ = "0.1.0"

__all__ = [
    "BpdResult",
    "Gaussian",
    "LossSecondMomentSampler",
    "LossType",
    "MeanType",
    "PMeanVar",
    "Pretrained",
    "SampleStep",
    "Schedule",
    "TrainConfig",
    "UNet",
    "UNetConfig",
    "UniformSampler",
    "VarType",
    "approx_standard_normal_cdf",
    "betas_from_alpha_bar",
    "bits_per_dim",
    "cosine_alpha_bar",
    "cosine_betas",
    "ddim_invert",
    "discretized_gaussian_log_likelihood",
    "extract",
    "get_betas",
    "linear_betas",
    "make_sampler",
    "mean_flat",
    "model_out_channels",
    "normal_kl",
    "p_mean_variance",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_xprev",
    "pretrained",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior",
    "q_sample",
    "respace",
    "sample",
    "sample_progressive",
    "space_timesteps",
    "split_model_output",
    "training_losses",
    "vlb_term_bpd",
]

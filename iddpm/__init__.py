"""iddpm: Improved Denoising Diffusion Probabilistic Models (Nichol & Dhariwal, 2021), tested and explained."""

from .schedules import Schedule, betas_from_alpha_bar, cosine_alpha_bar, cosine_betas, extract, get_betas, linear_betas

__all__ = [
    "Schedule",
    "betas_from_alpha_bar",
    "cosine_alpha_bar",
    "cosine_betas",
    "extract",
    "get_betas",
    "linear_betas",
]

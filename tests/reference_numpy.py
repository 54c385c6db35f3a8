"""Independent float64 NumPy oracle of the authors' diffusion maths (openai/improved-diffusion).

Written only from ``/work/shared/reference/official-code-spec.md`` (sections 1-12 and the gotchas of
section 16), with the authors' names and structure, and *without* the float32 cast of ``_extract_into_tensor``
(gotcha 13): every coefficient stays float64 here. It is a test oracle, not part of the package, and imports
nothing from it.

The "model" is any callable ``model(x_t, ts) -> array``, where ``ts`` are the *original-chain* integer
timesteps (``timestep_map[t]``); whether the network sees them rescaled to 0..1000 is a presentation detail
that the tests check separately.
"""

from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------------------------------
# 1. Noise schedules


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """``beta[i] = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)``, python floats then float64."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise NotImplementedError(schedule_name)


# ----------------------------------------------------------------------------------------------------
# 6. Likelihood primitives


def mean_flat(x):
    return x.reshape(x.shape[0], -1).mean(axis=1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * np.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    centered_x = x - means
    inv_stdv = np.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    return np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ----------------------------------------------------------------------------------------------------
# 11. Respacing


def space_timesteps(num_timesteps, section_counts):
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def spaced_betas(base_betas, use_timesteps):
    """``SpacedDiffusion.__init__``: the respaced betas and the (sorted) timestep map."""
    use_timesteps = set(use_timesteps)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(base_betas, dtype=np.float64))
    last_alpha_cumprod = 1.0
    new_betas = []
    timestep_map = []
    for i, alpha_cumprod in enumerate(alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
            timestep_map.append(i)
    return np.array(new_betas, dtype=np.float64), timestep_map


# ----------------------------------------------------------------------------------------------------
# 2-5, 7-10. GaussianDiffusion

MEAN_TYPES = ("EPSILON", "START_X", "PREVIOUS_X")
VAR_TYPES = ("LEARNED", "LEARNED_RANGE", "FIXED_LARGE", "FIXED_SMALL")
LOSS_TYPES = ("MSE", "RESCALED_MSE", "KL", "RESCALED_KL")


class GaussianDiffusion:
    def __init__(
        self,
        betas,
        model_mean_type="EPSILON",
        model_var_type="LEARNED_RANGE",
        loss_type="RESCALED_MSE",
        timestep_map=None,
    ):
        assert model_mean_type in MEAN_TYPES and model_var_type in VAR_TYPES and loss_type in LOSS_TYPES
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        betas = np.array(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = (
            np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        )

        alphas = 1.0 - betas
        self.alphas = alphas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    @classmethod
    def spaced(cls, base_betas, use_timesteps, **kwargs):
        new_betas, timestep_map = spaced_betas(base_betas, use_timesteps)
        return cls(new_betas, timestep_map=timestep_map, **kwargs)

    # -- helpers
    @staticmethod
    def _extract(arr, timesteps, broadcast_shape):
        """``_extract_into_tensor`` without the float32 cast."""
        res = np.asarray(arr, dtype=np.float64)[np.asarray(timesteps)]
        return res.reshape(res.shape + (1,) * (len(broadcast_shape) - 1)) * np.ones(broadcast_shape)

    def model_timesteps(self, t):
        return self.timestep_map[np.asarray(t)]

    # -- forward process
    def q_mean_variance(self, x_start, t):
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise):
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        posterior_mean = (
            self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = self._extract(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return (xprev - self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t) / self._extract(
            self.posterior_mean_coef1, t, x_t.shape
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    # -- reverse process (the model output is given)
    def p_mean_variance(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        B, C = x.shape[:2]
        if self.model_var_type in ("LEARNED", "LEARNED_RANGE"):
            assert model_output.shape == (B, C * 2) + x.shape[2:]
            model_output, model_var_values = model_output[:, :C], model_output[:, C:]
            if self.model_var_type == "LEARNED":
                model_log_variance = model_var_values
                model_variance = np.exp(model_log_variance)
            else:
                min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
                max_log = self._extract(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2  # raw output: neither clamped nor squashed
                model_log_variance = frac * max_log + (1 - frac) * min_log
                model_variance = np.exp(model_log_variance)
        else:
            if self.model_var_type == "FIXED_LARGE":
                var_arr = np.append(self.posterior_variance[1], self.betas[1:])
                model_variance, model_log_variance = var_arr, np.log(var_arr)
            else:
                model_variance, model_log_variance = (
                    self.posterior_variance,
                    self.posterior_log_variance_clipped,
                )
            model_variance = self._extract(model_variance, t, x.shape)
            model_log_variance = self._extract(model_log_variance, t, x.shape)

        def process_xstart(z):
            if denoised_fn is not None:
                z = denoised_fn(z)
            if clip_denoised:
                return np.clip(z, -1, 1)
            return z

        if self.model_mean_type == "PREVIOUS_X":
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == "START_X":
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    # -- one VLB term
    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=True):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = np.where(np.asarray(t) == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    # -- training
    def training_losses(self, model, x_start, t, noise):
        x_t = self.q_sample(x_start, t, noise)
        terms = {}
        if self.loss_type in ("KL", "RESCALED_KL"):
            model_output = model(x_t, self.model_timesteps(t))
            terms["loss"] = self._vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == "RESCALED_KL":
                terms["loss"] = terms["loss"] * self.num_timesteps
        else:
            model_output = model(x_t, self.model_timesteps(t))
            C = x_t.shape[1]
            if self.model_var_type in ("LEARNED", "LEARNED_RANGE"):
                assert model_output.shape[1] == 2 * C
                eps_part, model_var_values = model_output[:, :C], model_output[:, C:]
                # frozen mean: in NumPy the "detach" is a no-op on values
                frozen_out = np.concatenate([eps_part.copy(), model_var_values], axis=1)
                terms["vb"] = self._vb_terms_bpd(frozen_out, x_start, x_t, t, clip_denoised=False)["output"]
                if self.loss_type == "RESCALED_MSE":
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
                model_output = eps_part
            target = {
                "PREVIOUS_X": self.q_posterior_mean_variance(x_start, x_t, t)[0],
                "START_X": x_start,
                "EPSILON": noise,
            }[self.model_mean_type]
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # -- likelihood evaluation
    def _prior_bpd(self, x_start):
        B = x_start.shape[0]
        t = np.full(B, self.num_timesteps - 1)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, noise_fn, clip_denoised=True):
        """``noise_fn(t)`` replaces ``randn_like``; columns in **reverse** time order (column k: t=T-1-k)."""
        B = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = np.full(B, t)
            noise = noise_fn(t)
            x_t = self.q_sample(x_start, t_batch, noise)
            out = self._vb_terms_bpd(
                model(x_t, self.model_timesteps(t_batch)), x_start, x_t, t_batch, clip_denoised
            )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = np.stack(vb, axis=1)
        xstart_mse = np.stack(xstart_mse, axis=1)
        mse = np.stack(mse, axis=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(axis=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }

    # -- sampling (single steps given the model output and explicit noise)
    def p_sample(self, model_output, x, t, noise, clip_denoised=True, denoised_fn=None):
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
        nonzero_mask = (np.asarray(t) != 0).astype(np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
        sample = out["mean"] + nonzero_mask * np.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_output, x, t, noise, clip_denoised=True, denoised_fn=None, eta=0.0):
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta * np.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * np.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * np.sqrt(alpha_bar_prev) + np.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero_mask = (np.asarray(t) != 0).astype(np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}


# ----------------------------------------------------------------------------------------------------
# 12. Timestep sampler


class LossSecondMomentResampler:
    def __init__(self, num_timesteps, history_per_term=10, uniform_prob=0.001):
        self.num_timesteps = num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses, strict=True):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()

    def sample_probs(self):
        w = self.weights()
        return w / np.sum(w)

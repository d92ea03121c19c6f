"""Training objectives of guided-diffusion as plain functions: epsilon MSE, and with learned sigma
the hybrid loss of improved DDPM (MSE + variational bound with the mean frozen)."""

from __future__ import annotations

import math

import torch

from dmgr.diffusion.schedule import Diffusion


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device)[t].float().view(-1, *([1] * (like.dim() - 1)))


def q_sample(diffusion: Diffusion, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    abar = diffusion.alphas_cumprod
    return _at(abar.sqrt(), t, x0) * x0 + _at((1 - abar).sqrt(), t, x0) * noise


def _posterior(diffusion: Diffusion) -> dict[str, torch.Tensor]:
    betas, abar = diffusion.betas, diffusion.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    variance = betas * (1 - abar_prev) / (1 - abar)
    return {
        "log_variance_clipped": torch.log(torch.cat([variance[1:2], variance[1:]])),
        "coef_x0": betas * abar_prev.sqrt() / (1 - abar),
        "coef_xt": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        "log_betas": torch.log(betas),
    }


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of 8-bit images (scaled to [-1, 1]) under a Gaussian discretised to their bins."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def vb_terms_bpd(
    diffusion: Diffusion,
    eps: torch.Tensor,
    var_values: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """The variational bound term (bits/dim) for a learned-range variance; the decoder NLL at t = 0."""
    post = _posterior(diffusion)
    abar = diffusion.alphas_cumprod
    true_mean = _at(post["coef_x0"], t, x0) * x0 + _at(post["coef_xt"], t, x0) * x_t
    true_logvar = _at(post["log_variance_clipped"], t, x0)
    frac = (var_values + 1) / 2
    model_logvar = frac * _at(post["log_betas"], t, x0) + (1 - frac) * true_logvar
    pred_x0 = _at((1 / abar).sqrt(), t, x0) * x_t - _at((1 / abar - 1).sqrt(), t, x0) * eps
    model_mean = _at(post["coef_x0"], t, x0) * pred_x0 + _at(post["coef_xt"], t, x0) * x_t
    kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def diffusion_loss(
    model: torch.nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample losses: `mse` on epsilon, `vb` when the model learns sigma, and their sum `loss`."""
    x_t = q_sample(diffusion, x0, t, noise)
    out = model(x_t, diffusion.timestep_map.to(t.device)[t], y).float()
    channels = x0.shape[1]
    eps = out[:, :channels]
    terms = {"mse": _mean_flat((noise - eps) ** 2)}
    if out.shape[1] == 2 * channels:
        terms["vb"] = vb_terms_bpd(diffusion, eps.detach(), out[:, channels:], x0, x_t, t)
        terms["loss"] = terms["mse"] + terms["vb"]
    else:
        terms["loss"] = terms["mse"]
    return terms

"""Sample quality on `toy2d`: the squared MMD between model samples and the exact data
distribution, a Gaussian mixture p = sum_i w_i N(m_i, s^2 I) (`Toy2D.gmm_params()`).

With the Gaussian kernel k(x, y) = exp(-||x - y||^2 / (2 h^2)) in d dimensions,

    MMD^2(q, p) = E_{x,x'~q} k(x, x') - 2 E_{x~q} E_{y~p} k(x, y) + E_{y,y'~p} k(y, y'),

and both data-side expectations are Gaussian integrals in closed form:

    E_{y~p} k(x, y)      = sum_i w_i (h^2/(h^2+s^2))^{d/2} exp(-||x - m_i||^2 / (2(h^2+s^2)))
    E_{y,y'~p} k(y, y')  = sum_ij w_i w_j (h^2/(h^2+2s^2))^{d/2} exp(-||m_i - m_j||^2 / (2(h^2+2s^2))).

So only the model side is estimated (the unbiased U-statistic over distinct sample pairs and
a sample mean): no data samples, no density estimate of the model, an unbiased estimate of a
proper distance (the Gaussian kernel is characteristic).
"""

from __future__ import annotations

import torch


def _gauss(sq: torch.Tensor, var: float) -> torch.Tensor:
    return torch.exp(-sq / (2 * var))


def data_kernel_mean(x: torch.Tensor, means: torch.Tensor, std: float, weights: torch.Tensor,
                     h: float) -> torch.Tensor:
    """E_{y~p} k(x, y) for each row of x (N, d)."""
    d, var = x.shape[1], h**2 + std**2
    sq = torch.cdist(x.double(), means.double()).pow(2)
    return (h**2 / var) ** (d / 2) * (_gauss(sq, var) * weights.double()).sum(1)


def data_data_kernel_mean(means: torch.Tensor, std: float, weights: torch.Tensor, h: float) -> float:
    """E_{y,y'~p} k(y, y')."""
    d, var = means.shape[1], h**2 + 2 * std**2
    sq = torch.cdist(means.double(), means.double()).pow(2)
    w = weights.double()
    return float((h**2 / var) ** (d / 2) * (w[:, None] * w[None, :] * _gauss(sq, var)).sum())


def sample_kernel_mean(x: torch.Tensor, h: float, chunk: int = 2048) -> float:
    """The U-statistic mean of k(x_a, x_b) over pairs a != b."""
    x, n, total = x.double(), len(x), 0.0
    for part in x.split(chunk):
        total += float(_gauss(torch.cdist(part, x).pow(2), h**2).sum())
    return (total - n) / (n * (n - 1))  # the n diagonal terms are k(x, x) = 1


def mmd2(x: torch.Tensor, gmm: tuple[torch.Tensor, float, torch.Tensor], h: float) -> float:
    """Unbiased MMD^2 between the samples x (N, d) and the mixture gmm = (means, std, weights)."""
    means, std, weights = gmm
    cross = float(data_kernel_mean(x, means, std, weights, h).mean())
    return sample_kernel_mean(x, h) - 2 * cross + data_data_kernel_mean(means, std, weights, h)


def mmd2_block_se(x: torch.Tensor, gmm: tuple[torch.Tensor, float, torch.Tensor], h: float,
                  blocks: int = 8) -> float:
    """Standard error of mmd2(x) from `blocks` disjoint blocks: the estimate's variance falls
    as 1/N (a U-statistic), so var(full) ~= var(block estimates) / blocks."""
    values = torch.tensor([mmd2(part, gmm, h) for part in x.chunk(blocks)], dtype=torch.float64)
    return float(values.std() / blocks**0.5)


def data_logp(x: torch.Tensor, gmm: tuple[torch.Tensor, float, torch.Tensor]) -> torch.Tensor:
    """log p(x) of the mixture, per row (nats)."""
    means, std, weights = gmm
    d = x.shape[1]
    sq = torch.cdist(x.double(), means.double()).pow(2)
    log_n = -sq / (2 * std**2) - 0.5 * d * torch.log(torch.tensor(2 * torch.pi * std**2))
    return torch.logsumexp(log_n + weights.double().log(), 1)

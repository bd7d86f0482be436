"""ODE integrators in torch, on the state's device: adaptive Dormand–Prince 5(4) and fixed-step
Euler and Heun.

The right-hand side is ``f(t, y)`` with ``t`` a float64 tensor and ``y`` a tensor or a tuple
of tensors (the likelihood ODE carries (x, log p)).  Every integrator returns
``(y1, nfe)``, nfe being the number of evaluations of ``f``.

dopri5 follows Hairer, Nørsett & Wanner, *Solving ODEs I*, Sec. II.4 and II.5, with the
conventions of ``scipy.integrate.solve_ivp(method="RK45")`` so that step counts and NFEs are
comparable: error norm = RMS of err / (atol + rtol max(|y_old|, |y_new|)) over all elements,
step factor safety · norm^(-1/5) clipped to [0.2, 10] (no growth right after a rejection),
FSAL, and the initial step of Hairer's Sec. II.4 ("starting step size").  With
``per_sample=True`` every row of the leading dimension is its own ODE with its own time, step
size and error norm (all rows evaluated together), so a row's solution does not depend on the
other rows of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

State = torch.Tensor | tuple[torch.Tensor, ...]
RHS = Callable[[torch.Tensor, State], State]

# Dormand–Prince 5(4) tableau (Hairer et al., Table II.5.2): nodes C, stages A, 5th-order B,
# and E = B - B_hat (4th-order embedded) over the 7 stages, the 7th being f(t + h, y_new).
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
A = ((),
     (1 / 5,),
     (3 / 40, 9 / 40),
     (44 / 45, -56 / 15, 32 / 9),
     (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
     (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
SAFETY, MIN_FACTOR, MAX_FACTOR, ORDER = 0.9, 0.2, 10.0, 4


# --- states: a tensor or a tuple of tensors ---------------------------------------------------
def _tuple(y: State) -> tuple[torch.Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


def _like(y0: State, parts: Sequence[torch.Tensor]) -> State:
    return tuple(parts) if isinstance(y0, tuple) else parts[0]


def _rows(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A scalar or per-row (B,) value broadcast against y (B, ...), in y's dtype."""
    return v.to(y.dtype).reshape(v.shape + (1,) * (y.dim() - v.dim()))


def _mask(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return m.reshape(m.shape + (1,) * (y.dim() - m.dim()))


def _combine(y: tuple, h: torch.Tensor, ks: Sequence[tuple], coefs: Sequence[float]) -> tuple:
    """y + h sum_j coefs[j] k_j, elementwise over the tensors of the state."""
    out = []
    for i, yi in enumerate(y):
        acc = sum(c * k[i] for c, k in zip(coefs, ks) if c != 0.0)
        out.append(yi + _rows(h, yi) * acc)
    return tuple(out)


def row_sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each row, in float64, reduced row by row: a batched reduction may
    change its summation order with the batch size, which would make a row's result depend
    on the other rows."""
    return torch.stack([r.double().pow(2).sum() for r in x.flatten(1)])


def rms_norm(parts: Sequence[torch.Tensor], per_sample: bool, per_part: bool = False) -> torch.Tensor:
    """RMS over all elements of all tensors (a scalar), or over each row (shape (B,)); with
    `per_part`, the largest of the RMS norms of the state's tensors taken one at a time, so that
    a small part of the state (the log-density of the likelihood ODE) is not outweighed."""
    if per_part and len(parts) > 1:
        return torch.stack([rms_norm([p], per_sample) for p in parts]).amax(0)
    if per_sample:
        sq = sum(row_sum_squares(p) for p in parts)
        return torch.sqrt(sq / sum(p[0].numel() for p in parts))
    sq = sum(p.double().pow(2).sum() for p in parts)
    return torch.sqrt(sq / sum(p.numel() for p in parts))


# --- Dormand–Prince 5(4) ------------------------------------------------------------------------
def dopri5_step(f: RHS, t: torch.Tensor, y: tuple, h: torch.Tensor, k1: tuple):
    """One Dormand–Prince step of size h from (t, y) with k1 = f(t, y) (FSAL); f maps tuples.

    Returns (y_new, k7 = f(t + h, y_new), err), err = h sum_j E_j k_j the difference of the
    5th- and embedded 4th-order solutions.
    """
    ks = [k1]
    for c, a in zip(C[1:], A[1:]):
        ks.append(f(t + c * h, _combine(y, h, ks, a)))
    y_new = _combine(y, h, ks, B)
    ks.append(f(t + h, y_new))
    err = tuple(_rows(h, e) * sum(c * k[i] for c, k in zip(E, ks) if c != 0.0)
                for i, e in enumerate(y))
    return y_new, ks[-1], err


class _Wrap:
    """Calls f with the state in its original form (tensor or tuple)."""

    def __init__(self, f: RHS, y0: State):
        self.f, self.y0, self.nfe = f, y0, 0

    def __call__(self, t: torch.Tensor, y: tuple) -> tuple:
        self.nfe += 1
        return _tuple(self.f(t, _like(self.y0, y)))


Tol = float | Sequence[float]


def _per_part(tol: Tol, n: int) -> tuple[float, ...]:
    """A tolerance for every tensor of the state: one for all, or one each."""
    return (float(tol),) * n if isinstance(tol, (int, float)) else tuple(map(float, tol))


def _scale(y: tuple, y_new: tuple, rtol: Tol, atol: Tol) -> list[torch.Tensor]:
    return [a_tol + r_tol * torch.maximum(a.abs(), b.abs())
            for a, b, r_tol, a_tol in zip(y, y_new, _per_part(rtol, len(y)), _per_part(atol, len(y)))]


def max_norm(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The largest RMS over one row (sample) of one tensor of the state: every sample and every
    part (the likelihood ODE's log-density, a scalar per sample) held to its tolerance alone."""
    return torch.stack([_row_rms(p).amax() for p in parts]).amax()


def _row_rms(p: torch.Tensor) -> torch.Tensor:
    return p.double().reshape(len(p), -1).pow(2).mean(1).sqrt()


def initial_step(f, t0, y0: tuple, f0: tuple, direction: float, rtol: Tol, atol: Tol,
                 per_sample: bool) -> torch.Tensor:
    """Hairer et al. Sec. II.4 (as scipy's select_initial_step): h0 = 0.01 d0/d1, one explicit
    Euler trial step, h1 = (0.01 / max(d1, d2))^(1/(order+1)); h = min(100 h0, h1)."""
    scale = _scale(y0, y0, rtol, atol)
    d0 = rms_norm([y / s for y, s in zip(y0, scale)], per_sample)
    d1 = rms_norm([k / s for k, s in zip(f0, scale)], per_sample)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    y1 = _combine(y0, direction * h0, [f0], [1.0])
    f1 = f(t0 + direction * h0, y1)
    d2 = rms_norm([(a - b) / s for a, b, s in zip(f1, f0, scale)], per_sample) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / dmax) ** (1 / (ORDER + 1)))
    return torch.minimum(100 * h0, h1)


class StepLimitError(RuntimeError):
    """An adaptive solve that did not reach its end within its step limit."""


def dopri5(f: RHS, y0: State, t0: float, t1: float, *, rtol: Tol = 1e-5, atol: Tol = 1e-5,
           max_steps: int = 100_000, per_sample: bool = False,
           error_norm: str = "rms") -> tuple[State, int]:
    """Integrate dy/dt = f(t, y) from t0 to t1 adaptively; returns (y(t1), nfe).

    ``rtol``, ``atol``: one value, or one per tensor of a tuple state.  ``error_norm``: "rms"
    over all elements (scipy's), "rms_per_part" (see `rms_norm`) or "max" (see `max_norm`).

    ``t`` reaches ``f`` as a float64 tensor on y's device: 0-dim, or (B,) with ``per_sample``.
    Raises StepLimitError (a RuntimeError) after ``max_steps`` step attempts.
    """
    y = _tuple(y0)
    fw = _Wrap(f, y0)
    dev = y[0].device
    shape = (y[0].shape[0],) if per_sample else ()
    t = torch.full(shape, float(t0), dtype=torch.float64, device=dev)
    t_end = torch.full_like(t, float(t1))
    direction = 1.0 if t1 >= t0 else -1.0
    k1 = fw(t, y)
    h_abs = initial_step(fw, t, y, k1, direction, rtol, atol, per_sample)
    rejected = torch.zeros(shape, dtype=torch.bool, device=dev)
    for _ in range(max_steps):
        left = (t_end - t) * direction
        if not bool((left > 0).any()):
            return _like(y0, y), fw.nfe
        h_abs = torch.minimum(h_abs, left)  # the last step lands on t1 exactly
        y_new, k7, err = dopri5_step(fw, t, y, direction * h_abs, k1)
        scaled = [e / s for e, s in zip(err, _scale(y, y_new, rtol, atol))]
        norm = max_norm(scaled) if error_norm == "max" and not per_sample else \
            rms_norm(scaled, per_sample, error_norm == "rms_per_part")
        accept = norm < 1
        grow = torch.where(norm == 0, MAX_FACTOR,
                           SAFETY * norm.clamp(min=1e-300) ** (-1 / (ORDER + 1)))
        factor = torch.where(accept, torch.where(rejected, grow.clamp(max=1.0),
                                                 grow.clamp(max=MAX_FACTOR)),
                             grow.clamp(min=MIN_FACTOR))
        t = torch.where(accept, torch.where(h_abs == left, t_end, t + direction * h_abs), t)
        y = tuple(torch.where(_mask(accept, a), a, b) for a, b in zip(y_new, y))
        k1 = tuple(torch.where(_mask(accept, a), a, b) for a, b in zip(k7, k1))
        h_abs, rejected = h_abs * factor, ~accept
    raise StepLimitError(f"dopri5 did not reach t1 = {t1} in {max_steps} steps (rtol {rtol}, "
                       f"atol {atol}); the ODE may be too stiff")


# --- fixed-step methods -------------------------------------------------------------------------
def euler(f: RHS, y0: State, ts: Sequence[float]) -> tuple[State, int]:
    """Explicit Euler over the grid ts: y_{n+1} = y_n + h f(t_n, y_n); nfe = len(ts) - 1."""
    y, fw = _tuple(y0), _Wrap(f, y0)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = torch.tensor(t1 - t0, dtype=torch.float64)
        y = _combine(y, h, [fw(_time(t0, y), y)], [1.0])
    return _like(y0, y), fw.nfe


def heun(f: RHS, y0: State, ts: Sequence[float]) -> tuple[State, int]:
    """Heun's method (explicit trapezoid, Karras et al. 2022 Alg. 1) over the grid ts:
    y' = y + h k1, y_{n+1} = y + h/2 (k1 + f(t_{n+1}, y')); nfe = 2 (len(ts) - 1)."""
    y, fw = _tuple(y0), _Wrap(f, y0)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = torch.tensor(t1 - t0, dtype=torch.float64)
        k1 = fw(_time(t0, y), y)
        k2 = fw(_time(t1, y), _combine(y, h, [k1], [1.0]))
        y = _combine(y, h, [k1, k2], [0.5, 0.5])
    return _like(y0, y), fw.nfe


def _time(t: float, y: tuple) -> torch.Tensor:
    return torch.tensor(t, dtype=torch.float64, device=y[0].device)

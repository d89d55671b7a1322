"""Attention-space extrapolation: the math of PLADIS, GAG and NAG (no hooking here).

Everything works on attention inputs in head layout ``q [rows, heads, Q, d]``,
``k, v [rows, kv_heads, K, d]`` (or without the heads axis, ``[rows, Q, d]``) and returns an
output shaped like ``q`` with ``v``'s last axis. Logits are ``scale q k^T`` plus the mask
(``scale`` defaults to ``1 / sqrt(d)``, as ``scaled_dot_product_attention``); a boolean mask
keeps the ``True`` entries, a floating mask is added to the logits, as in
``torch.nn.functional.scaled_dot_product_attention``.

Sparse attention maps, computed exactly (sort-based, no iteration), written for guidekit:

* **sparsemax** (Martins & Astudillo 2016, https://arxiv.org/abs/1602.02068): the Euclidean
  projection of the logits ``z`` onto the probability simplex, ``p = [z - tau]_+`` with the
  threshold ``tau`` that makes ``p`` sum to 1.
* **1.5-entmax** (Peters et al. 2019, https://arxiv.org/abs/1905.05702): ``p = [z/2 - tau]_+^2``
  with the ``tau`` that makes ``p`` sum to 1. With ``x = z/2`` sorted decreasingly and a
  support of the ``k`` largest entries, ``sum_{i<=k} (x_i - tau)^2 = 1`` gives
  ``tau_k = mean_k - sqrt((1 - k var_k) / k)`` (``mean_k``, ``var_k``: mean and population
  variance of the top ``k``); the support is the largest ``k`` with ``tau_k <= x_k``.

Both are shift-invariant in ``z`` (the maximum is subtracted first) and give exact zeros;
an entry of ``-inf`` (a masked key) gets weight 0. The pip package ``entmax`` implements
the same maps; guidekit does not depend on it (its results agree to float rounding).

The methods (formulas from ``shared/reference/methods.md``):

* :func:`pladis_attention` -- PLADIS (arXiv 2503.07677): ``A = A_dense + lam (A_sparse -
  A_dense)`` on the same logits, ``out = A V``.
* :func:`gag_attention` -- GAG (arXiv 2603.02531, formula as collected in methods.md; no
  author code exists): ``S = A_sparse V``, ``D = A_dense V``, ``delta = S - D``,
  ``delta_par = (<delta, S> / ||S||^2) S``, ``delta_perp = delta - delta_par``,
  ``g = delta_par + zeta delta_perp``, ``out = S + lam min(1, eta / ||g||) g``, per query
  token and head (norms and inner products over the head dimension).
* :func:`nag_combine` -- NAG (arXiv 2505.21179): ``Zt = phi Z+ - (phi - 1) Z-``,
  ``r = ||Zt||_1 / ||Z+||_1`` per token, ``Zh = Zt min(r, tau) / r``,
  ``Z = alpha Zh + (1 - alpha) Z+``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from guidekit.errors import GuidanceValueError

#: Names of the sparse maps PLADIS and GAG accept.
SPARSE_MAPS = ("entmax15", "sparsemax")

# A masked (-inf) entry is replaced by (row max - _FAR) before the sparse maps: both maps
# give zero weight to anything more than 2 below the maximum (sparsemax: tau >= max - 1;
# 1.5-entmax: tau >= max/2 - 1), so the replacement changes no output and keeps the sorted
# cumulative sums finite.
_FAR = 16.0


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half types (sorting and cumulative sums lose too much in 16 bits)."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _last(z: torch.Tensor, dim: int) -> torch.Tensor:
    return z if dim in (-1, z.ndim - 1) else z.movedim(dim, -1)


def _back(p: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    return p if dim in (-1, ndim - 1) else p.movedim(-1, dim)


def _centred(z: torch.Tensor) -> torch.Tensor:
    """``z - max(z)`` along the last axis, with ``-inf`` moved to ``-_FAR`` (see above)."""
    top = z.amax(-1, keepdim=True)
    # the check reads the data, so torch.compile would break its graph here (once per
    # hooked layer); compiled, an all-masked row gives NaN, as the dense softmax does
    if not torch.compiler.is_compiling() and not torch.isfinite(top).all():
        raise GuidanceValueError(
            "a sparse attention map needs at least one finite logit per row (a row whose "
            "keys are all masked has no distribution)"
        )
    z = z - top
    return torch.where(torch.isneginf(z), torch.full_like(z, -_FAR), z)


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax along ``dim``: the closest point of the probability simplex to ``z``.

    Sorted decreasingly with cumulative sums ``c_k``, the support is the ``k`` largest
    entries for the largest ``k`` with ``1 + k z_(k) > c_k``, and
    ``tau = (c_k - 1) / k``; ``p = max(z - tau, 0)``.
    """
    ndim = z.ndim
    dtype = z.dtype
    z = _centred(_last(z, dim).to(_compute_dtype(z)))
    zs = z.sort(-1, descending=True).values
    ks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    csum = zs.cumsum(-1)
    support = (1 + ks * zs > csum).sum(-1, keepdim=True)  # >= 1: k = 1 always qualifies
    tau = (csum.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return _back((z - tau).clamp_min(0).to(dtype), dim, ndim)


def entmax15(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax along ``dim``: ``p = [z/2 - tau]_+^2`` summing to 1 (exact, sort-based).

    See the module docstring for the threshold. Between sparsemax (``alpha = 2``) and
    softmax (``alpha -> 1``): sparse, but smoother than sparsemax.
    """
    ndim = z.ndim
    dtype = z.dtype
    x = _centred(_last(z, dim).to(_compute_dtype(z))) / 2
    xs = x.sort(-1, descending=True).values
    ks = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    mean = xs.cumsum(-1) / ks
    var = (xs * xs).cumsum(-1) / ks - mean * mean
    # where 1 - k var < 0 no real threshold exists for that k; clamping the root at 0 gives
    # tau_k = mean_k > x_k (the top k are not all equal), so such k never qualify
    tau = mean - ((1 - ks * var) / ks).clamp_min(0).sqrt()
    support = (tau <= xs).sum(-1, keepdim=True).clamp_min(1)
    tau_star = tau.gather(-1, support - 1)
    return _back((x - tau_star).clamp_min(0).square().to(dtype), dim, ndim)


def sparse_map(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The sparse map called ``name`` (``"entmax15"`` or ``"sparsemax"``), over the last axis."""
    if name == "entmax15":
        return entmax15
    if name == "sparsemax":
        return sparsemax
    raise GuidanceValueError(f"unknown sparse attention map {name!r}; one of {SPARSE_MAPS}")


# -- logits and the two maps -------------------------------------------------------------------------


def _share_heads(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention (fewer kv heads than q heads)."""
    if q.ndim >= 4 and t.shape[-3] != q.shape[-3]:
        heads, kv = q.shape[-3], t.shape[-3]
        if heads % kv:
            raise GuidanceValueError(f"{heads} query heads cannot share {kv} key/value heads")
        return t.repeat_interleave(heads // kv, dim=-3)
    return t


def attention_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``scale q k^T`` plus the mask (boolean: ``False`` is ``-inf``), in a float dtype of at
    least 32 bits. ``scale=None`` is ``1 / sqrt(d)``."""
    dtype = _compute_dtype(query)
    q = query.to(dtype)
    k = _share_heads(query, key).to(dtype)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = (q @ k.transpose(-1, -2)) * s
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(dtype)
    return logits


def dense_and_sparse_maps(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    sparse: str = "entmax15",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(L), sparse(L))`` for the logits ``L`` of :func:`attention_logits`."""
    logits = attention_logits(query, key, mask, scale)
    return logits.softmax(-1), sparse_map(sparse)(logits)


def _apply(maps: torch.Tensor, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return maps @ _share_heads(query, value).to(maps.dtype)


# -- the three methods --------------------------------------------------------------------------------


def pladis_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    logit_scale: float | None = None,
    sparse: str = "entmax15",
) -> torch.Tensor:
    """PLADIS, https://arxiv.org/abs/2503.07677: ``(A_dense + scale (A_sparse - A_dense)) V``.

    ``scale`` is the paper's ``lambda`` (0: the model's own attention; 1: purely sparse);
    ``logit_scale`` the attention's ``1 / sqrt(d)``.
    """
    dense, sparse_p = dense_and_sparse_maps(
        query, key, mask=mask, scale=logit_scale, sparse=sparse
    )
    maps = dense + scale * (sparse_p - dense)
    return _apply(maps, query, value).to(value.dtype)


def gag_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    eta: float,
    zeta: float,
    mask: torch.Tensor | None = None,
    logit_scale: float | None = None,
    sparse: str = "entmax15",
) -> torch.Tensor:
    """GAG, https://arxiv.org/abs/2603.02531 (formula of methods.md, unverified, see module doc).

    Per query token and head: ``delta = S - D`` split along the retrieval direction ``S``;
    ``g = delta_par + zeta delta_perp``; ``out = S + scale min(1, eta / ||g||) g``. Where
    ``S = 0`` the parallel part is taken as 0 (no direction); where ``g = 0`` the clamp
    factor is 1 (nothing to clamp).
    """
    dense, sparse_p = dense_and_sparse_maps(
        query, key, mask=mask, scale=logit_scale, sparse=sparse
    )
    s = _apply(sparse_p, query, value)
    d = _apply(dense, query, value)
    delta = s - d
    s_sq = (s * s).sum(-1, keepdim=True)
    coef = torch.where(s_sq > 0, (delta * s).sum(-1, keepdim=True) / s_sq.clamp_min(1e-300),
                       torch.zeros_like(s_sq))
    par = coef * s
    g = par + zeta * (delta - par)
    g_norm = g.norm(dim=-1, keepdim=True)
    clamp = torch.where(g_norm > eta, eta / g_norm.clamp_min(1e-300), torch.ones_like(g_norm))
    return (s + scale * clamp * g).to(value.dtype)


def nag_combine(
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    scale: float,
    tau: float | None,
    alpha: float,
    dims: tuple[int, ...] = (-1,),
) -> torch.Tensor:
    """NAG, https://arxiv.org/abs/2505.21179, on attention outputs ``Z+`` and ``Z-``.

    ``Zt = scale Z+ - (scale - 1) Z-``; per token, ``r = ||Zt||_1 / ||Z+||_1`` over ``dims``
    (the channels of one token: ``(-3, -1)`` for heads and head dimension, ``(-1,)`` for
    merged heads); ``Zh = Zt min(r, tau) / r``; ``alpha Zh + (1 - alpha) Z+``.

    ``min(r, tau) / r`` is evaluated as ``min(1, tau ||Z+||_1 / ||Zt||_1)``: the same value
    wherever both norms are positive, 1 where ``Zt = 0`` and 0 where ``Z+ = 0 != Zt``
    (instead of a division by zero). ``tau=None`` skips the normalisation (``Zh = Zt``).
    """
    dtype = _compute_dtype(positive)
    zp, zn = positive.to(dtype), negative.to(dtype)
    zt = scale * zp - (scale - 1.0) * zn
    if tau is None:
        return (alpha * zt + (1.0 - alpha) * zp).to(positive.dtype)
    norm_p = zp.abs().sum(dims, keepdim=True)
    norm_t = zt.abs().sum(dims, keepdim=True)
    factor = torch.where(
        norm_t > 0, (tau * norm_p / norm_t.clamp_min(1e-300)).clamp_max(1.0),
        torch.ones_like(norm_t),
    )
    return (alpha * zt * factor + (1.0 - alpha) * zp).to(positive.dtype)

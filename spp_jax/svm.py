"""Linear SVMs for SPP-net: a batched L1-loss (hinge) solver, feature scaling
helpers and R-CNN/SPP-net style hard-negative mining.

Problem (one per class k = 0..K-1, all classes share the feature matrix X)::

    min_w  0.5 * ||w||^2 + C * sum_i c_ki * max(0, 1 - y_ki * w . x~_i)

with x~_i = [x_i, B] (a constant bias feature of value B, regularised like
every other weight -- the liblinear ``-B`` convention used by the released
R-CNN/SPP-net code), c_ki = pos_weight for positives, neg_weight for
negatives, and y_ki = 0 meaning "sample i is not part of class k's problem".
The returned bias is b_k = B * w_k[D], so that score = x . w_k[:D] + b_k.

Solver: dual coordinate descent (DCD, Hsieh et al. 2008, liblinear ``-s 3``)
run *blockwise* so that almost all work is dense matrix products:

* Dual: min_a 0.5 a^T Q a - sum(a),  0 <= a_i <= U_i = C c_i,
  Q_ij = y_i y_j x~_i . x~_j, and w = sum_i a_i y_i x~_i.
* Rows are split into blocks of ``block_size``.  The block Gram matrices
  x~_i . x~_j (shared by all classes because X is shared) are computed once.
  For each block, the dual gradients of its rows are computed with one
  matmul from the current w, then the exact sequential single-variable
  DCD updates are run over the rows of the block using only the block Gram
  matrix (O(block_size * K) per update instead of O(D * K)), and w is
  updated with one matmul at the end of the block.  This produces exactly
  the DCD iterates (no approximation), with the D-sized work batched.
* All K classes are updated together (the class axis is a batch axis of
  every array), which is the "vmapped over classes" solve.
* Each epoch visits the blocks in a random order and the rows of each block
  in a random order (liblinear also permutes every epoch; it additionally
  uses shrinking, which is not done here).

Stopping criterion: the duality gap, checked every ``check_every`` epochs.
For the current dual point a, w(a) is recomputed from a (so float32 drift in
the running w cannot fake convergence); D(a) = sum(a) - 0.5||w(a)||^2 is the
dual objective and P the primal objective.  DCD increases D monotonically
but P(w(a)) fluctuates (the hinge is non-smooth at the many rows on the
margin), so the best primal point seen so far is kept and returned.
P(w_best) - P* <= P(w_best) - D(a) = gap, so stopping when
gap_k <= tol * P_k for every class certifies a relative primal
suboptimality of at most ``tol`` (default 1e-3; liblinear's default
eps = 0.1 used by the released code is looser).  By 1-strong convexity,
||w_best - w*|| <= sqrt(2 * gap) too.  The dual converges much faster than
this certificate shows (dual suboptimality is typically 10-100x below the
gap), so w is already accurate when the gap test passes.

Cost per epoch ~ 4 N D K flops in matmuls plus N sequential O(block_size * K)
updates; measured on the 2-core CPU for N = 20000, D = 4096, K = 20 on
fc7-like synthetic data: ~0.15 s per epoch, 120 epochs (~19 s; the first
call, which compiles, took ~28 s) for tol = 1e-3, 220 epochs (~30 s) for
tol = 1e-4.

Static shapes: N is padded to a bucket (a multiple of ``block_size`` rounded
up to one of 4, 5, 6 or 7 times a power of two blocks, so at most ~25 %
padding) with zero rows whose box bound is 0, so they never move.  The jitted
solve is specialised on (N_pad, D, K); during hard-negative mining the cache
grows a little between retrains, and bucketing lets consecutive retrains
reuse one compiled program instead of recompiling for every new N.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SVMResult",
    "train_linear_svms",
    "svm_primal_objective",
    "mean_norm_scale",
    "scale_to_mean_norm",
    "l2_normalize",
    "MiningResult",
    "mine_hard_negatives",
    "encode_keys",
    "decode_keys",
    "padded_size",
]

# Released R-CNN / SPP-net detection SVM settings.
DEFAULT_C = 1e-3
DEFAULT_POS_WEIGHT = 2.0  # detection; transfer classification uses 1.0
DEFAULT_BIAS_VALUE = 10.0
HARD_THRESH = -1.0001
EVICT_THRESH = -1.2
RETRAIN_EVERY = 2000


# --------------------------------------------------------------------------
# Solver
# --------------------------------------------------------------------------


@dataclasses.dataclass
class SVMResult:
    """Output of :func:`train_linear_svms`.

    Attributes:
      weights: (K, D) float32; score = X @ weights.T + biases.
      biases: (K,) float32, equal to bias_value * (weight of the bias feature).
      alpha: (K, N) float32 final dual variables (0 <= alpha <= C * c_i);
        can be passed back as ``alpha0`` to warm-start a related problem.
        (weights is the best primal point seen, which may differ slightly
        from w(alpha).)
      scores: (K, N) float32 decision values of the training rows under the
        returned model.
      objective: (K,) float64 primal objective per class (see module doc).
      dual_objective: (K,) float64 dual objective per class.
      gap: (K,) float64 duality gap = objective - dual_objective (>= 0 up to
        float32 rounding); objective - optimum <= gap.
      epochs: number of DCD epochs run.
      converged: whether gap <= tol * objective for every class.
    """

    weights: np.ndarray
    biases: np.ndarray
    alpha: np.ndarray
    scores: np.ndarray
    objective: np.ndarray
    dual_objective: np.ndarray
    gap: np.ndarray
    epochs: int
    converged: bool

    @property
    def rel_gap(self) -> np.ndarray:
        """(K,) duality gap relative to the primal objective."""
        return self.gap / np.maximum(self.objective, 1e-30)


def padded_size(n: int, block_size: int) -> int:
    """Bucketed row count used by the solver for ``n`` rows.

    A multiple of ``block_size`` whose block count is 1, 2, 3 or m * 2^e
    with m in {4, 5, 6, 7}: at most ~25 % padding and only four distinct
    sizes per doubling of n, so a growing mining cache recompiles rarely.
    """
    nb = max(1, -(-n // block_size))
    if nb > 4:
        e = nb.bit_length() - 3  # nb in [4 * 2^e, 8 * 2^e)
        m = -(-nb // (1 << e))
        nb = m << e
    return nb * block_size


def _dcd_epoch(carry, xs, *, Xb_all, Yb_all, Ub_all, Gram, bias_sq, bias_value,
               ):
    """One pass over the blocks (a lax.scan body over the block order).

    Shapes: Xb_all (nb, b, D), Yb_all / Ub_all (nb, b, K), Gram (nb, b, b),
    carry = (W (K, D), wb (K,), alpha (nb, b, K)).
    """
    W, wb, alpha = carry
    blk, perm = xs  # scalar block index, (b,) row order within the block
    Xb = Xb_all[blk]
    Yb = Yb_all[blk]
    Ub = Ub_all[blk]
    Gb = Gram[blk] + bias_sq  # x~_i . x~_j including the bias feature
    Qd = jnp.diagonal(Gb)
    # Dual gradient G_i = y_i w~ . x~_i - 1 for every row of the block.
    g = Yb * (Xb @ W.T + bias_value * wb[None, :]) - 1.0
    a0 = alpha[blk]

    def step(t, state):
        g, a = state
        j = perm[t]
        aj = a[j]
        # Exact 1-D minimisation along a_j, clipped to the box.  Qd == 0 only
        # for padded rows, whose box is [0, 0] anyway.
        new = jnp.clip(aj - g[j] / jnp.maximum(Qd[j], 1e-30), 0.0, Ub[j])
        d = new - aj
        # Q_ij * d_j for every row i of the block: y_i y_j (x~_i . x~_j) d_j.
        g = g + Yb * (Gb[j][:, None] * (Yb[j] * d)[None, :])
        a = a.at[j].set(new)
        return g, a

    _, a1 = jax.lax.fori_loop(0, Xb.shape[0], step, (g, a0))
    dy = (a1 - a0) * Yb  # (b, K)
    W = W + dy.T @ Xb
    wb = wb + bias_value * jnp.sum(dy, axis=0)
    alpha = alpha.at[blk].set(a1)
    return (W, wb, alpha), None


def _w_from_alpha(X, Y, alpha, bias_value):
    """w = sum_i alpha_i y_i x~_i; X (N, D), Y/alpha (N, K) -> (K, D), (K,)."""
    ay = alpha * Y
    return ay.T @ X, bias_value * jnp.sum(ay, axis=0)


def _objectives(X, Y, U_over_C, alpha, C, bias_value):
    """Primal, dual objectives (K,), w and scores (N, K) for dual point alpha."""
    W, wb = _w_from_alpha(X, Y, alpha, bias_value)
    S = X @ W.T + bias_value * wb[None, :]
    sqn = jnp.sum(W * W, axis=1) + wb * wb
    hinge = jnp.sum(U_over_C * jnp.maximum(0.0, 1.0 - Y * S), axis=0)
    primal = 0.5 * sqn + C * hinge
    dual = jnp.sum(alpha, axis=0) - 0.5 * sqn
    return primal, dual, W, wb, S


@functools.partial(
    jax.jit, static_argnames=("block_size", "check_every")
)
def _solve(X, Y, Wt, alpha0, key, C, bias_value, tol, max_epochs, *,
           block_size, check_every):
    """Jitted batched DCD.  X (N, D) with N % block_size == 0; Y, Wt, alpha0
    (N, K): labels in {-1, 0, +1}, per-row loss weights c_i (0 for ignored /
    padded rows) and the initial dual point (must lie in [0, C * Wt])."""
    n, d = X.shape
    k = Y.shape[1]
    nb = n // block_size
    U = C * Wt
    alpha0 = jnp.clip(alpha0, 0.0, U)
    Xb_all = X.reshape(nb, block_size, d)
    Gram = jnp.einsum("nid,njd->nij", Xb_all, Xb_all)
    epoch_fn = functools.partial(
        _dcd_epoch,
        Xb_all=Xb_all,
        Yb_all=Y.reshape(nb, block_size, k),
        Ub_all=U.reshape(nb, block_size, k),
        Gram=Gram,
        bias_sq=bias_value * bias_value,
        bias_value=bias_value,
    )

    def not_done(state):
        epoch, p_best, dl = state[0], state[4], state[5]
        ok = (p_best - dl) <= tol * jnp.abs(p_best)
        return jnp.logical_and(epoch < max_epochs, ~jnp.all(ok))

    def body(state):
        epoch, key, W_best, wb_best, p_best, _, alpha, W, wb = state
        alpha = alpha.reshape(nb, block_size, k)
        for _ in range(check_every):  # unrolled: check the gap every few epochs
            key, k1, k2 = jax.random.split(key, 3)
            order = jax.random.permutation(k1, nb)
            perms = jax.vmap(lambda kk: jax.random.permutation(kk, block_size))(
                jax.random.split(k2, nb)
            )
            (W, wb, alpha), _ = jax.lax.scan(epoch_fn, (W, wb, alpha),
                                             (order, perms))
        alpha = alpha.reshape(n, k)
        # Recompute w from alpha: the certificate must not depend on the
        # float32 rounding accumulated in the running w.
        p, dl, W, wb, _ = _objectives(X, Y, Wt, alpha, C, bias_value)
        # The dual objective increases monotonically under DCD, but P(w(alpha))
        # fluctuates (the hinge is non-smooth at the many margin rows), so
        # keep the best primal point seen: best P - current D is still a
        # valid gap.
        better = p < p_best
        W_best = jnp.where(better[:, None], W, W_best)
        wb_best = jnp.where(better, wb, wb_best)
        p_best = jnp.minimum(p, p_best)
        return (epoch + check_every, key, W_best, wb_best, p_best, dl, alpha,
                W, wb)

    p, dl, W, wb, _ = _objectives(X, Y, Wt, alpha0, C, bias_value)
    state = (jnp.int32(0), key, W, wb, p, dl, alpha0, W, wb)
    epoch, _, W, wb, p, dl, alpha, _, _ = jax.lax.while_loop(
        not_done, body, state)
    S = X @ W.T + bias_value * wb[None, :]
    return W, bias_value * wb, alpha, S, p, dl, epoch


def train_linear_svms(
    X,
    Y,
    *,
    C: float = DEFAULT_C,
    pos_weight: float = DEFAULT_POS_WEIGHT,
    neg_weight: float = 1.0,
    sample_weight=None,
    bias_value: float = DEFAULT_BIAS_VALUE,
    tol: float = 1e-3,
    max_epochs: int = 1000,
    check_every: int = 2,
    block_size: int = 256,
    alpha0=None,
    seed: int = 0,
) -> SVMResult:
    """Train K L2-regularised hinge-loss linear SVMs on shared features.

    Args:
      X: (N, D) float features (numpy or jax), shared by all classes.
      Y: (K, N) labels in {+1, -1, 0}; 0 = sample not used for that class.
        A 1-D (N,) array is treated as K = 1.
      C: loss weight (liblinear's C, not divided by N).
      pos_weight, neg_weight: per-label multipliers of C (liblinear ``-w1``;
        2 for the released detection SVMs, 1 for transfer classification).
      sample_weight: optional (N,) or (K, N) extra non-negative multipliers.
      bias_value: value B of the appended, regularised bias feature
        (liblinear ``-B``); B <= 0 disables the bias.
      tol: stop when duality gap <= tol * primal objective for every class.
      max_epochs: cap on DCD epochs (passes over the data).
      check_every: epochs between gap checks (a check costs about as much as
        one epoch).
      block_size: rows per DCD block (see module doc); N is padded to
        :func:`padded_size`.
      alpha0: optional (K, N) warm start for the dual variables (clipped to
        the box).  The initial w is recomputed from it.
      seed: PRNG seed of the epoch permutations.

    Returns:
      :class:`SVMResult` (numpy arrays).
    """
    X = np.asarray(X, dtype=np.float32)
    Y = np.asarray(Y)
    squeeze = Y.ndim == 1
    if squeeze:
        Y = Y[None, :]
    k, n = Y.shape
    if X.ndim != 2 or X.shape[0] != n:
        raise ValueError(f"X {X.shape} does not match Y {Y.shape}")
    d = X.shape[1]
    use_bias = bias_value > 0
    B = float(bias_value) if use_bias else 0.0
    n_pad = padded_size(n, block_size)

    Yf = np.sign(Y).astype(np.float32)
    Wt = np.where(Yf > 0, pos_weight, np.where(Yf < 0, neg_weight, 0.0))
    Wt = Wt.astype(np.float32)
    if sample_weight is not None:
        Wt = Wt * np.broadcast_to(np.asarray(sample_weight, np.float32), Wt.shape)
    if np.any(Wt < 0):
        raise ValueError("weights must be non-negative")

    Xp = np.zeros((n_pad, d), np.float32)
    Xp[:n] = X
    Yp = np.zeros((n_pad, k), np.float32)
    Yp[:n] = Yf.T
    Wp = np.zeros((n_pad, k), np.float32)
    Wp[:n] = Wt.T
    Ap = np.zeros((n_pad, k), np.float32)
    if alpha0 is not None:
        Ap[:n] = np.asarray(alpha0, np.float32).reshape(k, n).T

    W, b, alpha, S, p, dl, epochs = _solve(
        Xp, Yp, Wp, Ap, jax.random.PRNGKey(seed),
        jnp.float32(C), jnp.float32(B), jnp.float32(tol),
        jnp.int32(max_epochs), block_size=block_size,
        check_every=int(check_every),
    )
    p = np.asarray(p, np.float64)
    dl = np.asarray(dl, np.float64)
    gap = p - dl
    res = SVMResult(
        weights=np.asarray(W),
        biases=np.asarray(b),
        alpha=np.asarray(alpha)[:n].T.copy(),
        scores=np.asarray(S)[:n].T.copy(),
        objective=p,
        dual_objective=dl,
        gap=gap,
        epochs=int(epochs),
        converged=bool(np.all(gap <= tol * np.abs(p))),
    )
    return res


def svm_primal_objective(X, Y, weights, biases, *, C=DEFAULT_C,
                         pos_weight=DEFAULT_POS_WEIGHT, neg_weight=1.0,
                         bias_value=DEFAULT_BIAS_VALUE) -> np.ndarray:
    """Primal objective (K,) float64 of given models, computed in float64.

    X (N, D); Y (K, N) in {+1, -1, 0}; weights (K, D); biases (K,) (the bias
    feature weight is biases / bias_value and is regularised).
    """
    X = np.asarray(X, np.float64)
    Y = np.atleast_2d(np.sign(np.asarray(Y))).astype(np.float64)
    Wm = np.atleast_2d(np.asarray(weights, np.float64))
    b = np.atleast_1d(np.asarray(biases, np.float64))
    c = np.where(Y > 0, pos_weight, np.where(Y < 0, neg_weight, 0.0))
    S = Wm @ X.T + b[:, None]
    reg = np.sum(Wm * Wm, axis=1)
    if bias_value > 0:
        reg = reg + (b / bias_value) ** 2
    return 0.5 * reg + C * np.sum(c * np.maximum(0.0, 1.0 - Y * S), axis=1)


# --------------------------------------------------------------------------
# Feature normalisation
# --------------------------------------------------------------------------


def mean_norm_scale(X, target: float = 20.0, chunk: int = 8192) -> float:
    """Constant s such that the rows of s * X have mean L2 norm ``target``.

    X: (N, D) training features (numpy or jax; processed in chunks of
    ``chunk`` rows in float64 so big arrays are not copied).  R-CNN /
    SPP-net detection scales fc features to mean norm 20 with one constant
    estimated on training features and reused on test features.
    """
    n = X.shape[0]
    if n == 0:
        raise ValueError("empty feature set")
    total = 0.0
    for s in range(0, n, chunk):
        xs = np.asarray(X[s:s + chunk], np.float64)
        total += float(np.sum(np.sqrt(np.sum(xs * xs, axis=1))))
    mean = total / n
    if mean <= 0:
        raise ValueError("all-zero features")
    return float(target / mean)


def scale_to_mean_norm(X, target: float = 20.0):
    """Scale X (N, D) by one constant so its mean row L2 norm is ``target``.

    Returns (X * s as float32 numpy array, s); apply the same s to test
    features: ``X_test * s``.
    """
    s = mean_norm_scale(X, target)
    return (np.asarray(X, np.float32) * np.float32(s)), s


def l2_normalize(X, eps: float = 1e-12):
    """Divide every row of X (N, D) by its L2 norm (rows of norm < eps are
    left ~0).  Used for transfer classification features.  Returns the same
    array type as given (numpy in -> numpy float32 out, jax in -> jax out).
    """
    if isinstance(X, jax.Array):
        n = jnp.sqrt(jnp.sum(X * X, axis=-1, keepdims=True))
        return X / jnp.maximum(n, eps)
    X = np.asarray(X, np.float32)
    n = np.sqrt(np.sum(X.astype(np.float64) ** 2, axis=-1, keepdims=True))
    return (X / np.maximum(n, eps)).astype(np.float32)


# --------------------------------------------------------------------------
# Hard-negative mining
# --------------------------------------------------------------------------

_ROW_BITS = 32


def encode_keys(image_index, rows) -> np.ndarray:
    """Cache key (int64) of row ``rows`` of image ``image_index``.

    Keys sort by image, then row.  Positives passed to
    :func:`mine_hard_negatives` via ``positives=`` use image index -1.
    """
    rows = np.asarray(rows, np.int64)
    return (np.int64(image_index) << _ROW_BITS) + rows


def decode_keys(keys):
    """Inverse of :func:`encode_keys`: (image_index (M,), rows (M,)) int64."""
    keys = np.asarray(keys, np.int64)
    return keys >> _ROW_BITS, keys & ((1 << _ROW_BITS) - 1)


class _FeatureStore:
    """Features of the cached rows, grouped per image.

    Without ``fetch`` the rows' features are copied in when a row first
    enters some cache and dropped once it leaves every cache, so memory is
    bounded by the union of the caches.  With ``fetch(image_index, rows)``
    only keys are kept and features are re-read at every retrain.
    """

    def __init__(self, fetch):
        self.fetch = fetch
        self.chunks: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def add(self, image: int, rows: np.ndarray, feats: np.ndarray) -> None:
        rows = np.unique(np.asarray(rows, np.int64))
        if rows.size == 0:
            return
        old_rows, old_f = self.chunks.get(
            image, (np.empty(0, np.int64), None))
        new = rows[~np.isin(rows, old_rows)]
        if new.size == 0:
            return
        all_rows = np.concatenate([old_rows, new])
        order = np.argsort(all_rows, kind="stable")
        if self.fetch is None:
            f_new = np.asarray(feats[new], np.float32)
            f = f_new if old_f is None else np.concatenate([old_f, f_new])
            self.chunks[image] = (all_rows[order], f[order])
        else:
            self.chunks[image] = (all_rows[order], None)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Features (M, D) float32 of sorted unique ``keys``."""
        imgs, rows = decode_keys(keys)
        # Keys are sorted, so each image's rows form one contiguous run.
        bounds = np.flatnonzero(np.diff(imgs)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(keys)]])
        parts = []
        for s, e in zip(starts, ends):
            img = int(imgs[s])
            r = rows[s:e]
            if self.fetch is not None and img >= 0:
                parts.append(np.asarray(self.fetch(img, r), np.float32))
            else:
                c_rows, c_f = self.chunks[img]
                parts.append(c_f[np.searchsorted(c_rows, r)])
        return np.concatenate(parts, axis=0)

    def retain(self, live_keys: np.ndarray) -> None:
        """Drop rows whose keys are not in sorted ``live_keys``."""
        imgs, rows = decode_keys(live_keys)
        for img in list(self.chunks):
            c_rows, c_f = self.chunks[img]
            lo, hi = np.searchsorted(imgs, [img, img + 1])
            keep = np.isin(c_rows, rows[lo:hi])
            if not keep.any():
                del self.chunks[img]
            elif not keep.all():
                self.chunks[img] = (c_rows[keep],
                                    None if c_f is None else c_f[keep])


@dataclasses.dataclass
class MiningResult:
    """Output of :func:`mine_hard_negatives`.

    Attributes:
      weights: (K, D) float32; biases: (K,) float32 (score = x @ w.T + b).
      pos_keys, neg_keys: per class, sorted int64 keys (see
        :func:`encode_keys`) of the cached positives / negatives after the
        final retrain and eviction.
      history: one dict per solver call: pass, image (0-based index of the
        image after which it ran, -1 = final), classes, n_pos, n_neg (per
        retrained class, before eviction), evicted, epochs, rel_gap,
        objective, seconds.
    """

    weights: np.ndarray
    biases: np.ndarray
    pos_keys: list
    neg_keys: list
    history: list


def mine_hard_negatives(
    images,
    *,
    positives=None,
    fetch: Callable[[int, np.ndarray], np.ndarray] | None = None,
    C: float = DEFAULT_C,
    pos_weight: float = DEFAULT_POS_WEIGHT,
    neg_weight: float = 1.0,
    bias_value: float = DEFAULT_BIAS_VALUE,
    hard_thresh: float = HARD_THRESH,
    evict_thresh: float = EVICT_THRESH,
    retrain_every: int = RETRAIN_EVERY,
    passes: int = 1,
    retrain_after_first: bool = True,
    solver_kwargs: dict[str, Any] | None = None,
    keep_models: bool = False,
    log: Callable[[str], None] | None = None,
) -> MiningResult:
    """Train K linear SVMs with R-CNN / SPP-net hard-negative mining.

    Args:
      images: iterable of per-image ``(features, labels)``: features
        (n_i, D) float, labels (K, n_i) int with +1 = positive for that
        class, -1 = candidate negative, 0 = ignore.  Images are numbered
        0, 1, ... in iteration order (the numbering must be the same in
        every pass).  For ``passes > 1`` pass a callable returning a fresh
        iterable.
      positives: optional ``(X_pos (P, D), Y_pos (K, P))`` collected before
        mining, as R-CNN does (all ground-truth boxes first); Y_pos > 0 marks
        a positive of that class.  When given, +1 labels in ``images`` are
        ignored.  When None, every +1 row joins its class's positive cache
        when its image is visited (positives are never evicted).
      fetch: optional ``fetch(image_index, rows) -> (len(rows), D)`` to
        re-read cached rows' features at retrain time (then only keys are
        cached in memory).  Default: cached rows' features are kept.
      C, pos_weight, neg_weight, bias_value: SVM settings (see
        :func:`train_linear_svms`).
      hard_thresh: a candidate negative is hard, and joins its class's cache
        if not already there, when its score > hard_thresh (-1.0001).
      evict_thresh: after each retrain, cached negatives scoring below it
        (-1.2) are evicted.
      retrain_every: a class is retrained after the image at which more
        than this many new negatives have joined *its* cache since its last
        retrain (per class, as in the released R-CNN code).  Classes that
        trigger at the same image are solved together in one batched call
        over the union of their caches when the caches overlap enough
        (|union| * padded class count <= 2 * sum of cache sizes), else one
        call per class.
      passes: passes over the images (1 = the released setting).
      retrain_after_first: retrain every class after the first image (R-CNN
        "first_time").  The initial model is w = 0, b = 0: every candidate
        scores 0 > hard_thresh, so all negatives of the first image are
        cached, exactly like R-CNN's first_time branch.
      solver_kwargs: extra arguments for :func:`train_linear_svms` (tol,
        max_epochs, block_size, ...).  Retrains are warm-started from the
        previous dual variables (evicted rows have alpha = 0 at the
        optimum, new rows start at 0), so w carries over.
      keep_models: store each retrain's (weights, biases) of all K classes
        in its history record (for inspection / tests).
      log: optional callable receiving one progress line per retrain.

    After the last image of the last pass every class is retrained once more
    (warm-started, so classes without new negatives cost ~nothing) and easy
    negatives are evicted again.
    """
    if passes > 1 and not callable(images):
        raise ValueError("passes > 1 needs a callable returning the images")
    miner = _Miner(_MiningSettings(C, pos_weight, neg_weight, bias_value, hard_thresh, evict_thresh,
                                   retrain_every, dict(solver_kwargs or {}), keep_models, log),
                   _FeatureStore(fetch))
    if positives is not None:
        miner.add_positives(np.asarray(positives[0], np.float32), np.asarray(positives[1]))
    first = True
    for pass_i in range(passes):
        it = images() if callable(images) else images
        for image_i, (feats, labels) in enumerate(it):
            feats, labels = np.asarray(feats, np.float32), np.asarray(labels)
            if miner.caches is None:
                miner.caches = _Caches(labels.shape[0], feats.shape[1])
            if feats.shape[0] == 0:
                continue
            miner.visit(image_i, feats, labels, collect_positives=positives is None)
            c = miner.caches
            due = [j for j in range(c.K) if (first and retrain_after_first) or c.added[j] > retrain_every]
            first = False
            if due:
                miner.retrain(due, pass_i, image_i)
    if miner.caches is None:
        raise ValueError("no images")
    c = miner.caches
    miner.retrain(list(range(c.K)), passes - 1, -1)
    return MiningResult(weights=c.W, biases=c.b, pos_keys=[k.copy() for k in c.pos],
                        neg_keys=[k.copy() for k in c.neg], history=miner.history)


@dataclasses.dataclass(frozen=True)
class _MiningSettings:
    """The SVM and mining settings of :func:`mine_hard_negatives` (see its arguments)."""

    C: float
    pos_weight: float
    neg_weight: float
    bias_value: float
    hard_thresh: float
    evict_thresh: float
    retrain_every: int
    solver_kwargs: dict
    keep_models: bool
    log: Callable[[str], None] | None


class _Caches:
    """The K classes' models and caches: per class, sorted row keys of its positives and
    cached negatives with their dual variables, and how many negatives joined since its
    last retrain."""

    def __init__(self, k: int, d: int):
        self.K, self.D = k, d
        self.W, self.b = np.zeros((k, d), np.float32), np.zeros(k, np.float32)
        self.pos = [np.empty(0, np.int64) for _ in range(k)]
        self.neg = [np.empty(0, np.int64) for _ in range(k)]
        self.pos_a = [np.empty(0, np.float32) for _ in range(k)]
        self.neg_a = [np.empty(0, np.float32) for _ in range(k)]
        self.added = np.zeros(k, np.int64)

    def keys_of(self, classes) -> np.ndarray:
        """The sorted union of the classes' positive and negative keys."""
        return np.unique(np.concatenate([self.pos[j] for j in classes] + [self.neg[j] for j in classes]))


def _merge(keys, alphas, new_keys):
    """Insert new keys (alpha 0) into a sorted cache, keeping it sorted; also the count added."""
    new_keys = new_keys[~np.isin(new_keys, keys)]
    all_k = np.concatenate([keys, new_keys])
    all_a = np.concatenate([alphas, np.zeros(len(new_keys), np.float32)])
    order = np.argsort(all_k, kind="stable")
    return all_k[order], all_a[order], len(new_keys)


class _Miner:
    """One mining run: the caches, the feature store, and the history of retrains."""

    def __init__(self, settings: _MiningSettings, store: _FeatureStore):
        self.s, self.store = settings, store
        self.caches: _Caches | None = None
        self.history: list[dict] = []

    def add_positives(self, Xp: np.ndarray, Yp: np.ndarray) -> None:
        """Positives collected before mining (R-CNN: all ground-truth boxes first)."""
        self.caches = c = _Caches(Yp.shape[0], Xp.shape[1])
        self.store.chunks[-1] = (np.arange(Xp.shape[0], dtype=np.int64), Xp)
        for j in range(c.K):
            c.pos[j] = encode_keys(-1, np.flatnonzero(Yp[j] > 0))
            c.pos_a[j] = np.zeros(len(c.pos[j]), np.float32)

    def visit(self, image_i: int, feats: np.ndarray, labels: np.ndarray, collect_positives: bool) -> None:
        """Cache the image's hard negatives (and its positives unless given up front)."""
        c, new_rows = self.caches, []
        scores = feats @ c.W.T + c.b[None, :]  # (n_i, K)
        for j in range(c.K):
            cand = np.flatnonzero((labels[j] < 0) & (scores[:, j] > self.s.hard_thresh))
            if cand.size:
                c.neg[j], c.neg_a[j], n_new = _merge(c.neg[j], c.neg_a[j], encode_keys(image_i, cand))
                c.added[j] += n_new
                new_rows.append(cand)
            pos = np.flatnonzero(labels[j] > 0) if collect_positives else np.empty(0, np.int64)
            if pos.size:
                c.pos[j], c.pos_a[j], _ = _merge(c.pos[j], c.pos_a[j], encode_keys(image_i, pos))
                new_rows.append(pos)
        if new_rows:
            self.store.add(image_i, np.concatenate(new_rows), feats)

    def retrain(self, classes, pass_i: int, image_i: int) -> None:
        """Retrain ``classes`` (those with cached negatives), evict easy negatives, log."""
        t0, c = time.perf_counter(), self.caches
        classes = [j for j in classes if len(c.neg[j]) > 0]
        if not classes:
            return
        # Classes share one solve (X is the union of their caches) only when their caches
        # overlap enough: the batched solve costs ~ |union| * (padded class count),
        # separate solves ~ the sum of the cache sizes.
        sizes = [len(c.pos[j]) + len(c.neg[j]) for j in classes]
        kp = 1 << (len(classes) - 1).bit_length()
        groups = [classes] if len(c.keys_of(classes)) * kp <= 2 * sum(sizes) else [[j] for j in classes]
        rec = dict(pass_=pass_i, image=image_i, classes=list(classes),
                   n_added={j: int(c.added[j]) for j in classes},
                   n_pos={}, n_neg={}, evicted={}, rel_gap={}, objective={}, epochs=[])
        for g in groups:
            self._solve_group(g, rec)
        for f in ("n_added", "n_pos", "n_neg", "evicted", "rel_gap", "objective"):
            rec[f] = [rec[f][j] for j in classes]  # per-class lists in the order of rec["classes"]
        rec["rel_gap"], rec["objective"] = np.asarray(rec["rel_gap"]), np.asarray(rec["objective"])
        if self.s.keep_models:
            rec["weights"], rec["biases"] = c.W.copy(), c.b.copy()
        self.store.retain(np.unique(np.concatenate(c.pos + c.neg)))
        rec["seconds"] = time.perf_counter() - t0
        self.history.append(rec)
        if self.s.log is not None:
            self.s.log(f"pass {pass_i} image {image_i}: retrained {len(classes)} classes in "
                       f"{len(groups)} solve(s), cache neg {sum(rec['n_neg'])}, evicted "
                       f"{sum(rec['evicted'])}, epochs {max(rec['epochs'])}, max rel gap "
                       f"{rec['rel_gap'].max():.2e}, {rec['seconds']:.1f} s")

    def _solve_group(self, classes, rec: dict) -> None:
        """One batched solve for ``classes`` over the union of their caches; updates the
        models and dual variables and evicts easy negatives."""
        c, s = self.caches, self.s
        keys = c.keys_of(classes)
        X = self.store.get(keys)
        kp = 1 << (len(classes) - 1).bit_length()  # padded to a power of two: few compiled shapes
        Y = np.zeros((kp, len(keys)), np.int8)
        A = np.zeros((kp, len(keys)), np.float32)
        idx = {}
        for r, j in enumerate(classes):
            ip, ineg = np.searchsorted(keys, c.pos[j]), np.searchsorted(keys, c.neg[j])
            Y[r, ip], Y[r, ineg] = 1, -1
            A[r, ip], A[r, ineg] = c.pos_a[j], c.neg_a[j]
            idx[j] = (ip, ineg)
        res = train_linear_svms(X, Y, C=s.C, pos_weight=s.pos_weight, neg_weight=s.neg_weight,
                                bias_value=s.bias_value, alpha0=A, **s.solver_kwargs)
        rec["epochs"].append(res.epochs)
        for r, j in enumerate(classes):
            ip, ineg = idx[j]
            c.W[j], c.b[j] = res.weights[r], res.biases[r]
            c.pos_a[j] = res.alpha[r, ip]
            keep = res.scores[r, ineg] >= s.evict_thresh
            rec["n_pos"][j], rec["n_neg"][j] = len(ip), len(ineg)
            rec["evicted"][j] = int((~keep).sum())
            rec["rel_gap"][j], rec["objective"][j] = res.rel_gap[r], res.objective[r]
            c.neg[j], c.neg_a[j] = c.neg[j][keep], res.alpha[r, ineg][keep]
            c.added[j] = 0

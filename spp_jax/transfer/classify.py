"""Linear SVMs on transfer features, and the paper's metrics.

* Features are L2-normalised per image (:func:`spp_jax.svm.l2_normalize`);
  one linear SVM per class (hinge loss, L2 regularisation, a regularised bias
  feature of value 1) trained with the project's batched solver
  (:func:`spp_jax.svm.train_linear_svms`), positives and negatives weighted
  equally.
* VOC 2007 classification: per class, the test images ranked by SVM score;
  AP is the devkit's 11-point interpolated AP (``VOCevalcls``): images
  labelled 0 ("difficult only") are neither true nor false positives;
  mAP is the mean over classes.
* Caltech101: per random split, ``train_per_class`` (30) training images per
  class and up to ``test_per_class`` (50) of the remaining ones for testing;
  one-vs-rest SVMs, the predicted class is the highest score; accuracy is the
  mean of the per-class accuracies (the usual Caltech101 measure, as test
  classes have different sizes); reported as mean +- std over splits.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spp_jax.errors import InputError
from spp_jax.voc_ap import voc_ap_11point
from spp_jax.svm import l2_normalize, train_linear_svms

DEFAULT_C = 1.0
# Solver stopping rule for transfer SVMs: duality gap <= 1 % of the primal objective
# (liblinear's default eps, 0.1, is looser), at most 300 epochs.  Conv features are
# nearly separable and need > 1000 epochs for 0.1 %, without changing the rankings.
SOLVER_DEFAULTS = dict(tol=1e-2, max_epochs=300)


# ---- SVMs ---------------------------------------------------------------------------------


@dataclasses.dataclass
class LinearModels:
    weights: np.ndarray  # (K, D)
    biases: np.ndarray   # (K,)
    converged: bool

    def scores(self, X: np.ndarray) -> np.ndarray:
        """(N, D) raw features -> (N, K) scores (features are L2-normalised first)."""
        return l2_normalize(X) @ self.weights.T + self.biases[None, :]


def row_space_basis(X: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """(D, r) orthonormal basis Q of the span of the rows of X (N, D), r <= N.

    From the eigen-decomposition of the Gram matrix X X^T = U L U^T (float32
    product, float64 eigh): Q = X^T U L^{-1/2}, dropping eigenvalues below
    ``rtol`` x the largest (directions the data barely spans).
    """
    X = np.asarray(X, np.float32)
    lam, U = np.linalg.eigh((X @ X.T).astype(np.float64))
    keep = lam > rtol * max(float(lam.max()), 1e-300)
    return (X.T @ (U[:, keep] / np.sqrt(lam[keep])).astype(np.float32)).astype(np.float32)


def train_svms(X: np.ndarray, Y: np.ndarray, C: float = DEFAULT_C, **solver_kwargs) -> LinearModels:
    """One linear SVM per class on L2-normalised features.

    X: (N, D) raw features; Y: (K, N) in {+1, -1, 0} (0: not used for that class).

    When D > N (conv features: 10^4-10^5 dims, a few hundred images) the
    problem is solved exactly in the row space of the training features: the
    optimal w is a combination of training rows (representer theorem; the
    bias is a separate feature), so with an orthonormal basis Q of that space
    the SVM on X Q (N x r) has the same objective, and w = Q w'.  This makes
    each solver epoch cost O(N^2 K) instead of O(N D K).
    """
    Xn = l2_normalize(X)
    Q = row_space_basis(Xn) if Xn.shape[1] > Xn.shape[0] else None
    Z = Xn @ Q if Q is not None else Xn
    res = train_linear_svms(Z, np.asarray(Y), C=C, pos_weight=1.0, bias_value=1.0,
                            **{**SOLVER_DEFAULTS, **solver_kwargs})
    weights = res.weights @ Q.T if Q is not None else res.weights
    return LinearModels(weights, res.biases, res.converged)


def one_vs_rest(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) class ids -> (K, N) int8 +1 / -1 labels."""
    y = -np.ones((num_classes, len(labels)), np.int8)
    y[np.asarray(labels), np.arange(len(labels))] = 1
    return y


# ---- VOC classification AP ----------------------------------------------------------------


def voc_cls_ap(scores, gt) -> float:
    """VOC 2007 classification AP of one class (11-point interpolated).

    scores: (N,) confidence per test image; gt: (N,) +1 present, -1 absent,
    0 ignored.  Images are ranked by descending score (stable: ties keep the
    input order, like the devkit's MATLAB ``sort``); precision and recall after
    each image count true (+1) and false (-1) positives only.  NaN if the class
    has no positive image.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    gt = np.asarray(gt).reshape(-1)
    if scores.shape != gt.shape:
        raise ValueError(f"scores {scores.shape} and labels {gt.shape} differ")
    npos = int(np.sum(gt > 0))
    if npos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(gt[order] > 0)
    fp = np.cumsum(gt[order] < 0)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).tiny)
    return voc_ap_11point(recall, precision)


def voc_cls_map(scores: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, float]:
    """(N, K) scores and (N, K) labels -> (per-class AP (K,), mAP over classes with positives)."""
    scores, gt = np.asarray(scores), np.asarray(gt)
    ap = np.array([voc_cls_ap(scores[:, k], gt[:, k]) for k in range(gt.shape[1])])
    return ap, float(np.nanmean(ap)) if np.any(np.isfinite(ap)) else float("nan")


def voc_classification(X_train, Y_train, X_test, Y_test, C: float = DEFAULT_C, **solver_kwargs) -> dict:
    """SVMs on trainval features, AP on test.  Y_*: (N, K) in {+1, -1, 0}.

    Returns ``{"ap": (K,) per-class AP, "map": mAP, "converged": bool}`` (AP in [0, 1]).
    """
    models = train_svms(X_train, np.asarray(Y_train).T, C, **solver_kwargs)
    ap, m = voc_cls_map(models.scores(X_test), Y_test)
    return {"ap": ap, "map": m, "converged": models.converged}


# ---- Caltech101 splits and accuracy -------------------------------------------------------


def sample_split(labels, num_classes: int, train_per_class: int = 30, test_per_class: int = 50,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One Caltech101-style random split of a labelled pool.

    For every class: ``train_per_class`` images drawn at random for training,
    and up to ``test_per_class`` of the remaining ones for testing.  The draw
    depends only on (labels, seed, class), so it is reproducible.  Raises if a
    class has no image left for testing (InputError, a ValueError).

    Returns sorted (train indices, test indices) into the pool.
    """
    labels = np.asarray(labels).reshape(-1)
    short = [c for c in range(num_classes) if np.sum(labels == c) < train_per_class + 1]
    if short:
        counts = {c: int(np.sum(labels == c)) for c in short[:10]}
        raise InputError(f"classes {short[:10]}{'...' if len(short) > 10 else ''} have fewer than "
                         f"{train_per_class + 1} images ({counts}): need {train_per_class} for training "
                         "and at least one for testing; use a larger pool (pool_size) or fewer training "
                         "images per class (train_per_class)")
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        perm = np.random.default_rng([seed, c]).permutation(idx)
        train.append(perm[:train_per_class])
        test.append(perm[train_per_class:train_per_class + test_per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def mean_class_accuracy(pred, labels, num_classes: int) -> float:
    """Mean over classes (present in ``labels``) of the fraction predicted correctly."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    accs = [np.mean(pred[labels == c] == c) for c in range(num_classes) if np.any(labels == c)]
    return float(np.mean(accs))


def caltech_classification(X, labels, num_classes: int, *, splits: int = 5, train_per_class: int = 30,
                           test_per_class: int = 50, seed: int = 0, C: float = DEFAULT_C,
                           split_indices=None, **solver_kwargs) -> dict:
    """Accuracy over ``splits`` random splits of a pool with features X (N, D).

    Split ``s`` is ``sample_split(labels, ..., seed + s)`` unless ``split_indices``
    gives the (train, test) index pairs into X explicitly.
    Returns ``{"accuracy": [per split], "mean", "std", "overall": [per split plain accuracy]}``
    (fractions in [0, 1]).
    """
    labels = np.asarray(labels)
    if split_indices is None:
        split_indices = [sample_split(labels, num_classes, train_per_class, test_per_class, seed + s)
                         for s in range(splits)]
    accs, overall = [], []
    for tr, te in split_indices:
        models = train_svms(X[tr], one_vs_rest(labels[tr], num_classes), C, **solver_kwargs)
        pred = np.argmax(models.scores(X[te]), axis=1)
        accs.append(mean_class_accuracy(pred, labels[te], num_classes))
        overall.append(float(np.mean(pred == labels[te])))
    return {"accuracy": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
            "overall": overall}

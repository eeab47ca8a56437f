"""Drift and degradation checks for one production batch, on arrays (the statistics of the ``drift_eval`` stage).

A production batch's SSL embeddings and classifier probabilities (and its labels, when it has them) are
compared with a :class:`Reference` built from held-out arrays (:func:`evaluate_batch`), and every monitored
metric is reported with its threshold and the pipeline stage that owns it. Nothing here reads or writes a
file: the stage runner :mod:`sslvision.stages.drift_eval` loads the batch, the models and the reference
data and writes the report. :func:`detect_drift` is the input-drift test alone, on two arrays of
embeddings. The trigger (``sslvision.trigger.decide``) re-runs from the EARLIEST
stage that owns a failed metric, so each rule below only has to say what it measures:

================================  ==========  ====================================================
metric (``trigger.json``)         owner       fails when
================================  ==========  ====================================================
``embedding_mmd_pvalue``          pretrain    MMD permutation p-value on SSL embeddings < ``alpha``,
                                              against held-out images at the batch's estimated prior
``label_noise_rate``              audit       (labeled batch) estimated share of wrong labels > max
``tail_class_recall_drop``        synthesize  (labeled batch) worst rare-class recall fall > max
``accuracy``                      finetune    accuracy (true if labeled, else estimated) below the
                                              held-out accuracy at the batch's class mix by more
                                              than ``accuracy_drop_max``
``class_prior_shift_pvalue``      prior_      chi-square test of the predicted-class counts against
                                  correction  held-out images at the prior the classifier is set for:
                                              p-value < ``prediction_shift_alpha``
================================  ==========  ====================================================

``direction`` says which way is good, as the trigger reads it: ``"max"`` (higher is better: fails below
the threshold) or ``"min"`` (lower is better: fails above it). A metric that cannot be computed for
this batch (the labeled-only ones on an unlabeled batch) has ``value: null`` and ``failed: false``.
``prior_correction`` is an action, not a stage (:mod:`sslvision.trigger`): a class mix that changed and
nothing else corrects the champion's prior; only what the estimated prior cannot explain retrains.

The methods:

- **Class prior without labels** (:func:`estimate_class_prior`): BBSE (Lipton et al. 2018: the
  held-out confusion matrix inverted on the batch's predicted-class shares) or EM (Saerens et al. 2002,
  on probabilities bias-calibrated on the held-out split). Every later test is made *given* it.
- **Input drift**: the unbiased squared maximum mean discrepancy (MMD², Gretton et al. 2012) between
  the batch's SSL embeddings and held-out ``test`` split embeddings re-sampled without repeats to the
  batch's estimated class prior (:func:`resample_to_prior`), with a Gaussian kernel whose bandwidth is
  the median pairwise distance of the pooled sample (the median heuristic; ``bandwidths`` multiplies it
  and sums kernels for a multi-scale test). The p-value comes from a permutation test: the kernel matrix
  is computed once, and a chunk of permutations costs one matrix product with their 0/1 membership rows.
- **Class-prior shift**: the classifier's predicted classes on the batch against the same on test images
  re-sampled to the deployed prior (the prior correction the classifier carries, else its training
  labels'), per class: a chi-square test of homogeneity on the 2 x classes table of counts, and the
  total variation as the effect size.
- **Accuracy without labels**: average thresholded confidence (ATC, Garg et al. 2022) with its
  threshold fitted on the clean labeled test sample re-weighted to the batch's estimated prior
  (:func:`atc_threshold_at_prior`), compared with the test split's per-class recall weighted by the
  same prior (:func:`accuracy_at_prior`): a balanced batch is judged against what a balanced batch
  can reach. With labels, the accuracy against the given labels (and the estimate's error) and the
  per-class recall are used.
- **Label noise** (labeled batch): cleanlab's confident-learning count of label issues
  (``cleanlab.count.num_label_issues``) on the classifier's probabilities, which are out-of-sample
  for a batch the classifier never trained on.
- **Thresholds that can be met** (:func:`threshold_checks`): each threshold is checked against its
  clean floor, the ``floor_quantile`` of the statistic over clean batches of the batch's size drawn
  from the held-out sample; one below it is raised to it, and the warning is logged and written
  (``threshold_warnings``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from sslvision.metrics import per_class_recall
from sslvision.params import Section, Seed
from sslvision.trigger import PRIOR_CORRECTION


class DriftParams(Section):
    """The ``drift_eval`` stage: compare a production batch with the training reference; every monitored metric
    has a threshold and the stage that owns it (written to reports/drift/trigger.json; the trigger re-runs from
    the earliest stage whose metric failed). ``sslvision drift-eval BATCH`` evaluates another batch."""

    batch: str = Field("data/demo/incoming/clean_01", description=(
        "production batch directory (flat images = unlabeled, class subdirectories = labeled) or an ingested "
        'directory with images.npy; "" = none (the stage says so in trigger.json)'))
    ingested: str = Field("data/ingested", description=(
        "the training data: reference (train split) and calibration (test split) images"))
    embeddings: str = Field("data/embeddings", description=(
        "reference SSL embeddings written by pretrain (same encoder as `encoder`)"))
    encoder: str = Field("models/encoder", description="embeds the batch")
    classifier: str = Field("models/classifier", description="predicts the batch (calibrated probabilities)")
    reference_size: int = Field(2000, ge=10, le=10_000_000, description=(
        "at most this many held-out test images the batch's embeddings are compared with, re-sampled (no "
        "repeats) to the batch's estimated class prior so a new class mix alone is not input drift; the MMD "
        "kernel matrix is (reference_size + batch)^2"))
    calibration_size: int = Field(2000, ge=10, le=10_000_000, description=(
        "clean test images that calibrate the prior estimator and ATC, give the per-class recall, and make the "
        "clean batches every threshold is checked against"))
    alpha: float = Field(0.01, gt=0, lt=1, description=(
        "[pretrain] embedding drift fails when the MMD permutation p-value < alpha; this is the false-positive "
        "rate on clean batches (lower = fewer needless pretrain re-runs, less power on mild corruptions)"))
    permutations: int = Field(500, ge=20, le=1_000_000, description=(
        "permutations of the MMD test; the smallest p-value is 1/(permutations+1), so keep permutations >= "
        "5/alpha"))
    bandwidths: list[float] = Field(default_factory=lambda: [1.0], min_length=1, max_length=100, description=(
        "Gaussian kernel widths as multiples of the median pairwise distance (median heuristic); several values "
        "sum kernels (multi-scale), e.g. [0.5, 1, 2]"))
    label_noise_max: float = Field(0.15, gt=0, lt=1, description=(
        "[audit] a labeled batch fails when cleanlab estimates more than this share of wrong labels. cleanlab "
        "counts some clean labels as issues: below its clean floor (see floor_quantile) the threshold is raised "
        "to it"))
    rare_class_share: float = Field(0.1, gt=0, le=1, description=(
        "rare classes: fewer train images than this share of the largest class"))
    rare_min_count: int = Field(5, ge=1, le=1_000_000, description=(
        "a rare class's recall is judged only with at least this many labeled images"))
    tail_recall_drop_max: float = Field(0.2, gt=0, le=1, description=(
        "[synthesize] a labeled batch fails when a rare class's recall is this much below its recall on the clean "
        "test split (small counts: keep it generous)"))
    accuracy_drop_max: float = Field(0.05, gt=0, le=1, description=(
        "[finetune] fails when the accuracy (true with labels, else ATC with its threshold fitted on test images "
        "re-weighted to the estimated prior) is this much below the test split's per-class recall weighted by "
        "the same prior: a balanced batch is judged against the accuracy a balanced batch can reach, not a "
        "head-heavy one"))
    prediction_shift_alpha: float = Field(0.01, gt=0, lt=1, description=(
        "[prior_correction] the class mix changed when a chi-square test finds the batch's predicted-class counts "
        "differ, at this level, from test images re-sampled to the prior the champion is set for; alone, the "
        "champion's logits are corrected for the estimated prior (a new registered version, gated): no "
        "retraining"))
    prior_method: Literal["bbse_soft", "bbse", "em"] = Field("bbse_soft", description=(
        "class prior of a batch without labels: bbse_soft (black-box shift estimation with the expected "
        "bias-calibrated probabilities in place of hard predictions: linear like bbse, so no runaway, and the "
        "lowest error on the demo: benchmarks/README.md, drift) | bbse (Lipton et al. 2018: the test split's "
        "confusion matrix of the predicted classes) | em (Saerens et al. 2002 on bias-calibrated probabilities: "
        "runs off to a corner when the probabilities stop being calibrated)"))
    prior_fallback_tv: float = Field(0.1, gt=0, le=1, description=(
        "bbse_soft: when its estimate and hard bbse's differ by more than this total variation, the batch's "
        "probabilities do not behave as under a pure class-mix change (a corruption, a miscalibrated model) and "
        "hard bbse, which uses only the predicted classes, is used (trigger.json class_prior.method says which); "
        "on the demo's clean and label-shift batches the two differed by at most 0.065"))
    floor_batches: int = Field(200, ge=20, le=100_000, description=(
        "clean batches (of the batch's size, drawn from the calibration images at the expected class prior) that "
        "give each threshold's clean floor"))
    floor_quantile: float = Field(0.99, gt=0.5, lt=1, description=(
        "the clean floor is this quantile; a threshold below it would fail clean batches, so it is raised to it "
        "and reported (trigger.json threshold_checks/_warnings)"))
    batch_size: int = Field(256, gt=0, le=65536, description="images per forward pass")
    seed: Seed = Field(0, description="reference/calibration samples and permutations")


# --- input drift: MMD with a permutation test ------------------------------------------------------


@dataclass
class MMDResult:
    """The observed unbiased MMD², its permutation null, the p-value and the critical value at alpha."""

    statistic: float
    p_value: float
    critical_value: float
    null: np.ndarray
    bandwidth: float


def gaussian_kernel_matrix(z: torch.Tensor, bandwidths: list[float]) -> tuple[torch.Tensor, float]:
    """Sum of Gaussian kernels ``exp(-d² / (2 (s·h)²))`` over the scales ``s``, ``h`` = median pairwise
    distance of ``z`` (the median heuristic); returns the matrix and ``h``."""
    d2 = torch.cdist(z, z).pow_(2)
    off_diagonal = d2[~torch.eye(len(z), dtype=torch.bool)]
    h2 = float(off_diagonal.median())
    if not h2 > 0:
        raise ValueError("MMD: every embedding is identical (median pairwise distance 0); is the encoder collapsed?")
    k = torch.zeros_like(d2)
    for s in bandwidths:
        k += torch.exp(-d2 / (2 * s * s * h2))
    return k, h2**0.5


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = 500, alpha: float = 0.01,
                         bandwidths: list[float] | None = None, seed: int = 0, chunk: int = 64) -> MMDResult:
    """Two-sample test of ``x`` (reference, ``(m, D)``) against ``y`` (batch, ``(n, D)``) with unbiased MMD².

    For a split of the pooled sample into groups a (size m) and b (size n), with the kernel matrix K whose
    diagonal is zeroed: ``MMD² = Σ_aa K/(m(m-1)) + Σ_bb K/(n(n-1)) - 2 Σ_ab K/(mn)``. Each permutation
    is a 0/1 membership row ``a``; ``a K`` for a chunk of permutations is one matrix product, from which
    ``Σ_aa = a·(aK)`` and ``Σ_ab = (1-a)·(aK)``, and ``Σ_bb`` follows from the total.
    The p-value counts the observed split as one of the permutations, so it is never 0.
    """
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side, got {m} reference and {n} batch")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"MMD: reference embeddings {x.shape} and batch embeddings {y.shape} differ in dimension")
    z = torch.from_numpy(np.concatenate([x, y]).astype(np.float64))
    k, bandwidth = gaussian_kernel_matrix(z, bandwidths or [1.0])
    k.fill_diagonal_(0.0)
    total = float(k.sum())
    gen = torch.Generator().manual_seed(seed)

    def mmd2(members: torch.Tensor) -> torch.Tensor:
        ak = members @ k
        s_aa = (ak * members).sum(1)
        s_ab = (ak * (1 - members)).sum(1)
        s_bb = total - s_aa - 2 * s_ab
        return s_aa / (m * (m - 1)) + s_bb / (n * (n - 1)) - 2 * s_ab / (m * n)

    observed = torch.zeros(1, m + n, dtype=k.dtype)
    observed[0, :m] = 1
    stat = float(mmd2(observed)[0])
    null = []
    for start in range(0, permutations, chunk):
        rows = min(chunk, permutations - start)
        order = torch.argsort(torch.rand(rows, m + n, generator=gen), dim=1)
        members = torch.zeros(rows, m + n, dtype=k.dtype)
        members.scatter_(1, order[:, :m], 1.0)
        null.append(mmd2(members))
    null_t = torch.cat(null).numpy()
    p_value = float((1 + np.sum(null_t >= stat)) / (1 + permutations))
    return MMDResult(statistic=stat, p_value=p_value, critical_value=float(np.quantile(null_t, 1 - alpha)),
                     null=null_t, bandwidth=bandwidth)


@dataclass
class DriftResult:
    """:func:`detect_drift`'s verdict. ``drifted``: ``p_value < alpha``. ``statistic``: the observed unbiased
    MMD²; ``critical_value``: the ``1 - alpha`` quantile of its permutation null (``null``, one value per
    permutation); ``bandwidth``: the Gaussian kernel's bandwidth (the median heuristic's)."""

    drifted: bool
    p_value: float
    statistic: float
    alpha: float
    critical_value: float
    bandwidth: float
    permutations: int
    null: np.ndarray = field(repr=False)


def detect_drift(reference: np.ndarray, batch: np.ndarray, *, permutations: int = 500, alpha: float = 0.01,
                 seed: int = 0, bandwidths: list[float] | None = None) -> DriftResult:
    """Whether ``batch`` comes from another distribution than ``reference``: the MMD² permutation test
    (:func:`mmd_permutation_test`) on two samples of embeddings (e.g. ``sslvision.embed``'s output).

    Args: ``reference`` ``(m, D)`` and ``batch`` ``(n, D)``: finite float arrays, at least 2 rows each;
    ``permutations``: size of the permutation null (the smallest p-value is ``1 / (1 + permutations)``);
    ``alpha``: the test's level; ``seed``: the permutations' seed (the same arrays and seed give the same
    result); ``bandwidths``: multiples of the median-heuristic bandwidth, one Gaussian kernel each
    (default ``[1.0]``). Time and memory grow with ``(m + n)²``: sub-sample large arrays.

    Returns a :class:`DriftResult`. Raises ValueError for arrays that are not 2-D, finite and of the same
    width, an ``alpha`` outside (0, 1), too few permutations to ever reach ``alpha``, or embeddings that
    are all identical.
    """
    x, y = np.asarray(reference), np.asarray(batch)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"detect_drift: expected 2-D embeddings (rows, dims), got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("detect_drift: the embeddings contain NaN or infinite values")
    if not 0 < alpha < 1:
        raise ValueError(f"detect_drift: alpha must be in (0, 1), got {alpha}")
    if permutations < 1 or 1 / (1 + permutations) >= alpha:
        raise ValueError(f"detect_drift: {permutations} permutations can never give a p-value below alpha {alpha}; "
                         f"use more than {int(np.ceil(1 / alpha)) - 1}")
    r = mmd_permutation_test(x, y, permutations, alpha, bandwidths, seed)
    return DriftResult(drifted=r.p_value < alpha, p_value=r.p_value, statistic=r.statistic, alpha=alpha,
                       critical_value=r.critical_value, bandwidth=r.bandwidth, permutations=permutations, null=r.null)


# --- prediction shift, accuracy estimation, label noise --------------------------------------------


def prediction_shift(reference_counts: np.ndarray, batch: np.ndarray) -> dict[str, Any]:
    """Predicted-class distributions of the reference (its per-class counts) and of the batch (its
    predicted class indices): total variation, per-class shares, and the p-value of a chi-square test of
    homogeneity on the 2 x classes count table (classes neither sample predicts are left out)."""
    from scipy.stats import chi2_contingency

    reference_counts = np.asarray(reference_counts, dtype=np.int64)
    counts = np.bincount(batch, minlength=len(reference_counts))
    table = np.stack([reference_counts, counts])
    table = table[:, table.sum(0) > 0]
    chi2, pvalue = (chi2_contingency(table)[:2] if table.shape[1] > 1 else (0.0, 1.0))
    ref, q = reference_counts / max(reference_counts.sum(), 1), counts / max(counts.sum(), 1)
    return {"tv": float(0.5 * np.abs(q - ref).sum()), "batch": q, "reference": ref, "chi2": float(chi2),
            "pvalue": float(pvalue)}


def atc_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """ATC's threshold: the confidence ``t`` such that the share of samples above ``t`` equals the
    accuracy on this labeled (source) sample."""
    accuracy = float(np.mean(correct))
    return float(np.quantile(confidence, 1.0 - accuracy))


def atc_estimate(confidence: np.ndarray, threshold: float) -> float:
    """ATC's accuracy estimate on an unlabeled sample: the share of confidences above the threshold."""
    return float(np.mean(confidence > threshold))


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``values`` where each value counts ``weights`` times (inverse of the weighted
    empirical distribution function)."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(np.asarray(weights, dtype=float)[order])
    return float(np.asarray(values)[order][min(np.searchsorted(cum, q * cum[-1]), len(cum) - 1)])


# --- label shift: the class prior of a batch, and what the classifier should score at that prior ----


@dataclass
class BiasCalibration:
    """``softmax(log p / temperature + bias)``: bias-corrected temperature scaling (BCTS, Alexandari et al.
    2020), fitted on labeled held-out probabilities whose class prior is ``source_prior``."""

    temperature: float
    bias: np.ndarray
    source_prior: np.ndarray

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        logits = np.log(np.clip(probs, 1e-12, 1.0)) / self.temperature + self.bias
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def fit_bias_calibration(probs: np.ndarray, labels: np.ndarray) -> BiasCalibration:
    """Fit BCTS on held-out ``probs`` ``(n, C)`` and their true ``labels``: the temperature and per-class
    biases minimising the negative log-likelihood. EM's prior estimate is only as good as the
    calibration of the posteriors it re-weights; a class-wise bias absorbs a classifier trained for the
    balanced error (logit adjustment) scoring a long-tailed sample, which plain temperature cannot."""
    c = probs.shape[1]
    if len(labels) != len(probs) or len(labels) == 0:
        raise ValueError(f"prior calibration: {len(probs)} probabilities and {len(labels)} labels")
    counts = np.bincount(labels, minlength=c)
    if np.any(counts == 0):
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"prior calibration: the held-out labels have no image of classes {missing}")
    from scipy.optimize import minimize

    x = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))
    onehot = np.eye(c)[labels]

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t, bias = np.exp(theta[0]), theta[1:]
        z = x / t + bias
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        residual = np.exp(z - lse[:, None]) - onehot  # d nll / d z, per row
        grad_t = np.mean(np.sum(residual * (-x / t), axis=1))
        return float(np.mean(lse - (z * onehot).sum(1))), np.concatenate([[grad_t], residual.mean(0)])

    theta = minimize(nll, np.zeros(c + 1), jac=True, method="L-BFGS-B",
                     bounds=[(np.log(0.05), np.log(20.0))] + [(-20.0, 20.0)] * c).x
    b = theta[1:]
    return BiasCalibration(float(np.exp(theta[0])), b - b.mean(), counts / counts.sum())


def _normalise(prior: np.ndarray, floor: float) -> np.ndarray:
    prior = np.clip(np.nan_to_num(np.asarray(prior, dtype=float)), floor, None)
    return prior / prior.sum()


def estimate_class_prior(probs: np.ndarray, *, reference_probs: np.ndarray | None = None,
                         reference_labels: np.ndarray | None = None, method: str = "em",
                         source_prior: np.ndarray | None = None, calibration: BiasCalibration | None = None,
                         max_iter: int = 500, tol: float = 1e-8, floor: float = 1e-4) -> np.ndarray:
    """The class prior ``q(y)`` of the sample whose classifier probabilities are ``probs`` ``(n, C)``, without
    its labels, assuming label shift (``p(x|y)`` as on the held-out reference).

    ``method="em"`` (Saerens et al. 2002): the posteriors, calibrated on the labeled held-out
    ``reference_probs``/``reference_labels`` (:func:`fit_bias_calibration`, or ``calibration`` fitted
    before), are re-weighted by ``q / p`` until ``q`` is their mean (maximum likelihood of ``q``). Without a
    reference, ``probs`` must be calibrated posteriors under ``source_prior``.
    ``method="bbse"`` (black-box shift estimation, Lipton et al. 2018): the confusion matrix ``C[i, j] =
    P(predicted i, true j)`` of the held-out reference and the batch's predicted-class shares ``mu``
    give the weights ``w = C⁻¹ mu`` (least squares, clipped at 0) and ``q = w * p``: no calibration
    needed, more variance. ``method="bbse_soft"``: the same linear system with soft predictions (``C[i, j]``
    the mean probability of class ``i`` over reference images of class ``j``, times ``P(j)``; ``mu`` the
    batch's mean probabilities), on probabilities bias-calibrated like EM's when a reference or
    ``calibration`` is given: each image contributes its whole probability vector rather than one vote, so
    the estimate varies less, and it stays a linear map of the batch (no iteration to run off). All return a
    prior clipped at ``floor`` and renormalised.

    Args: ``probs``: ``(n, C)`` probabilities (rows sum to 1); ``reference_probs``/``reference_labels``:
    ``(m, C)`` probabilities of labeled held-out images and their labels in ``[0, C)`` (BBSE needs them; EM
    fits its calibration on them unless ``calibration`` is given, and then needs every class among the
    labels); ``source_prior``: the ``(C,)`` prior ``probs`` are posteriors under (EM with neither);
    ``max_iter``/``tol``: EM's stopping rule; ``floor``: the smallest share before renormalising.

    Returns the ``(C,)`` float prior: every share positive, summing to 1.

    Raises ValueError for an unknown ``method``, ``probs`` that are not 2-D or a reference of another
    width, BBSE (either) without a labeled reference, or EM with none of a reference, ``calibration`` or
    ``source_prior``.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"estimate_class_prior: expected (n, classes) probabilities, got shape {probs.shape}")
    c = probs.shape[1]
    if reference_probs is not None and np.shape(reference_probs)[1:] != (c,):
        raise ValueError(f"estimate_class_prior: reference probabilities {np.shape(reference_probs)} do not "
                         f"have the {c} columns of probs")
    if method in ("bbse", "bbse_soft"):
        if reference_probs is None or reference_labels is None:
            raise ValueError(f"estimate_class_prior(method={method!r}) needs reference_probs and reference_labels")
        reference_probs = np.asarray(reference_probs, dtype=np.float64)
        source = np.bincount(reference_labels, minlength=c) / len(reference_labels)
        joint = np.zeros((c, c))
        if method == "bbse":
            np.add.at(joint, (reference_probs.argmax(1), reference_labels), 1.0 / len(reference_labels))
            mu = np.bincount(probs.argmax(1), minlength=c) / max(len(probs), 1)
        else:
            if calibration is None:
                calibration = fit_bias_calibration(reference_probs, reference_labels)
            reference_probs, probs = calibration(reference_probs), calibration(probs)
            np.add.at(joint.T, reference_labels, reference_probs / len(reference_labels))
            mu = probs.mean(0) if len(probs) else np.zeros(c)
        w = np.clip(np.linalg.lstsq(joint, mu, rcond=None)[0], 0, None)
        return _normalise(w * source, floor)
    if method != "em":
        raise ValueError(f"estimate_class_prior: unknown method {method!r} (bbse_soft, bbse or em)")
    if calibration is None and reference_probs is not None and reference_labels is not None:
        calibration = fit_bias_calibration(reference_probs, reference_labels)
    if calibration is not None:
        posteriors, source = calibration(probs), calibration.source_prior
    elif source_prior is not None:
        posteriors, source = probs, _normalise(source_prior, 1e-12)
    else:
        raise ValueError("estimate_class_prior(method='em') needs a labeled reference, a calibration or source_prior")
    q = source.copy()
    for _ in range(max_iter):
        weighted = posteriors * (q / source)
        new = (weighted / weighted.sum(1, keepdims=True)).mean(0)
        if np.abs(new - q).max() < tol:
            q = new
            break
        q = new
    return _normalise(q, floor)


def prior_adjustment(calibration: BiasCalibration, prior: np.ndarray, bound: float = 10.0) -> np.ndarray:
    """The vector added to a classifier's (temperature-scaled) logits so that its probabilities are the
    posteriors at class prior ``prior``: the calibration's bias plus ``log(prior / source prior)``, centred
    and clipped to ``[-bound, bound]`` (a bounded correction: no class is ever ruled out). The temperature
    of the calibration is not part of it, so the network and its temperature stay as registered."""
    v = calibration.bias + np.log(_normalise(prior, 1e-6) / calibration.source_prior)
    return np.clip(v - v.mean(), -bound, bound)


def allocate(total: int, prior: np.ndarray) -> np.ndarray:
    """``total`` split into integers proportional to ``prior`` (largest remainder; they sum to ``total``)."""
    exact = total * np.asarray(prior, dtype=float) / np.sum(prior)
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts


def resample_to_prior(labels: np.ndarray, prior: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Row indices of ``labels`` drawn WITHOUT replacement so that their class shares follow ``prior``: as many
    rows as every class can supply (at most ``size``). No row is repeated, which matters for a two-sample
    test: a duplicated reference row looks like a batch unlike the reference."""
    prior = np.asarray(prior, dtype=float)
    available = np.bincount(labels, minlength=len(prior))
    with np.errstate(divide="ignore"):
        most = np.where(prior > 0, available / np.maximum(prior, 1e-12), np.inf).min()
    counts = allocate(int(min(size, np.floor(most))), prior)
    counts = np.minimum(counts, available)
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in enumerate(counts) if k]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def accuracy_at_prior(recall: np.ndarray, prior: np.ndarray) -> float:
    """The accuracy a classifier with per-class ``recall`` has at class prior ``prior`` (recall does not
    change under label shift); classes with no held-out recall count as 0."""
    return float(np.sum(np.nan_to_num(recall) * prior))


def atc_threshold_at_prior(confidence: np.ndarray, correct: np.ndarray, labels: np.ndarray,
                           prior: np.ndarray) -> float:
    """ATC's threshold fitted on the labeled held-out sample re-weighted to class prior ``prior`` (each row
    weighs ``prior[y] / held-out share of y``): the share of re-weighted confidences above it equals the
    re-weighted accuracy. Under pure label shift the batch's share above it is then unbiased for its
    accuracy, at any class mix."""
    counts = np.bincount(labels, minlength=len(prior)).astype(float)
    w = (prior / np.maximum(counts, 1))[labels]
    accuracy = float(np.sum(w * correct) / w.sum())
    return weighted_quantile(confidence, w, 1.0 - accuracy)


def estimate_label_noise(labels: np.ndarray, probs: np.ndarray) -> float:
    """Share of ``labels`` that cleanlab's confident learning counts as wrong, given out-of-sample
    ``probs`` (the classifier never trained on these images)."""
    from cleanlab.count import num_label_issues

    if len(labels) == 0:
        raise ValueError("label noise: no labeled images")
    return float(num_label_issues(labels, probs)) / len(labels)


# --- the reference and the evaluation of a batch ---------------------------------------------------


@dataclass
class Reference:
    """What a batch is compared with, computed once per (encoder, classifier).

    ``embeddings``/``embedding_labels``: SSL embeddings of held-out labeled images (the clean ``test``
    split) and their labels: the input-drift reference, re-sampled to each batch's estimated class prior
    so that a new class mix alone is not input drift. ``probs``: the classifier's probabilities on
    train-distribution images it never trained on (``stages.drift_eval.classifier_reference_rows``): the prior
    estimator's self-check. ``calib_probs``/``calib_labels``: a sample of the clean test split (the
    prior estimator's calibration, ATC, per-class recall, the clean floors). ``train_counts``: images per
    class in the classifier's training labels (the rare classes; the prior production is expected at
    unless the classifier carries a prior correction). ``deployed_prior``: the class prior the scored
    classifier is set for (its prior correction's, else the training labels'). ``model``: which
    classifier (``stages.drift_eval.scored_classifier``).
    """

    embeddings: np.ndarray
    embedding_labels: np.ndarray
    probs: np.ndarray
    calib_probs: np.ndarray
    calib_labels: np.ndarray
    train_counts: np.ndarray
    classes: list[str]
    model: dict[str, Any] = field(default_factory=dict)
    deployed_prior: np.ndarray | None = None
    prior_method: str = "bbse_soft"
    prior_fallback_tv: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        c = len(self.classes)
        if self.probs.shape[1:] != (c,) or self.calib_probs.shape[1:] != (c,) or len(self.train_counts) != c:
            raise ValueError(f"reference: probabilities {self.probs.shape}/{self.calib_probs.shape} or class counts "
                             f"{self.train_counts.shape} do not match {c} classes")
        if len(self.embedding_labels) != len(self.embeddings):
            raise ValueError(f"reference: {len(self.embeddings)} embeddings but {len(self.embedding_labels)} labels")
        if self.deployed_prior is None:
            self.deployed_prior = self.train_counts / max(self.train_counts.sum(), 1)
        self.deployed_prior = _normalise(self.deployed_prior, 1e-6)
        calib_pred = self.calib_probs.argmax(1)
        self.calib_correct = calib_pred == self.calib_labels
        self.calib_accuracy = float(np.mean(self.calib_correct))
        self.calibration = fit_bias_calibration(self.calib_probs, self.calib_labels)
        self.recall, _ = per_class_recall(self.calib_labels, calib_pred, c)
        # the predictions a batch at the deployed prior is expected to make (test rows re-sampled to it)
        at_deployed = resample_to_prior(self.calib_labels, self.deployed_prior, len(self.calib_labels), self.seed)
        self.predicted_counts = np.bincount(calib_pred[at_deployed], minlength=c)
        self.accuracy = accuracy_at_prior(self.recall, self.deployed_prior)
        self.noise_floor = estimate_label_noise(self.calib_labels, self.calib_probs)
        held_out_prior = self.estimate_prior(self.probs)
        train_prior = self.train_counts / max(self.train_counts.sum(), 1)
        self.held_out_prior_tv = float(0.5 * np.abs(held_out_prior - train_prior).sum())
        self._floors: dict[tuple, dict[str, np.ndarray]] = {}

    def estimate_prior(self, probs: np.ndarray) -> np.ndarray:
        """The class prior of a sample from its probabilities (:meth:`prior_estimate`)."""
        return self.prior_estimate(probs)[0]

    def prior_estimate(self, probs: np.ndarray) -> tuple[np.ndarray, str]:
        """``(prior, method used)``: :func:`estimate_class_prior` with ``prior_method``; ``bbse_soft`` falls back
        to hard ``bbse`` when the two differ by more than ``prior_fallback_tv`` (the probabilities then do not
        behave as under a pure class-mix change, and only the predicted classes are trusted)."""
        def run(method: str) -> np.ndarray:
            return estimate_class_prior(probs, reference_probs=self.calib_probs, reference_labels=self.calib_labels,
                                        method=method, calibration=self.calibration)

        q = run(self.prior_method)
        if self.prior_method == "bbse_soft":
            hard = run("bbse")
            if 0.5 * np.abs(q - hard).sum() > self.prior_fallback_tv:
                return hard, "bbse"
        return q, self.prior_method

    def estimate_accuracy(self, probs: np.ndarray, prior: np.ndarray) -> float:
        """ATC with the threshold fitted on the held-out sample re-weighted to ``prior``."""
        t = atc_threshold_at_prior(self.calib_probs.max(1), self.calib_correct, self.calib_labels, prior)
        return atc_estimate(probs.max(1), t)

    def rare_classes(self, share: float) -> list[int]:
        """Classes with fewer train images than ``share`` times the largest class."""
        return [c for c, n in enumerate(self.train_counts) if n < share * self.train_counts.max()]

    def clean_statistics(self, n: int, prior: np.ndarray, p: DriftParams, labeled: bool) -> dict[str, np.ndarray]:
        """Each monitored statistic on ``p.floor_batches`` clean batches of ``n`` held-out images at class
        prior ``prior`` (drawn with replacement per class from the calibration sample): what a batch with
        nothing wrong scores. ``accuracy_drop`` (reference accuracy at the mix minus the estimate: the
        true accuracy when ``labeled``, else the unlabeled estimate at the estimated prior),
        ``label_noise_rate`` and ``tail_class_recall_drop`` (labeled only). Cached per argument."""
        key = (n, tuple(np.round(prior, 6)), labeled)
        if key in self._floors:
            return self._floors[key]
        rng = np.random.default_rng(self.seed)
        by_class = [np.flatnonzero(self.calib_labels == c) for c in range(len(self.classes))]
        rare = self.rare_classes(p.rare_class_share)
        out: dict[str, list[float]] = {"accuracy_drop": [], "label_noise_rate": [], "tail_class_recall_drop": []}
        counts = allocate(n, prior)
        for _ in range(p.floor_batches):
            rows = np.concatenate([rng.choice(by_class[c], k) for c, k in enumerate(counts) if k and len(by_class[c])])
            probs, labels = self.calib_probs[rows], self.calib_labels[rows]
            if labeled:
                mix = np.bincount(labels, minlength=len(self.classes)) / len(labels)
                out["accuracy_drop"].append(accuracy_at_prior(self.recall, mix)
                                            - float(np.mean(self.calib_correct[rows])))
                out["label_noise_rate"].append(estimate_label_noise(labels, probs))
                rec, cnt = per_class_recall(labels, probs.argmax(1), len(self.classes))
                drops = [self.recall[c] - rec[c] for c in rare if cnt[c] >= p.rare_min_count]
                out["tail_class_recall_drop"].append(max(drops) if drops else 0.0)
            else:
                q = self.estimate_prior(probs)
                out["accuracy_drop"].append(accuracy_at_prior(self.recall, q) - self.estimate_accuracy(probs, q))
        self._floors[key] = {k: np.asarray(v) for k, v in out.items() if v}
        return self._floors[key]

    def summary(self) -> dict[str, Any]:
        return {"size": len(self.embeddings), "classifier_reference_size": len(self.probs),
                "calibration_size": len(self.calib_labels),
                "test_accuracy": self.calib_accuracy, "accuracy_at_deployed_prior": self.accuracy,
                "label_noise_floor": self.noise_floor,
                "prior_estimator": self.prior_method,
                "prior_calibration": {"temperature": round(self.calibration.temperature, 6),
                                      "bias": _by_class(self.classes, _floats(self.calibration.bias))},
                "prior_estimate_tv_on_held_out_train_rows": round(self.held_out_prior_tv, 6),
                "deployed_prior": _by_class(self.classes, _floats(self.deployed_prior)),
                "test_recall": _by_class(self.classes, _floats(self.recall)),
                "predicted": _by_class(self.classes,
                                       _floats(self.predicted_counts / max(self.predicted_counts.sum(), 1)))}


def _floats(a: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else round(float(v), 6) for v in a]


def _by_class(classes: list[str], values: list) -> dict[str, Any]:
    return dict(zip(classes, values, strict=True))


def _metric(value: float | None, threshold: float, direction: str, stage: str) -> dict[str, Any]:
    failed = value is not None and (value < threshold if direction == "max" else value > threshold)
    return {"value": value, "threshold": threshold, "direction": direction, "stage": stage, "failed": bool(failed)}


def threshold_checks(reference: Reference, n: int, p: DriftParams, prior: np.ndarray | None = None,
                     labeled: bool = False) -> dict[str, dict[str, Any]]:
    """Each threshold against its clean floor: the ``p.floor_quantile`` quantile of the statistic over
    clean held-out batches of ``n`` images at class prior ``prior`` (default: the deployed prior;
    :meth:`Reference.clean_statistics`). A threshold a clean batch would fail (``met: false``) is
    raised to the floor (``effective``) and reported, rather than failing every batch in production.
    The two tests with a level (the MMD permutation test, the chi-square test of the predicted
    classes) are calibrated by construction: their false-alarm rate on clean batches is their level."""
    prior = reference.deployed_prior if prior is None else prior
    stats = reference.clean_statistics(n, prior, p, labeled)
    configured = {"accuracy_drop": p.accuracy_drop_max, "label_noise_rate": p.label_noise_max,
                  "tail_class_recall_drop": p.tail_recall_drop_max}
    out = {}
    for name, values in stats.items():
        floor = float(np.quantile(values, p.floor_quantile))
        out[name] = {"threshold": configured[name], "clean_floor": round(floor, 6), "met": floor <= configured[name],
                     "effective": round(max(configured[name], floor), 6), "quantile": p.floor_quantile,
                     "batch_size": n, "clean_batches": len(values), "labeled": labeled}
    return out


def threshold_warnings(checks: dict[str, dict[str, Any]]) -> list[str]:
    """One line for each threshold below its clean floor."""
    return [f"{name}: threshold {c['threshold']} is below its clean floor {c['clean_floor']:.4g} (quantile "
            f"{c['quantile']} of {c['clean_batches']} clean {'labeled ' if c['labeled'] else ''}batches of "
            f"{c['batch_size']} held-out images); using {c['effective']:.4g}: raise it in params.yaml drift_eval"
            for name, c in checks.items() if not c["met"]]


def evaluate_batch(reference: Reference, embeddings: np.ndarray, probs: np.ndarray,
                   labels: np.ndarray | None = None, params: DriftParams | None = None) -> dict[str, Any]:
    """Every monitored metric of one batch against ``reference``.

    ``embeddings``: the batch's SSL embeddings ``(n, D)`` from the reference's encoder; ``probs``: the
    classifier's probabilities ``(n, C)``; ``labels``: given labels (``-1`` = unlabeled), or None.

    First the batch's class prior is estimated without labels (:meth:`Reference.estimate_prior`); each
    test then asks what that prior cannot explain: input drift is the MMD test against held-out images
    re-sampled to the estimated prior, accuracy is compared with the held-out accuracy at that prior.
    What the prior itself says is one metric, ``class_prior_shift_pvalue``, owned by the
    ``prior_correction`` action (:mod:`sslvision.trigger`): a chi-square test of the predicted classes
    against held-out images at the prior the classifier is set for.

    Returns ``{"metrics": {name: {value, threshold, direction, stage, failed}}, "failed": [names],
    "class_prior", "input_drift", "prediction_shift", "accuracy", "recall", "label_noise",
    "threshold_checks", "reference"}`` (plain JSON types except the arrays ``input_drift["null"]`` and
    ``prediction_shift["batch"|"reference"]`` kept for plots).
    """
    p = params or DriftParams()
    c = len(reference.classes)
    if probs.shape != (len(embeddings), c):
        raise ValueError(f"batch: probabilities {probs.shape} do not match {len(embeddings)} images and {c} classes")
    prior, prior_method = reference.prior_estimate(probs)
    rows = resample_to_prior(reference.embedding_labels, prior, p.reference_size, p.seed)
    mmd = mmd_permutation_test(reference.embeddings[rows], embeddings, p.permutations, p.alpha, p.bandwidths, p.seed)
    given = "estimated class prior"
    predicted = probs.argmax(1)
    shift = prediction_shift(reference.predicted_counts, predicted)
    estimate = reference.estimate_accuracy(probs, prior)

    labeled = labels is not None and bool(np.any(labels >= 0))
    if labeled:
        # The given labels are a second account of the mix (noisy, but independent of how well the classifier
        # estimates it): input drift is what NEITHER mix explains, so the larger p-value counts. A weak
        # classifier's skewed prior estimate then cannot pass for drift (max of two p-values: conservative).
        label_mix = np.bincount(labels[labels >= 0], minlength=c) / int(np.sum(labels >= 0))
        label_rows = resample_to_prior(reference.embedding_labels, label_mix, p.reference_size, p.seed)
        by_labels = mmd_permutation_test(reference.embeddings[label_rows], embeddings, p.permutations, p.alpha,
                                         p.bandwidths, p.seed)
        if by_labels.p_value > mmd.p_value:
            mmd, rows, given = by_labels, label_rows, "class mix of the given labels"
    accuracy, mix, recall, noise, tail_drop, true_prior = estimate, prior, None, None, None, None
    worst_tail = None
    if labeled:
        keep = labels >= 0
        y, yhat = labels[keep], predicted[keep]
        accuracy = float(np.mean(y == yhat))
        true_prior = mix = np.bincount(y, minlength=c) / len(y)
        rec, counts = per_class_recall(y, yhat, c)
        noise = estimate_label_noise(y, probs[keep])
        drops = {cls: float(reference.recall[cls] - rec[cls]) for cls in reference.rare_classes(p.rare_class_share)
                 if counts[cls] >= p.rare_min_count and not np.isnan(reference.recall[cls])}
        if drops:
            worst_tail = max(drops, key=drops.get)
            tail_drop = drops[worst_tail]
        recall = {"per_class": _by_class(reference.classes, _floats(rec)),
                  "counts": _by_class(reference.classes, counts.tolist()),
                  "rare_classes": [reference.classes[i] for i in reference.rare_classes(p.rare_class_share)],
                  "rare_recall_drop": {reference.classes[k]: v for k, v in drops.items()},
                  "worst_rare_class": reference.classes[worst_tail] if worst_tail is not None else None}
    checks = threshold_checks(reference, int(np.sum(labels >= 0)) if labeled else len(probs), p, mix, labeled)
    reference_accuracy = accuracy_at_prior(reference.recall, mix)
    drop_max = checks["accuracy_drop"]["effective"]

    def effective(name: str, configured: float) -> float:
        return checks[name]["effective"] if name in checks else configured

    metrics = {
        "embedding_mmd_pvalue": _metric(mmd.p_value, p.alpha, "max", "pretrain"),
        "label_noise_rate": _metric(noise, effective("label_noise_rate", p.label_noise_max), "min", "audit"),
        "tail_class_recall_drop": _metric(tail_drop, effective("tail_class_recall_drop", p.tail_recall_drop_max),
                                          "min", "synthesize"),
        "accuracy": _metric(accuracy, round(reference_accuracy - drop_max, 6), "max", "finetune"),
        "class_prior_shift_pvalue": _metric(shift["pvalue"], p.prediction_shift_alpha, "max", PRIOR_CORRECTION),
    }
    tv = float(0.5 * np.abs(prior - reference.deployed_prior).sum())
    return {
        "metrics": metrics,
        "failed": [name for name, m in metrics.items() if m["failed"]],
        "n_images": len(embeddings),
        "labeled": labeled,
        "class_prior": {"method": prior_method, "configured_method": reference.prior_method,
                        "estimate": _by_class(reference.classes, _floats(prior)),
                        "deployed": _by_class(reference.classes, _floats(reference.deployed_prior)),
                        "tv_to_deployed": tv,
                        "adjustment": _by_class(reference.classes, _floats(
                            prior_adjustment(reference.calibration, prior))),
                        "true": _by_class(reference.classes, _floats(true_prior)) if labeled else None,
                        "tv_error": float(0.5 * np.abs(prior - true_prior).sum()) if labeled else None},
        "input_drift": {"test": "mmd2_permutation", "given": given, "statistic": mmd.statistic,
                        "p_value": mmd.p_value, "alpha": p.alpha, "critical_value": mmd.critical_value,
                        "permutations": p.permutations, "bandwidth": mmd.bandwidth,
                        "bandwidth_scales": list(p.bandwidths), "reference_size": len(rows), "null": mmd.null},
        "prediction_shift": {**shift, "per_class_shift": _by_class(
            reference.classes, _floats(shift["batch"] - shift["reference"]))},
        "accuracy": {"source": "labels" if labeled else "atc_at_estimated_prior", "value": accuracy,
                     "estimate": estimate, "estimate_error": estimate - accuracy if labeled else None,
                     "reference_at_mix": reference_accuracy, "mix": "true" if labeled else "estimated",
                     "average_confidence": float(probs.max(1).mean()),
                     "reference_test_accuracy": reference.calib_accuracy},
        "recall": recall,
        "label_noise": {"estimate": noise, "floor_on_clean_test": reference.noise_floor} if labeled else None,
        "threshold_checks": checks,
        "threshold_warnings": threshold_warnings(checks),
        "reference": reference.summary(),
    }


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """``evaluate_batch``'s result without the arrays kept for plotting."""
    out = dict(result)
    out["input_drift"] = {k: v for k, v in result["input_drift"].items() if k != "null"}
    out["prediction_shift"] = {k: v for k, v in result["prediction_shift"].items() if k not in ("batch", "reference")}
    return out


"""What one site learns about the model it deploys: the choice, predictions, metrics with CIs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, roc_curve

from fedfew_med.evaluation.stats import DEFAULT_SEED, Estimate, RocBand, roc_band
from fedfew_med.evaluation.table import Table

METRIC_LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "auc": "AUC",
    "ppv": "PPV (positive predictive value)",
    "npv": "NPV (negative predictive value)",
    "hd95": "HD95 (pixels)",
    "hd95_mm": "HD95 (mm)",
}
"""How the metrics tables name a metric (the keys of :attr:`SiteReport.metrics` otherwise)."""


@dataclass(frozen=True)
class Deployed:
    """The model a site deploys, and why.

    Attributes
    ----------
    model_index
        Server-model index, or None for a site-local model (Local, Ditto's personal model).
    slot
        Site-local slot whose norm buffers go with the parameters (``server/2``, ``local``...).
    scores
        The site's loss on each of the K server models, on ``selection_split``; the method deploys
        the lowest. Empty for methods that do not choose among server models.
    selection_split
        Split the scores were computed on (``train`` or ``val``); None without scores.
    reason
        One sentence for a reader.
    """

    model_index: int | None
    slot: str
    scores: tuple[float, ...] = ()
    selection_split: str | None = None
    reason: str = ""

    def table(self) -> Table:
        """One row per server model: the site's loss on it and whether it is the deployed one."""
        rows = [[k, loss, "deployed" if k == self.model_index else ""] for k, loss in enumerate(self.scores)]
        loss = f"loss on {self.selection_split} split" if self.selection_split else "loss"
        return Table(["server model", loss, ""], rows, title=self.reason)


def explain(*, method: str, num_models: int, model_index: int | None, slot: str,
            scores: tuple[float, ...], selection_split: str | None) -> str:
    """A one-sentence reason for a deployment (see :class:`Deployed`)."""
    if scores and model_index is not None:
        others = ", ".join(f"model {k}: {s:.3f}" for k, s in enumerate(scores) if k != model_index)
        return (f"{method}: deploys server model {model_index}, the lowest {selection_split}-split loss among "
                f"the {len(scores)} server models ({scores[model_index]:.3f}; {others or 'no others'})")
    if model_index is not None and slot.startswith("server/"):
        if num_models == 1:
            return f"{method}: deploys the single shared model"
        return f"{method}: deploys server model {model_index}"
    if model_index is not None:
        return f"{method}: deploys server model {model_index} after local adaptation (slot {slot!r})"
    if slot == "local":
        return f"{method}: deploys its own model, trained only on this site's data"
    if slot == "personal":
        return f"{method}: deploys its personal model"
    return f"{method}: deploys its site-local model (slot {slot!r})"


@dataclass(frozen=True)
class SiteReport:
    """One site's deployed model scored on its held-out test split.

    Attributes
    ----------
    site, method, task
        Site name, the run's label (e.g. ``fedfew (K=3)``) and ``classification`` / ``segmentation`` / ``tabular``.
    deployed
        Which model the site uses and why.
    probs
        Class probabilities: (N, C) for classification, (N, C, *spatial) for segmentation.
    targets
        Reference: (N,) classes, or (N, *spatial) masks.
    images
        The test images (N, C, H, W) for 2-D data (for overlays), else None.
    metrics
        Every metric with its bootstrap CI; point values equal the run's own evaluation. Classification
        adds ``ppv`` and ``npv`` (class 1 against the rest); segmentation adds ``hd95_mm`` when the
        voxel size of the grid is known in mm (``hd95`` is in pixels, as the run records it).
    per_case
        Segmentation: ``dice``, ``hd95`` (pixels) and, when known, ``hd95_mm`` (NaN where either mask
        is empty), each (N,). Classification: ``correct`` (0/1) and ``confidence`` (probability of the
        predicted class).
    primary
        The run's headline metric (``accuracy`` or ``dice``).
    metadata
        The site's data metadata (protocol, sizes, label counts...).
    class_names
        The site's label names (``[labels].names`` of its site file); empty when it has none.
    checks
        Classification: the run's plausibility checks (:func:`fedfew_med.metrics.prediction_checks`:
        ``auc_low`` / ``auc_high``, the Hanley-McNeil 95% interval, and ``classes_predicted``).
    flags
        The run's warnings about this result (:func:`fedfew_med.metrics.result_flags`); empty when none.
    seed
        Seed of the bootstrap behind :attr:`metrics` (:meth:`roc_band` draws the same resamples).
    hd95_note
        Segmentation: the unit of HD95 and where it comes from.
    """

    site: str
    method: str
    task: str
    deployed: Deployed
    probs: np.ndarray
    targets: np.ndarray
    images: np.ndarray | None
    metrics: dict[str, Estimate]
    per_case: dict[str, np.ndarray]
    primary: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    checks: Mapping[str, float] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    seed: int = DEFAULT_SEED
    hd95_note: str = ""

    @property
    def is_classification(self) -> bool:
        return self.task in ("classification", "tabular")

    @property
    def is_segmentation(self) -> bool:
        return self.task == "segmentation"

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[1])

    @property
    def predictions(self) -> np.ndarray:
        """Predicted class per case (N,), or predicted mask per case (N, *spatial)."""
        return self.probs.argmax(axis=1)

    @property
    def labels(self) -> list[str]:
        """A name per class: the site's label names, else ``class 0``, ``class 1``..."""
        if len(self.class_names) == self.num_classes:
            return list(self.class_names)
        return [f"class {c}" for c in range(self.num_classes)]

    @property
    def hd95_key(self) -> str:
        """``hd95_mm`` when HD95 is known in mm, else ``hd95`` (pixels)."""
        return "hd95_mm" if "hd95_mm" in self.per_case else "hd95"

    @property
    def hd95_unit(self) -> str:
        """``mm`` or ``px``: the unit of ``per_case[hd95_key]``."""
        return "mm" if self.hd95_key == "hd95_mm" else "px"

    def warnings(self) -> list[str]:
        """The result's warnings as sentences naming the site (empty when there is none)."""
        return [f"WARNING: {self.site} ({self.method}) {flag}" for flag in self.flags]

    def metrics_table(self) -> Table:
        """Metric, point estimate and CI bounds, one row per metric."""
        any_est = next(iter(self.metrics.values()), None)
        level = any_est.level if any_est else 0.95
        rows = [[METRIC_LABELS.get(name, name), e.value, e.low, e.high, f"{e.n_valid}/{e.n_resamples}"]
                for name, e in self.metrics.items()]
        notes = [f"{round(level * 100)}% percentile-bootstrap intervals over the {len(self.targets)} test cases; "
                 "'resamples' counts those on which the metric is defined."]
        if self.is_classification:
            positive = self.labels[1] if self.num_classes > 1 else "class 1"
            prevalence = int((self.targets == 1).sum())
            notes.append(f"Sensitivity, specificity, PPV and NPV take {positive!r} as positive (all other classes "
                         f"negative), as called by the model's argmax. PPV and NPV depend on how common {positive!r} is: "
                         f"{prevalence} of these {len(self.targets)} test cases.")
        if self.is_segmentation and self.hd95_note:
            notes.append(f"HD95: {self.hd95_note}.")
        notes.extend(self.warnings())
        return Table(["metric", "value", "CI low", "CI high", "resamples"], rows,
                     title=f"{self.site}: {self.deployed.reason}", notes=tuple(notes))

    # ------------------------------------------------------------ classification
    def _require(self, classification: bool) -> None:
        if classification != self.is_classification:
            want = "classification" if classification else "segmentation"
            raise ValueError(f"site {self.site!r} is a {self.task} task; this needs a {want} task")

    def roc_curves(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """ROC curve (false-positive rate, true-positive rate) per positive class.

        Binary tasks give class 1 only; more classes give one-vs-rest curves. Classes absent
        from the test split (no positives or no negatives) are left out.
        """
        self._require(True)
        classes = [1] if self.num_classes == 2 else list(range(self.num_classes))
        out = {}
        for c in classes:
            y = self.targets == c
            if y.all() or not y.any():
                continue
            fpr, tpr, _ = roc_curve(y, self.probs[:, c])
            out[c] = (fpr, tpr)
        return out

    def roc_band(self, positive_class: int = 1, *, grid_size: int = 101) -> RocBand:
        """The ROC curve of ``positive_class`` (against the rest) with its pointwise bootstrap band.

        Same resamples as :attr:`metrics` (same number, level and seed); see
        :func:`fedfew_med.evaluation.stats.roc_band`.
        """
        self._require(True)
        est = next(iter(self.metrics.values()))
        return roc_band(self.probs[:, positive_class], self.targets == positive_class, n_resamples=est.n_resamples,
                        level=est.level, seed=self.seed, grid_size=grid_size)

    def operating_point(self, positive_class: int = 1) -> tuple[float, float]:
        """(false-positive rate, true-positive rate) of the decision the model makes: its argmax.

        With two classes this is the threshold ``p(class 1) > 0.5``, and the point is
        (1 - specificity, sensitivity) of :attr:`metrics`. NaN where a class is absent.
        """
        self._require(True)
        called = self.predictions == positive_class
        positive = self.targets == positive_class
        tpr = float(called[positive].mean()) if positive.any() else float("nan")
        fpr = float(called[~positive].mean()) if (~positive).any() else float("nan")
        return fpr, tpr

    def operating_point_text(self) -> str:
        """The operating point in words, with the bootstrap intervals of sensitivity, specificity, PPV and NPV."""
        self._require(True)
        if self.num_classes != 2:
            return (f"{self.site}: the model calls the class with the highest probability (argmax over "
                    f"{self.num_classes} classes); each one-vs-rest ROC curve marks where that decision puts it.")
        names = self.labels
        m = self.metrics
        parts = [f"{label} {m[key]}" for key, label in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                                                        ("ppv", "PPV"), ("npv", "NPV")) if key in m]
        return (f"{self.site}: operating point: the model calls {names[1]!r} when p({names[1]}) > 0.5 (its argmax); "
                f"there: {', '.join(parts)} ({round(m['sensitivity'].level * 100)}% CIs)")

    def confusion(self) -> np.ndarray:
        """Confusion matrix (C, C): rows are reference classes, columns predicted classes."""
        self._require(True)
        return confusion_matrix(self.targets, self.predictions, labels=list(range(self.num_classes)))

    def calibration(self, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Reliability curve (observed frequency, mean predicted probability) per non-empty bin.

        Binary: probability of class 1 against the frequency of class 1
        (``sklearn.calibration.calibration_curve``, uniform bins). More classes: confidence of
        the predicted class against how often it is right.
        """
        self._require(True)
        if self.num_classes == 2:
            y, p = self.targets == 1, self.probs[:, 1]
        else:
            y, p = self.predictions == self.targets, self.probs.max(axis=1)
        prob_true, prob_pred = calibration_curve(y.astype(int), p, n_bins=n_bins, strategy="uniform")
        return prob_true, prob_pred

    def example_indices(self, n: int = 8) -> np.ndarray:
        """Test cases to look at: the most confident errors (up to half of ``n``), then correct cases.

        Correct cases are taken alternately from each reference class, in test order.
        """
        self._require(True)
        pred, conf = self.predictions, self.probs.max(axis=1)
        wrong = np.flatnonzero(pred != self.targets)
        wrong = wrong[np.argsort(-conf[wrong], kind="stable")][: n // 2]
        right_by_class = [list(np.flatnonzero((pred == self.targets) & (self.targets == c))) for c in range(self.num_classes)]
        right: list[int] = []
        while len(wrong) + len(right) < n and any(right_by_class):
            for bucket in right_by_class:
                if bucket and len(wrong) + len(right) < n:
                    right.append(int(bucket.pop(0)))
        return np.concatenate([wrong, np.asarray(right, dtype=np.int64)]).astype(np.int64)

    # ------------------------------------------------------------ segmentation
    def worst_cases(self, n: int = 6, *, with_reference: bool = True) -> np.ndarray:
        """The ``n`` cases with the lowest Dice (ties in test order), optionally only those with a reference object."""
        self._require(False)
        dice = self.per_case["dice"]
        candidates = np.arange(len(dice))
        if with_reference:
            candidates = candidates[self.targets.reshape(len(dice), -1).any(axis=1)]
        return candidates[np.argsort(dice[candidates], kind="stable")][:n]

    def case_table(self, cases: np.ndarray | None = None) -> Table:
        """Per-case Dice, HD95 (pixels, and mm when known) and object areas (pixels) for ``cases`` (default: all)."""
        self._require(False)
        idx = np.arange(len(self.targets)) if cases is None else np.asarray(cases)
        ref_area = self.targets.reshape(len(self.targets), -1).astype(bool).sum(axis=1)
        pred_area = (self.predictions.reshape(len(self.targets), -1) > 0).sum(axis=1)
        mm = "hd95_mm" in self.per_case
        rows = [[int(i), float(self.per_case["dice"][i]), float(self.per_case["hd95"][i]),
                 *([float(self.per_case["hd95_mm"][i])] if mm else []), int(ref_area[i]), int(pred_area[i])]
                for i in idx]
        notes = ["HD95 is undefined ('-') where the reference or the prediction is empty; Dice is 1 where both are empty."]
        if self.hd95_note:
            notes.append(f"HD95: {self.hd95_note}.")
        return Table(["case", "dice", "hd95 (px)", *(["hd95 (mm)"] if mm else []), "reference area (px)", "predicted area (px)"],
                     rows, title=f"{self.site}: per-case results ({self.method})", notes=tuple(notes))

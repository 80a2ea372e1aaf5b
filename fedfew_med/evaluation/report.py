"""What one site learns about the model it deploys: the choice, predictions, metrics with CIs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, roc_curve

from fedfew_med.evaluation.stats import Estimate
from fedfew_med.evaluation.table import Table


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
        Every metric with its bootstrap CI; point values equal the run's own evaluation.
    per_case
        Segmentation: ``dice`` and ``hd95`` (pixels; NaN where either mask is empty), each (N,).
        Classification: ``correct`` (0/1) and ``confidence`` (probability of the predicted class).
    primary
        The run's headline metric (``accuracy`` or ``dice``).
    metadata
        The site's data metadata (protocol, sizes, label counts...).
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

    def metrics_table(self) -> Table:
        """Metric, point estimate and CI bounds, one row per metric."""
        any_est = next(iter(self.metrics.values()), None)
        level = any_est.level if any_est else 0.95
        rows = [[name, e.value, e.low, e.high, f"{e.n_valid}/{e.n_resamples}"] for name, e in self.metrics.items()]
        note = (f"{round(level * 100)}% percentile-bootstrap intervals over the {len(self.targets)} test cases; "
                "'resamples' counts those on which the metric is defined.")
        return Table(["metric", "value", "CI low", "CI high", "resamples"], rows,
                     title=f"{self.site}: {self.deployed.reason}", notes=(note,))

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
        """Per-case Dice, HD95 (pixels) and object areas (pixels) for ``cases`` (default: all)."""
        self._require(False)
        idx = np.arange(len(self.targets)) if cases is None else np.asarray(cases)
        ref_area = self.targets.reshape(len(self.targets), -1).astype(bool).sum(axis=1)
        pred_area = (self.predictions.reshape(len(self.targets), -1) > 0).sum(axis=1)
        rows = [[int(i), float(self.per_case["dice"][i]), float(self.per_case["hd95"][i]), int(ref_area[i]), int(pred_area[i])]
                for i in idx]
        return Table(["case", "dice", "hd95 (px)", "reference area (px)", "predicted area (px)"], rows,
                     title=f"{self.site}: per-case results ({self.method})",
                     notes=("HD95 is undefined ('-') where the reference or the prediction is empty; "
                            "Dice is 1 where both are empty.",))

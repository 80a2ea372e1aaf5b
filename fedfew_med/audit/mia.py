"""Loss-threshold membership inference: AUC, TPR at low FPR with bootstrap CIs, an empirical ε lower bound.

Pure numpy/scipy on two score vectors (no model, no run). The attacker's score is the negative
per-record loss: a record whose loss is low is guessed to be a training record (Yeom et al. 2018).

The ε lower bound: an (ε, δ)-DP training run bounds every membership test by
``TPR <= e^ε · FPR + δ`` and ``TNR <= e^ε · FNR + δ`` (Kairouz et al. 2015). With Clopper–Pearson
bounds on the rates at a threshold, ``ε_lb = log((TPR_lo - δ) / FPR_hi)`` (and the same on the
complements) is a lower bound that holds with the stated confidence; taking the best of ``m``
thresholds, each bound is computed at level ``1 - α / m`` (Bonferroni), so the maximum still holds at
``1 - α``. It is a heuristic audit of *this* model (records were not inserted at random), not a proof.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

DEFAULT_FPRS = (0.01, 0.001)
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(member score > non-member score) + ½ P(tie) (the Mann–Whitney form of the ROC AUC)."""
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    ranks = stats.rankdata(np.concatenate([m, n]))  # average ranks handle ties
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2
    return float(u / (m.size * n.size))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
    """The largest TPR of a threshold rule ``score >= t`` whose FPR is at most ``fpr``."""
    m = np.sort(np.asarray(member_scores, dtype=np.float64))
    n = np.sort(np.asarray(nonmember_scores, dtype=np.float64))
    allowed = math.floor(fpr * n.size + 1e-9)  # non-members that may lie at or above the threshold
    # thresholds just above the (allowed+1)-th largest non-member score
    cut = n[n.size - allowed - 1] if allowed < n.size else -np.inf
    return float(np.count_nonzero(m > cut) / m.size)


def clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
    """Two-sided Clopper–Pearson interval of a binomial proportion ``k / n`` at ``level``."""
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


@dataclass(frozen=True)
class EpsilonBound:
    """The empirical ε lower bound and where it was attained.

    Attributes
    ----------
    epsilon
        The bound (0 when no threshold gives evidence).
    threshold
        The score threshold attaining it (None when ``epsilon`` is 0).
    tpr_lo, fpr_hi
        The one-sided confidence bounds used there (on the complements when ``side == "negatives"``).
    side
        ``"positives"`` (TPR vs FPR) or ``"negatives"`` (TNR vs FNR).
    thresholds
        How many thresholds were tried (the Bonferroni ``m``).
    level, delta
        Confidence level of the bound; the δ subtracted.
    """

    epsilon: float
    threshold: float | None
    tpr_lo: float
    fpr_hi: float
    side: str
    thresholds: int
    level: float
    delta: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return dict(self.__dict__)


def epsilon_lower_bound(member_scores: np.ndarray, nonmember_scores: np.ndarray, *, delta: float,
                        level: float = DEFAULT_LEVEL) -> EpsilonBound:
    """The largest ``log((rate_lo - δ) / other_hi)`` over all thresholds and both sides (see the module docstring)."""
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    cuts = np.unique(np.concatenate([m, n]))
    tests = 2 * cuts.size
    one_sided = 1.0 - 2 * (1.0 - level) / tests  # two-sided CP at this level = one-sided at 1 - α/m
    best = EpsilonBound(0.0, None, 0.0, 1.0, "positives", tests, level, delta)
    for t in cuts:
        tp, fp = int(np.count_nonzero(m >= t)), int(np.count_nonzero(n >= t))
        for side, k_pos, n_pos, k_neg, n_neg in (("positives", tp, m.size, fp, n.size),
                                                 ("negatives", n.size - fp, n.size, m.size - tp, m.size)):
            lo = clopper_pearson(k_pos, n_pos, one_sided)[0]
            hi = clopper_pearson(k_neg, n_neg, one_sided)[1]
            if lo - delta > 0 and hi > 0:
                eps = math.log((lo - delta) / hi)
                if eps > best.epsilon:
                    best = EpsilonBound(eps, float(t), lo, hi, side, tests, level, delta)
    return best


@dataclass(frozen=True)
class AttackResult:
    """A membership-inference attack on one model.

    Attributes
    ----------
    auc
        ROC AUC of the attack score, with its ``(lo, hi)`` bootstrap interval in ``auc_ci``.
    tpr
        ``{fpr: (tpr, lo, hi)}``: TPR at each FPR with its bootstrap interval.
    members, nonmembers
        How many records of each kind were scored.
    bound
        The empirical ε lower bound.
    n_resamples, level, seed
        Bootstrap settings (members and non-members are resampled separately).
    """

    auc: float
    auc_ci: tuple[float, float]
    tpr: dict[float, tuple[float, float, float]]
    members: int
    nonmembers: int
    bound: EpsilonBound
    n_resamples: int
    level: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (FPRs become string keys)."""
        return {
            "auc": self.auc, "auc_ci": list(self.auc_ci),
            "tpr_at_fpr": {f"{f:g}": {"tpr": v[0], "ci": [v[1], v[2]]} for f, v in self.tpr.items()},
            "members": self.members, "nonmembers": self.nonmembers,
            "epsilon_lower_bound": self.bound.to_dict(),
            "bootstrap": {"n_resamples": self.n_resamples, "level": self.level, "seed": self.seed},
        }


def attack(member_losses: np.ndarray, nonmember_losses: np.ndarray, *, delta: float, fprs: tuple[float, ...] = DEFAULT_FPRS,
           n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0) -> AttackResult:
    """The loss-threshold attack (score = −loss) with percentile-bootstrap intervals.

    Parameters
    ----------
    member_losses, nonmember_losses
        Per-record losses of the attacked model on training records (members) and on held-out
        records (non-members), shapes (N_m,) and (N_n,).
    delta
        δ of the run (subtracted in the ε bound).
    fprs
        False-positive rates at which the TPR is reported.
    n_resamples, level, seed
        Bootstrap settings.
    """
    m = -np.asarray(member_losses, dtype=np.float64)
    n = -np.asarray(nonmember_losses, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError(f"the attack needs members and non-members, got {m.size} and {n.size}")
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_resamples)
    tprs = np.empty((len(fprs), n_resamples))
    for b in range(n_resamples):
        mb = m[rng.integers(0, m.size, m.size)]
        nb = n[rng.integers(0, n.size, n.size)]
        aucs[b] = roc_auc(mb, nb)
        for i, f in enumerate(fprs):
            tprs[i, b] = tpr_at_fpr(mb, nb, f)
    a = (1.0 - level) / 2 * 100
    def ci(x: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(x, [a, 100 - a])
        return float(lo), float(hi)
    return AttackResult(
        auc=roc_auc(m, n), auc_ci=ci(aucs),
        tpr={f: (tpr_at_fpr(m, n, f), *ci(tprs[i])) for i, f in enumerate(fprs)},
        members=int(m.size), nonmembers=int(n.size),
        bound=epsilon_lower_bound(m, n, delta=delta, level=level),
        n_resamples=n_resamples, level=level, seed=seed,
    )


def roc_points(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of every threshold of the score −loss, for plotting."""
    m = -np.asarray(member_losses, dtype=np.float64)
    n = -np.asarray(nonmember_losses, dtype=np.float64)
    cuts = np.unique(np.concatenate([m, n, [np.inf]]))[::-1]
    fpr = np.array([np.count_nonzero(n >= t) / n.size for t in cuts])
    tpr = np.array([np.count_nonzero(m >= t) / m.size for t in cuts])
    return fpr, tpr

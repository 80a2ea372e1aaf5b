"""The documents agree with the code: sentences the code refutes are listed here with the code that refutes them.

Each row: a document, a claim it must not make (a regular expression over its text, whitespace folded), and a
check on the code showing the claim is false. A row's check failing means the code changed: then the claim may
have become true and the row must be revisited, not the document.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _text(relative: str) -> str:
    return re.sub(r"\s+", " ", (ROOT / relative).read_text())


def _flower_sites_train_with_dp() -> bool:
    """The Flower site builds the DP work of the simulation (``fedfew_med.flower.site_privacy``) and the client app uses it."""
    client = (ROOT / "fedfew_med/flower/client_app.py").read_text()
    privacy = (ROOT / "fedfew_med/flower/site_privacy.py").read_text()
    return "site_privacy import" in client and "plan_site" in privacy


def _flower_coordinator_accepts_privacy() -> bool:
    """Nothing in the Flower package refuses a federation with [privacy]."""
    sources = " ".join(p.read_text() for p in (ROOT / "fedfew_med/flower").glob("*.py"))
    return not re.search(r"ConfigError\([^)]*\[privacy\][^)]*(not (yet )?(supported|applied)|refuse)", sources)


CLAIMS = [
    ("privacy/README.md", r"DP on Flower deployments is not applied", _flower_sites_train_with_dp),
    ("privacy/README.md", r"deployment refuses `?\[privacy\]`?", _flower_coordinator_accepts_privacy),
    ("docs/deployment.md", r"DP (is|are) not (yet )?(applied|supported) on Flower", _flower_sites_train_with_dp),
    ("README.md", r"DP (is|are) not (yet )?(applied|supported) on Flower", _flower_sites_train_with_dp),
    ("privacy/README.md", r"coordinator writes no `?privacy_ledger",
     lambda: "open_chain" in (ROOT / "fedfew_med/flower/coordinator.py").read_text()),
    ("docs/deployment.md", r"(Flower|coordinator)[^.]*writes no `?privacy_ledger",
     lambda: "open_chain" in (ROOT / "fedfew_med/flower/coordinator.py").read_text()),
    ("privacy/README.md", r"evaluation carries the K losses[^.]*(without noise|not charged)",
     lambda: "released=released" in (ROOT / "fedfew_med/flower/client_app.py").read_text()),
    ("docs/deployment.md", r"evaluat[^.]*(losses|scores)[^.]*(without noise|not charged|noise-free)",
     lambda: "released=released" in (ROOT / "fedfew_med/flower/client_app.py").read_text()),
    ("README.md", r"no device option", lambda: "device: str = \"auto\"" in (ROOT / "fedfew_med/config.py").read_text()),
]


@pytest.mark.parametrize(("document", "claim", "refuted_by"), CLAIMS, ids=[f"{d}:{c[:30]}" for d, c, _ in CLAIMS])
def test_documents_do_not_make_claims_the_code_refutes(document, claim, refuted_by):
    assert refuted_by(), f"the code no longer refutes {claim!r}: revisit this row"
    match = re.search(claim, _text(document), flags=re.IGNORECASE)
    assert match is None, f"{document} says {match.group(0)!r}, which the code refutes ({refuted_by.__doc__ or refuted_by})"

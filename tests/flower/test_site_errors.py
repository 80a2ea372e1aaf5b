"""What a site's failed handler sends the coordinator (fedfew_med.flower.site_errors)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from fedfew_med.flower.site_errors import SiteFailure, public_reason, site_errors
from fedfew_med.flower.site_privacy import SiteLedgerError
from fedfew_med.flower.site_store import SiteStateError
from fedfew_med.site_config import SiteConfigError

STATE = Path("/srv/hospital/PID-991/state")
SITE = Path("/srv/hospital/PID-991/site.toml")
PLACES = {"<state-dir>": STATE, "<site-config>": SITE, "<federation-config>": None}


def _ref(exc: BaseException) -> str:
    return hashlib.sha256(f"{type(exc).__name__}: {exc}".encode()).hexdigest()[:12]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (SiteLedgerError(f"site 'a': its privacy ledger {STATE}/run/a/privacy.json is missing"),
         "SiteLedgerError: site 'a': its privacy ledger <state-dir>/run/a/privacy.json is missing"),
        (SiteStateError(f"{STATE}/run/a/round-00003: unreadable state snapshot (bad)"),
         "SiteStateError: <state-dir>/run/a/round-00003: unreadable state snapshot (bad)"),
        # the state dir lies inside the site file's folder's tree: the longer path is replaced first
        (SiteStateError(f"{STATE}/x and {SITE}"), "SiteStateError: <state-dir>/x and <site-config>"),
        (SiteConfigError(f"{SITE}: [source].csv: {SITE.parent}/PID-991_labels.csv does not exist", site="a", file=str(SITE)),
         "SiteConfigError while handling a train message; the details (which may name the site's files) stay in "
         "the site's log"),
        (FileNotFoundError(2, "No such file", "/srv/hospital/PID-991/x.png"),
         "FileNotFoundError while handling a train message; the details (which may name the site's files) stay in "
         "the site's log"),
    ],
    ids=["ledger", "snapshot", "longest-first", "config-error", "os-error"],
)
def test_public_reason(exc, expected):
    reason = public_reason(exc, "train", PLACES)
    assert reason == f"{expected} [site log reference {_ref(exc)}]"
    assert "PID-991" not in reason and "/srv" not in reason


def test_the_handler_error_is_logged_in_full_and_raised_without_paths(caplog):
    exc = OSError(f"{SITE.parent}/PID-991_scan.png: truncated")
    with caplog.at_level(logging.ERROR, logger="fedfew_med"), pytest.raises(SiteFailure) as raised:
        with site_errors("evaluate", PLACES):
            raise exc
    assert str(raised.value) == public_reason(exc, "evaluate", PLACES)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no chained text to forward
    [record] = caplog.records
    assert f"[site log reference {_ref(exc)}]" in record.getMessage()
    assert record.exc_info is not None and "PID-991_scan.png" in str(record.exc_info[1])  # the full error stays at the site

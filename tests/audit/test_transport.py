"""The privacy report's transport rows: what a Flower run's coordinator recorded, n/a for a simulation."""

from __future__ import annotations

import json

import pytest

from fedfew_med.audit.report import transport_section
from fedfew_med.audit.summary import transport_sentence
from fedfew_med.privacy import PrivacyPolicy, check_recorded_transport

SITES = {"a": {"node_id": 11, "status": "connected"}, "b": {"node_id": None, "status": "disconnected"}}


def _flower(tls, node_auth, launches=None):
    launches = launches if launches is not None else [{"first_round": 0, "tls": tls, "node_auth": node_auth,
                                                       "launched_by": None if tls is None else "fedfew-med flower run"}]
    return {"runner": "flower", "tls": tls, "node_auth": node_auth, "launches": launches, "sites_connected": SITES,
            "refused_node_ids": []}


STRICT, LAX = PrivacyPolicy(), PrivacyPolicy(require_tls=False, require_authenticated_sites=False)
MIXED = [{"first_round": 0, "tls": True, "node_auth": True}, {"first_round": 3, "tls": False, "node_auth": False}]


@pytest.mark.parametrize(("policy", "transport", "oks", "actuals"), [
    (STRICT, {"runner": "simulation"}, (None, None), ("in-process simulation: no network",) * 2),
    (STRICT, _flower(True, True), (True, True),
     ("TLS (recorded by the coordinator)", "authenticated sites (recorded by the coordinator)")),
    (STRICT, _flower(False, False), (False, False),
     ("no TLS (recorded by the coordinator)", "no authenticated sites (recorded by the coordinator)")),
    (STRICT, _flower(True, False), (True, False),
     ("TLS (recorded by the coordinator)", "no authenticated sites (recorded by the coordinator)")),
    (STRICT, _flower(None, None), (False, False),
     ("not recorded by the coordinator (a launch not made with `fedfew-med flower run`)",) * 2),
    (STRICT, _flower(False, False, MIXED), (False, False),
     ("no TLS (recorded by the coordinator; in the launch from round 3)",
      "no authenticated sites (recorded by the coordinator; in the launch from round 3)")),
    (LAX, _flower(False, False), (None, None),
     ("no TLS (recorded by the coordinator)", "no authenticated sites (recorded by the coordinator)")),
    (LAX, _flower(None, None), (None, None),
     ("not recorded by the coordinator (a launch not made with `fedfew-med flower run`)",) * 2),
])
def test_transport_verdicts(policy, transport, oks, actuals):
    verdicts = check_recorded_transport(policy, transport)
    assert [v.rule for v in verdicts] == ["require_tls", "require_authenticated_sites"]
    assert tuple(v.ok for v in verdicts) == oks
    assert tuple(v.actual for v in verdicts) == actuals
    assert all(v.site == "(deployment)" for v in verdicts)


@pytest.mark.parametrize(("files", "expected"), [
    ({}, {"runner": "simulation"}),  # a simulation's run directory
    ({"summary.json": {"transport": _flower(True, True)}}, _flower(True, True)),
    ({"summary.json": {}, "nodes.json": {"run_key": "k", "refused_node_ids": [7],  # a Flower run from before the record
                                         "sites": [{"site": "a", "node_id": 11, "n_train": 5, "status": "connected"}]}},
     {"runner": "flower", "tls": None, "node_auth": None, "launches": [],
      "sites_connected": {"a": {"node_id": 11, "status": "connected"}}, "refused_node_ids": [7]}),
])
def test_transport_section_reads_the_run_directory(tmp_path, files, expected):
    for name, doc in files.items():
        (tmp_path / name).write_text(json.dumps(doc))
    assert transport_section(tmp_path) == expected


@pytest.mark.parametrize(("transport", "expected"), [
    ({"runner": "simulation"}, "In-process simulation: no network, so TLS and site authentication do not apply."),
    (_flower(True, True), "Flower deployment, as its coordinator recorded it: TLS on, SuperNode authentication on; "
                          "sites that connected: a, b (b not connected at the end)."),
    (_flower(False, None), "Flower deployment, as its coordinator recorded it: TLS OFF, SuperNode authentication "
                           "not recorded; sites that connected: a, b (b not connected at the end)."),
])
def test_transport_sentence(transport, expected):
    assert transport_sentence(transport) == expected

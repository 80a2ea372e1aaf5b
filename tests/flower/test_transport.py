"""Transport facts: what `fedfew-med flower run` passes, and how the coordinator combines its launches."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args

from fedfew_med.flower import launch
from fedfew_med.flower.commands import transport_facts
from fedfew_med.flower.coordinator import ServerSettings
from fedfew_med.flower.transport import combined, launch_entry, transport_record


@pytest.mark.parametrize(("insecure", "tls"), [(False, True), (True, False)])
def test_flower_run_passes_its_connections_security_through_the_run_config(tmp_path, insecure, tls):
    (tmp_path / "ca.crt").write_text("-")
    launch.write_connection(tmp_path, "fed", address="h:9091", root_certificates=None if insecure else tmp_path / "ca.crt",
                            insecure=insecure)
    facts = transport_facts(tmp_path, "fed")
    assert facts["tls"] is tls and facts["node-auth"] is tls and "flwr connection 'fed'" in str(facts["launched-by"])
    # through Flower's own --run-config parser, into the ServerApp's settings
    parsed = parse_config_args([launch.config_arg({"federation-config": "/f", "run-dir": "/r", **facts})])
    settings = ServerSettings.from_run_config(parsed)
    assert (settings.tls, settings.node_auth, settings.launched_by) == (tls, tls, facts["launched-by"])


def test_an_unknown_connection_records_nothing(tmp_path):
    assert transport_facts(tmp_path, "nowhere") == {}


@pytest.mark.parametrize(("values", "expected"), [
    ([True], True), ([True, True], True), ([True, False], False), ([True, None], None), ([None, False], False),
    ([None], None), ([], None),
])
def test_launches_combine_to_the_weakest(values, expected):
    assert combined(values) is expected


def test_a_launch_without_launched_by_records_no_facts():
    assert launch_entry(first_round=2, tls=True, node_auth=True, launched_by="") == {
        "first_round": 2, "tls": None, "node_auth": None, "launched_by": None}
    record = transport_record([launch_entry(first_round=0, tls=True, node_auth=True, launched_by="x")],
                              {"sites": [{"site": "a", "node_id": 3, "n_train": 9, "status": "connected"}], "refused_node_ids": [4]})
    assert record == {"runner": "flower", "tls": True, "node_auth": True,
                      "launches": [{"first_round": 0, "tls": True, "node_auth": True, "launched_by": "x"}],
                      "sites_connected": {"a": {"node_id": 3, "status": "connected"}}, "refused_node_ids": [4]}

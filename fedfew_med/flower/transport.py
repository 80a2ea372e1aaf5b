"""What the coordinator records of a deployment's transport: TLS, SuperNode authentication, the sites that connected.

The ServerApp talks to the SuperLink only through its local Runtime API, so it cannot see how the
SuperNodes' connections are secured. ``fedfew-med flower run`` can: it submits the run over the
``flwr`` connection to the SuperLink's port, which serves the SuperNodes too, and passes what it
knows in the run config (``tls``, ``node-auth``, ``launched-by``; see
:func:`fedfew_med.flower.commands.transport_facts`). The coordinator keeps one :func:`launch_entry`
per start of the run (a resumed run may have been launched differently) in every checkpoint and
writes :func:`transport_record` into ``summary.json`` under ``transport``, where
``fedfew-med privacy-report`` checks it against the policy's ``require_tls`` and
``require_authenticated_sites``. A run started with a bare ``flwr run`` records nothing (``None``):
the report then cannot vouch for the transport.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def launch_entry(*, first_round: int, tls: bool, node_auth: bool, launched_by: str) -> dict[str, Any]:
    """One start of the run: from which round, and the transport facts its launcher passed (``None``: not passed)."""
    known = bool(launched_by)
    return {"first_round": int(first_round), "tls": bool(tls) if known else None,
            "node_auth": bool(node_auth) if known else None, "launched_by": launched_by or None}


def combined(values: Sequence[bool | None]) -> bool | None:
    """False if any launch lacked it, None if any did not record it, else True (None for no launch)."""
    if any(v is False for v in values):
        return False
    if not values or any(v is None for v in values):
        return None
    return True


def transport_record(launches: Sequence[Mapping[str, Any]], nodes: Mapping[str, Any]) -> dict[str, Any]:
    """``summary.json``'s ``transport``: transport facts over all launches and every site that connected.

    Parameters
    ----------
    launches
        :func:`launch_entry` of every start of the run, oldest first.
    nodes
        The ``nodes.json`` document (``sites``: rows with ``site``, ``node_id``, ``status``; ``refused_node_ids``).
    """
    return {
        "runner": "flower",
        "tls": combined([entry.get("tls") for entry in launches]),
        "node_auth": combined([entry.get("node_auth") for entry in launches]),
        "launches": [dict(entry) for entry in launches],
        "sites_connected": {row["site"]: {"node_id": row.get("node_id"), "status": row.get("status")}
                            for row in nodes.get("sites", [])},
        "refused_node_ids": list(nodes.get("refused_node_ids", [])),
    }

"""The privacy report's opening: what a privacy officer can act on, in plain words.

:func:`rounds_left` forecasts, from a site's ledger, how many more rounds like its last one its
budget allows (the accountant composes them; ε does not grow linearly). :func:`plain_summary`
turns a built report into sentences: ε per site against its target and the rounds left, that the
guarantee is per record and not per patient, what server-side DP adds, and what the membership
attack can and cannot show. Numbers are given to 3 significant digits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedfew_med.dp.ledger import PrivacyLedger

MAX_FORECAST = 10_000  # rounds; "more than 10000" beyond


def sig3(x: float) -> str:
    """A number to 3 significant digits, without an exponent for everyday sizes (0.000123 → 0.000123)."""
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-4 <= abs(x) < 1e6 else f"{x:.2e}"


def rounds_left(ledger_state: Mapping[str, Any]) -> int | None:
    """How many more rounds with the mechanisms of the ledger's last round keep ε within its target.

    None without a target or without a recorded round; :data:`MAX_FORECAST` when at least that many.
    """
    ledger = PrivacyLedger.from_state_dict(ledger_state)
    rounds = [m.round for m in ledger.history if m.round >= 0]
    if ledger.target_epsilon is None or not rounds:
        return None
    last = [m for m in ledger.history if m.round == max(rounds)]

    def fits(n: int) -> bool:
        return n == 0 or ledger.epsilon_after(last * n) <= ledger.target_epsilon  # type: ignore[operator]

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_FORECAST and fits(high):  # doubling, then bisection: O(log n) accountant calls
        low, high = high, high * 2
    if high > MAX_FORECAST:
        return MAX_FORECAST
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _site_sentence(name: str, row: Mapping[str, Any], rounds: int) -> str:
    eps, target, delta = row.get("epsilon"), row.get("target_epsilon"), row.get("delta")
    text = f"Site {name} spent ε = {sig3(float(eps))}" if eps is not None else f"Site {name}: no ε recorded"
    if target:
        text += f" of its budget ε = {sig3(float(target))}"
    if delta is not None:
        text += f" (δ = {sig3(float(delta))})"
    text += f" over {rounds} round{'s' if rounds != 1 else ''}"
    left = row.get("rounds_left")
    if row.get("stopped"):
        text += "; it stopped training when its next round would have passed the budget"
    elif left == 0:
        text += "; its budget is spent: not one more round like its last one fits"
    elif left is not None:
        more = f"more than {MAX_FORECAST}" if left >= MAX_FORECAST else str(left)
        text += f"; its budget allows {more} more round{'s' if left != 1 else ''} like its last one"
    return text + "."


def _attack_sentences(attack: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    runs = attack.get("run", {})
    if not runs:
        return out
    chance = [s for s, r in runs.items() if r["auc_ci"][0] <= 0.5 <= r["auc_ci"][1]]
    better = sorted(set(runs) - set(chance))
    aucs = ", ".join(f"{s} {sig3(r['auc'])} [{sig3(r['auc_ci'][0])}, {sig3(r['auc_ci'][1])}]" for s, r in sorted(runs.items()))
    if chance and not better:
        out.append(f"The membership attack could not tell training records from held-out ones on any site (AUC {aucs}; "
                   "0.5 is guessing). That is inconclusive, not a proof of privacy: a stronger attack may do better, "
                   "and small test splits give wide intervals. The accounted ε above is the guarantee.")
    else:
        out.append(f"The membership attack did better than guessing on {', '.join(better)} (AUC {aucs}; 0.5 is guessing): "
                   "the deployed models reveal something about who was in the training data there.")
    base = attack.get("baseline", {})
    if base:
        base_chance = all(r["auc_ci"][0] <= 0.5 <= r["auc_ci"][1] for r in base.values())
        if base_chance and chance and not better:
            out.append("The non-DP baseline was not distinguishable either, so this attack is too weak on this data to "
                       "show what DP adds; it cannot show that the DP run is safer.")
        elif not base_chance:
            out.append("On the non-DP baseline the attack did better than guessing: compare the two runs' AUCs in the table below.")
    bounds = [c for c in attack.get("checks", {}).values() if c.get("consistent") is False]
    if bounds:
        out.append("On at least one site the attack's empirical ε lower bound exceeds the accounted ε: the accounting "
                   "or the implementation is wrong there; treat the run as not private until explained.")
    return out


def transport_sentence(transport: Mapping[str, Any]) -> str:
    """The run's transport in words: no network (simulation), or what a Flower run's coordinator recorded."""
    if transport.get("runner") != "flower":
        return "In-process simulation: no network, so TLS and site authentication do not apply."

    def said(value: Any, on: str, off: str) -> str:
        return {True: on, False: off}.get(value, "not recorded")

    sites = transport.get("sites_connected", {})
    left = sorted(s for s, row in sites.items() if row.get("status") != "connected")
    names = ", ".join(sorted(sites)) or "none"
    text = (f"Flower deployment, as its coordinator recorded it: TLS {said(transport.get('tls'), 'on', 'OFF')}, "
            f"SuperNode authentication {said(transport.get('node_auth'), 'on', 'OFF')}; "
            f"sites that connected: {names}")
    if left:
        text += f" ({', '.join(left)} not connected at the end)"
    return text + "."


def plain_summary(report: Mapping[str, Any]) -> list[str]:
    """The report's opening sentences (see the module docstring)."""
    privacy = report.get("privacy", {})
    sites: Mapping[str, Any] = privacy.get("sites", {})
    rounds = int(report.get("run", {}).get("rounds") or 0)
    all_sites: Sequence[str] = report.get("run", {}).get("sites", [])
    out: list[str] = []
    if not sites:
        out.append("No site trained with differential privacy: nothing in this run bounds what its models and "
                   "updates reveal about any record.")
    else:
        out += [_site_sentence(name, row, rounds) for name, row in sorted(sites.items())]
        unprotected = sorted(set(all_sites) - set(sites))
        if unprotected:
            out.append(f"Without differential privacy: {', '.join(unprotected)}. Nothing bounds what leaves those sites.")
        out.append("The guarantee is per record (one image or table row), not per patient: a patient with k records "
                   "in a site's training data is protected only at about k times that ε, and statistics of a whole "
                   "site (its label balance, its scanner) are not protected.")
    server = privacy.get("server")
    if server:
        out.append(f"Server-side DP adds site-level protection of the aggregate: ε = {sig3(float(server['epsilon']))} "
                   f"(δ = {sig3(float(server['delta']))}) over {server.get('releases')} releases.")
    elif sites:
        out.append("There is no server-side DP: the server sees each site's update, protected only by that site's own DP.")
    if "transport" in report:
        out.append(transport_sentence(report["transport"]))
    policy = report.get("policy")
    if policy is not None:
        out.append("The run complies with the privacy policy." if policy.get("compliant")
                   else "The run BREAKS the privacy policy: see the compliance table.")
    out += _attack_sentences(report.get("attack", {}))
    return out

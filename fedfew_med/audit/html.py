"""The privacy report as one self-contained HTML file (plots as base64 PNG, no scripts from the network).

Every number shown in a table cell carries its exact value in a ``data-value`` attribute and its
place in the JSON report in ``data-key``, and the whole JSON report is embedded in
``<script type="application/json" id="report-data">``: a reader (or a test) can match every figure
on the page to the run's ledgers. matplotlib is imported only when a plot is drawn, with the Agg
canvas on a ``Figure`` object (no pyplot state).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedfew_med.audit.summary import sig3

PLOT_IDS = ("plot-epsilon", "plot-roc")


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def epsilon_plot(privacy: Mapping[str, Any]) -> str | None:
    """Base64 PNG of ε spent per site over the rounds (dashed: each site's target), or None without DP."""
    sites = privacy.get("sites", {})
    if not sites:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    from matplotlib.ticker import MaxNLocator

    markers, styles = "osD^vP*X", ("-", "--", "-.", ":")
    for i, (name, row) in enumerate(sorted(sites.items())):
        pts = row["epsilon_by_round"]
        # sites with one budget draw on top of each other: marker, line style and a small offset tell them apart
        shift = (i - (len(sites) - 1) / 2) * 0.06
        line = ax.plot([p["round"] + shift for p in pts], [p["epsilon"] for p in pts], marker=markers[i % len(markers)],
                       ls=styles[i % len(styles)], label=name, color=f"C{i}", ms=5, alpha=0.9)[0]
        if row.get("target_epsilon"):
            ax.axhline(row["target_epsilon"], ls=(0, (2, 3)), lw=0.8, color=line.get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (whole run so far)")
    ax.set_title("privacy budget spent per site (dashed: target ε)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _png(fig)


def roc_plot(attack: Mapping[str, Any]) -> str | None:
    """Base64 PNG of the attack's ROC curves per site (log-log), the run beside its baseline."""
    runs = {label: attack[key] for key, label in (("run", "this run"), ("baseline", "baseline (no DP)")) if key in attack}
    if not runs:
        return None
    from matplotlib.figure import Figure

    sites = sorted(runs["this run"])
    fig = Figure(figsize=(3.2 * len(sites), 3.2))
    for j, site in enumerate(sites):
        ax = fig.add_subplot(1, len(sites), j + 1)
        for i, (label, results) in enumerate(runs.items()):
            if site in results:
                r = results[site]
                ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], color=f"C{i}", label=f"{label}: AUC {r['auc']:.3f}")
        ax.plot([1e-4, 1], [1e-4, 1], ls=":", color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(1e-3, 1)
        ax.set_ylim(1e-3, 1)
        ax.set_xlabel("false-positive rate")
        if j == 0:
            ax.set_ylabel("true-positive rate")
        ax.set_title(site, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        return sig3(value)  # 3 significant digits on the page; data-value keeps the exact number
    return str(value)


def _cell(value: Any, key: str | None = None) -> str:
    attrs = ""
    if key is not None:
        attrs = f' data-key="{html.escape(key)}" data-value="{html.escape(json.dumps(value))}"'
    return f"<td{attrs}>{html.escape(_fmt(value))}</td>"


def _table(head: Sequence[str], rows: Sequence[str], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _img(b64: str | None, plot_id: str, alt: str) -> str:
    if b64 is None:
        return f"<p><em>{html.escape(alt)}: nothing to plot.</em></p>"
    return f'<img id="{plot_id}" class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


LEDGER_COLUMNS = ("epsilon", "target_epsilon", "rounds_left", "delta", "accountant", "noise_multiplier", "max_grad_norm", "sample_rate",
                  "steps", "loss_noise_multiplier", "loss_clip", "loss_releases", "stopped")
LEDGER_LABELS = {
    "epsilon": "ε spent", "target_epsilon": "ε budget", "rounds_left": "rounds left (at the last round's rate)", "delta": "δ",
    "accountant": "accountant", "noise_multiplier": "noise (σ) of DP-SGD", "max_grad_norm": "gradient clip (C)",
    "sample_rate": "records sampled per step (q)", "steps": "DP-SGD steps", "loss_noise_multiplier": "noise (σ) of loss reports",
    "loss_clip": "loss clip", "loss_releases": "loss reports sent", "stopped": "stopped (budget spent)",
}
"""Column headings a privacy officer reads; the JSON keys stay in each cell's ``data-key``."""


def _privacy_tables(privacy: Mapping[str, Any]) -> str:
    sites = privacy.get("sites", {})
    if not sites:
        return "<p><strong>No site trained with differential privacy in this run.</strong></p>"
    rows = []
    for name, row in sorted(sites.items()):
        cells = "".join(_cell(row.get(c), f"privacy.sites.{name}.{c}") for c in LEDGER_COLUMNS)
        check = row.get("ledger_check", {})
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}{_cell(check.get('matches'), f'privacy.sites.{name}.ledger_check.matches')}</tr>")
    out = _table(["site", *(LEDGER_LABELS[c] for c in LEDGER_COLUMNS), "ledger re-read matches"], rows, "ledger")
    mech_rows = []
    for name, row in sorted(sites.items()):
        for i, m in enumerate(row.get("mechanisms", [])):
            key = f"privacy.sites.{name}.mechanisms.{i}"
            mech_rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(m['kind'])}</td>"
                             + "".join(_cell(m[c], f"{key}.{c}") for c in ("noise_multiplier", "sample_rate", "steps", "entries")) + "</tr>")
    out += "<h3>Mechanisms composed (per site, one ledger for the whole run)</h3>"
    out += ("<p>dp-sgd: Poisson-sampled DP-SGD steps of the K models' local training (every epoch, every round); "
            "loss: the K private loss reports (clipped per-record losses plus Gaussian noise).</p>")
    out += _table(["site", "mechanism", "noise multiplier", "sample rate", "steps", "ledger entries"], mech_rows, "mechanisms")
    server = privacy.get("server")
    if server:
        cells = "".join(_cell(server.get(c), f"privacy.server.{c}") for c in ("epsilon", "delta", "clip", "noise_multiplier", "releases", "accountant"))
        out += "<h3>Server-side DP (site-level, clipped updates and noised aggregate)</h3>"
        out += _table(["ε", "δ", "clip", "noise multiplier", "releases", "accountant"], [f"<tr>{cells}</tr>"], "server")
    else:
        out += "<p>No server-side DP: the server sees every site's (DP-SGD-trained) update of every model it trained.</p>"
    return out


def _policy_table(report: Mapping[str, Any]) -> str:
    policy = report.get("policy")
    if not policy:
        return "<p><em>No policy was given (pass --policy privacy/policy.toml).</em></p>"
    rows = []
    for i, v in enumerate(policy["verdicts"]):
        cls = {"pass": "pass", "FAIL": "fail"}.get(v["status"], "na")
        rows.append(f'<tr class="{cls}"><td>{html.escape(v["site"])}</td><td>{html.escape(v["rule"])}</td>'
                    f'<td>{html.escape(v["required"])}</td><td>{html.escape(v["actual"])}</td>'
                    f'<td data-key="policy.verdicts.{i}.status">{html.escape(v["status"])}</td></tr>')
    verdict = "complies with" if policy["compliant"] else "BREAKS"
    head = f"<p>The run <strong>{verdict}</strong> the policy “{html.escape(policy['name'])}” ({html.escape(policy['source'])}).</p>"
    return head + _table(["site", "rule", "required", "actual", "status"], rows, "policy")


def _transport_table(report: Mapping[str, Any]) -> str:
    transport = report.get("transport") or {"runner": "simulation"}
    if transport.get("runner") != "flower":
        return "<p>In-process simulation: no network (TLS and site authentication do not apply).</p>"
    rows = [f'<tr><td>{html.escape(label)}</td>{_cell(transport.get(key), f"transport.{key}")}</tr>'
            for label, key in (("TLS", "tls"), ("SuperNode authentication", "node_auth"))]
    launches = [f"<tr><td>{html.escape(str(e.get('first_round')))}</td>{_cell(e.get('tls'))}{_cell(e.get('node_auth'))}"
                f"<td>{html.escape(str(e.get('launched_by') or 'not recorded'))}</td></tr>" for e in transport.get("launches", [])]
    sites = [f"<tr><td>{html.escape(s)}</td><td>{html.escape(str(r.get('node_id') or '-'))}</td>"
             f"<td>{html.escape(str(r.get('status')))}</td></tr>" for s, r in sorted(transport.get("sites_connected", {}).items())]
    refused = ", ".join(str(n) for n in transport.get("refused_node_ids", [])) or "none"
    return ("<p>As the coordinator recorded it (“-”: not recorded; the report cannot vouch for it then).</p>"
            + _table(["", "over the whole run"], rows, "transport")
            + _table(["launch from round", "TLS", "SuperNode authentication", "recorded by"], launches, "launches")
            + _table(["site that connected", "SuperNode id", "at the end"], sites, "sites-connected")
            + f"<p>SuperNode ids refused for this run: {html.escape(refused)}.</p>")


def _left_table(report: Mapping[str, Any]) -> str:
    cols = ("rounds_trained", "model_updates", "parameter_bytes", "losses_reported", "record_count", "test_metrics_reported")
    rows = [f"<tr><td>{html.escape(n)}</td>" + "".join(_cell(r[c], f"left_sites.{n}.{c}") for c in cols) + "</tr>"
            for n, r in sorted(report["left_sites"].items())]
    never = ", ".join(report["never_left_sites"])
    return (_table(["site", "rounds trained", "model updates sent", "parameter bytes sent", "losses reported (K per round)",
                    "record count", "rounds with test metrics reported"], rows, "left")
            + f"<p>Never sent by a site: {html.escape(never)}.</p>")


def _attack_tables(attack: Mapping[str, Any]) -> str:
    rows = []
    for key, label in (("run", "this run"), ("baseline", "baseline (no DP)")):
        for site, r in sorted(attack.get(key, {}).items()):
            k = f"attack.{key}.{site}"
            tpr = r["tpr_at_fpr"]
            cells = [_cell(r["auc"], f"{k}.auc"), f"<td>[{_fmt(r['auc_ci'][0])}, {_fmt(r['auc_ci'][1])}]</td>"]
            for f in ("0.01", "0.001"):
                cells += [_cell(tpr[f]["tpr"], f"{k}.tpr_at_fpr.{f}.tpr"), f"<td>[{_fmt(tpr[f]['ci'][0])}, {_fmt(tpr[f]['ci'][1])}]</td>"]
            cells += [_cell(r["epsilon_lower_bound"]["epsilon"], f"{k}.epsilon_lower_bound.epsilon"),
                      _cell(r["members"], f"{k}.members"), _cell(r["nonmembers"], f"{k}.nonmembers"),
                      _cell(r["deployed_model"], f"{k}.deployed_model")]
            rows.append(f"<tr><td>{label}</td><td>{html.escape(site)}</td>{''.join(cells)}</tr>")
    table = _table(["run", "site", "AUC", "95% CI", "TPR @ 1% FPR", "95% CI", "TPR @ 0.1% FPR", "95% CI", "empirical ε lower bound",
                    "members", "non-members", "deployed model"], rows, "attack")
    checks = "".join(
        f"<tr><td>{html.escape(s)}</td>{_cell(c['epsilon_lower_bound'], f'attack.checks.{s}.epsilon_lower_bound')}"
        f"{_cell(c['accounted_epsilon'], f'attack.checks.{s}.accounted_epsilon')}{_cell(c['consistent'], f'attack.checks.{s}.consistent')}</tr>"
        for s, c in sorted(attack.get("checks", {}).items()))
    return table + "<h3>Empirical ε lower bound vs accounted ε (this run)</h3>" + _table(
        ["site", "empirical ε lower bound (95%)", "accounted ε", "lower bound <= accounted"], [checks], "checks")


STYLE = """
body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.85em}
th,td{border:1px solid #bbb;padding:3px 6px;text-align:right}
th{background:#eee} td:first-child{text-align:left}
tr.fail{background:#fdd} tr.pass{background:#efe} tr.na{color:#777}
img.plot{max-width:100%;border:1px solid #ddd;margin:.5em 0}
code{font-size:.85em}
"""


LOADED_SCRIPT = (
    "<script>window.addEventListener('load',function(){var n=0;document.querySelectorAll('img.plot').forEach("
    "function(i){if(i.complete&&i.naturalWidth>0){n++;}});document.body.dataset.plotsLoaded=String(n);});</script>"
)
"""Inline (no network): marks ``<body data-plots-loaded="N">`` with the plots the browser decoded."""


def _embedded_json(report: Mapping[str, Any]) -> str:
    """The report as JSON that cannot close its ``<script>`` element (``</`` becomes the equivalent ``<\\/``)."""
    return json.dumps(report, sort_keys=True).replace("</", "<\\/")


def render(report: Mapping[str, Any]) -> str:
    """The whole report as one HTML document."""
    run = report["run"]
    dig = report["digests"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Privacy report: {html.escape(run['dir'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Privacy report</h1><p>Run <code>{html.escape(run['dir'])}</code>: {html.escape(str(run['algorithm']))} "
        f"(K = {html.escape(str(run['num_models']))}), {html.escape(str(run['rounds']))} rounds, sites "
        f"{html.escape(', '.join(run['sites']))}. Finished: {_fmt(run['finished'])}.</p>",
        "<h2>In plain words</h2>",
        "<ul id='summary'>" + "".join(f"<li>{html.escape(line)}</li>" for line in report.get("summary", [])) + "</ul>",
        "<h2>Policy compliance</h2>", _policy_table(report),
        "<h2>Transport</h2>", _transport_table(report),
        "<h2>Privacy budget per site</h2>",
        _img(epsilon_plot(report["privacy"]), "plot-epsilon", "ε spent per site over the rounds"),
        _privacy_tables(report["privacy"]),
        "<h2>What left each site</h2>", _left_table(report),
    ]
    if "attack" in report:
        parts += ["<h2>Empirical audit: loss-threshold membership inference</h2>",
                  "<p>Each site's deployed model; members = the site's training records, non-members = its held-out "
                  "test records; the attack guesses “member” when the record's loss is below a threshold. Intervals: "
                  "percentile bootstrap over records. ε lower bound: Clopper–Pearson, Bonferroni over thresholds.</p>",
                  _img(roc_plot(report["attack"]), "plot-roc", "attack ROC curves"), _attack_tables(report["attack"])]
    ck_rows = [f"<tr><td>{c['round']}</td><td><code>{html.escape(json.dumps(c['digests']))}</code></td>{_cell(c['verified'])}</tr>"
               for c in dig["checkpoints"]]
    parts += [
        "<h2>Matching this report to the models</h2>",
        f"<p>config digest: <code data-key='digests.config_digest'>{html.escape(str(dig['config_digest']))}</code><br>"
        f"models.safetensors SHA-256: <code data-key='digests.models_sha256'>{html.escape(str(dig['models_sha256']))}</code><br>"
        f"all digests recomputed and equal to the recorded ones: <strong>{_fmt(dig['verified'])}</strong></p>",
        _table(["checkpoint round", "SHA-256", "verified"], ck_rows, "digests"),
        '<script type="application/json" id="report-data">' + _embedded_json(report) + "</script>",
        LOADED_SCRIPT,
        "</body></html>",
    ]
    return "\n".join(parts)


def write(report: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``privacy_report.html`` and ``privacy_report.json`` into ``out_dir``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / "privacy_report.html", out / "privacy_report.json"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    html_path.write_text(render(report), encoding="utf-8")
    return html_path, json_path

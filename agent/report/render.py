"""ReportData -> one self-contained HTML file (PNG plots embedded as base64).

>>> from agent.report.model import ReportData
>>> html = render_html(ReportData(title="t", source="s", generated_at="now"))
>>> "no data yet" in html
True
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from agent.report import plots
from agent.report.model import ReportData
from storage.audits import clopper_pearson

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Panel:
    id: str
    title: str
    png: str | None          # base64 PNG, None -> "no data yet"
    note: str = ""


def pct(v: object, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{float(v):.{digits}%}"


def usd(v: object) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"${v:,.2f}" if v >= 1 else f"${v:.4f}"


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode("ascii") if png else None


def build_panels(d: ReportData, xlabel: str) -> list[Panel]:
    audits_n = sum(a.n for a in d.audits)
    audits_k = sum(a.disagreements for a in d.audits)
    lo, hi = clopper_pearson(audits_k, audits_n)   # the interval `status` shows
    audit_note = (f"All audits: {audits_k}/{audits_n} = {pct(audits_k / audits_n)} "
                  f"(exact 95% interval {pct(lo)}–{pct(hi)})"
                  + (f" against the promise ε = {pct(d.epsilon)}." if d.epsilon else ".")
                  if audits_n else "")
    cr = d.coverage_risk
    cr_note = f"{cr.source}" if cr else ""
    cm_note = d.confusion.source if d.confusion else ""
    last = d.spend[-1] if d.spend else None
    spend_note = ""
    if last and last.teacher_only_usd:
        spend_note = (f"{usd(last.teacher_usd)} spent vs {usd(last.teacher_only_usd)} "
                      f"teacher-only: {pct(1 - last.teacher_usd / last.teacher_only_usd)} saved.")
    return [
        Panel("routes", "Mail by route over time", _b64(plots.routes(d.routes, xlabel))),
        Panel("escalation", "Escalation rate", _b64(plots.escalation(d.routes, xlabel))),
        Panel("audits", "Audit disagreement", _b64(plots.audits(d.audits, d.epsilon, xlabel)),
              audit_note),
        Panel("coverage-risk", "Coverage–risk of the active model",
              _b64(plots.coverage_risk(cr, d.epsilon)), cr_note),
        Panel("confusion", "Confusion matrix", _b64(plots.confusion(d.confusion)), cm_note),
        Panel("spend", "Teacher spend and savings",
              _b64(plots.spend(d.spend, "emails decided")), spend_note),
        Panel("latency", "Latency percentiles", _b64(plots.latency(d.latency)),
              "; ".join(f"{s.name}: p50 {s.p50:.1f} ms, p99 {s.p99:.1f} ms" for s in d.latency)),
    ]


# Card captions where the summary key does not read well as it is (the value shows "$").
CAPTIONS = {"teacher_spend_estimated_usd": "teacher spend (estimated)",
            "teacher_spend_usd": "teacher spend", "teacher_only_usd": "teacher-only cost",
            "blended_usd": "cascade cost", "saved": "saved vs teacher-only"}


def _cards(d: ReportData) -> list[tuple[str, str]]:
    fmt = {"share": pct, "rate": pct, "usd": usd, "accuracy": pct, "coverage": pct,
           "risk": lambda v: pct(v, 2), "saved": pct}
    out = []
    for k, v in d.summary.items():
        f = next((f for suffix, f in fmt.items() if k.endswith(suffix)), None)
        out.append((CAPTIONS.get(k, k.replace("_", " ")), f(v) if f and v is not None else
                    ("-" if v is None else str(v))))
    return out


def render_html(d: ReportData, xlabel: str = "time") -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.globals.update(pct=pct, usd=usd)
    return env.get_template("report.html").render(d=d, cards=_cards(d),
                                                   panels=build_panels(d, xlabel))


def write_report(d: ReportData, out: Path, xlabel: str = "time") -> Path:
    """Render and write atomically; returns the path written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(render_html(d, xlabel), encoding="utf-8")
    tmp.replace(out)
    return out

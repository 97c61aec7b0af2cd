"""Collect ReportData from the database: decisions, model calls, model versions.

Only reads. The student's coverage-risk curve and the confusion matrix come from pairs
the log already holds: a student classify call and a teacher answer (escalation or
audit) for the same message. Escalated mail is where the student was unsure, so the
curve over all pairs is pessimistic; the model's own held-out curve is used instead
when its version row stores one (``metrics["coverage_risk"]``).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select

from agent.report.model import (
    AuditBucket, CoverageRisk, ReportData, RouteBucket, SpendPoint, confusion_from_pairs,
    coverage_risk_curve, percentiles)
from storage.db import Database
from storage.models import DecisionRow, Message, ModelCall, ModelVersion

# Bucket widths tried in order; the first giving at most MAX_BUCKETS buckets wins.
WIDTHS = [timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=1),
          timedelta(hours=6), timedelta(days=1), timedelta(days=7), timedelta(days=30)]
MAX_BUCKETS = 40


def _aware(t: datetime) -> datetime:
    # SQLite returns naive datetimes for timezone-aware columns; they were stored as UTC.
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _bucketer(times: list[datetime]):
    lo, hi = min(times), max(times)
    width = next((w for w in WIDTHS if (hi - lo) / w < MAX_BUCKETS), WIDTHS[-1])
    start = datetime.fromtimestamp(lo.timestamp() // width.total_seconds()
                                   * width.total_seconds(), tz=timezone.utc)
    n = int((hi - start) / width) + 1
    fmt = "%H:%M" if width < timedelta(days=1) and (hi - lo) < timedelta(days=1) else (
        "%m-%d %H:%M" if width < timedelta(days=1) else "%Y-%m-%d")
    labels = [(start + i * width).strftime(fmt) for i in range(n)]
    return (lambda t: min(n - 1, int((t - start) / width))), labels, width


def _category(output: Any) -> str | None:
    if isinstance(output, dict):
        c = output.get("category")
        return c if isinstance(c, str) else None
    return None


MIN_LIVE_PAIRS = 20


def _coverage_risk(version: str | None, metrics: dict, thresholds: dict,
                   pairs: list) -> CoverageRisk | None:
    """The active model's coverage-risk curve, from the best source there is.

    1. Live pairs of the active version (its classify call + a teacher answer on the same
       email), when there are enough; 2. the held-out evaluation stored with the version
       by the retrain (coverage at a few risks, and the operating point at its threshold);
       3. live pairs of any version.
    """
    mine = [(st.confidence or 0.0, _category(st.output) == ref) for st, ref in pairs
            if st.model_version == version]
    live_note = ("From logged pairs (student call + teacher answer on the same email); "
                 "escalations make it pessimistic.")
    if version and len(mine) >= MIN_LIVE_PAIRS:
        cov, risk = coverage_risk_curve(mine)
        return CoverageRisk(cov, risk, model_version=version, n=len(mine), source=live_note)
    held = metrics.get("holdout") if isinstance(metrics, dict) else None
    if version and isinstance(held, dict) and held.get("coverage_at_risk"):
        pts = sorted((float(c), float(r)) for r, c in held["coverage_at_risk"].items())
        op = None
        if held.get("coverage") is not None and held.get("selective_risk") is not None:
            op = (float(held["coverage"]), float(held["selective_risk"]))
            pts = sorted(set(pts) | {op})
        return CoverageRisk(tuple(c for c, _ in pts), tuple(r for _, r in pts),
                            operating_point=op, model_version=version,
                            n=int(held.get("n", 0)),
                            source="Held-out evaluation stored with the model at its retrain "
                                   "(coverage reachable at each risk; the dot is its threshold).")
    anyv = [(st.confidence or 0.0, _category(st.output) == ref) for st, ref in pairs]
    if anyv:
        cov, risk = coverage_risk_curve(anyv)
        return CoverageRisk(cov, risk, model_version=version or "all versions", n=len(anyv),
                            source=live_note + " All student versions together.")
    return None


def collect_from_db(db: Database, *, epsilon: float | None = None,
                    price_table: Any = None, title: str = "understudy report") -> ReportData:
    """Everything the report shows, from one database. Works on an empty one."""
    with db.session() as s:
        decisions = s.execute(select(
            DecisionRow.message_id, DecisionRow.source, DecisionRow.category,
            DecisionRow.created_at, DecisionRow.audited, Message.created_at,
        ).join(Message, Message.id == DecisionRow.message_id)
            .order_by(DecisionRow.created_at)).all()
        calls = s.execute(select(
            ModelCall.message_id, ModelCall.role, ModelCall.purpose, ModelCall.model_version,
            ModelCall.output, ModelCall.confidence, ModelCall.cost_usd, ModelCall.latency_ms,
            ModelCall.error, ModelCall.created_at,
        ).order_by(ModelCall.id)).all()
        active = s.scalars(select(ModelVersion).where(
            ModelVersion.status == "active", ModelVersion.kind == "classifier")
            .order_by(ModelVersion.promoted_at.desc())).first()
        active_info = None if active is None else (active.version, dict(active.metrics or {}),
                                                   dict(active.thresholds or {}))

    if active_info:
        # The promise the active model carries beats the configured target (the same
        # rule as `status`, agent.audit.promised_epsilon).
        from agent.audit import promised_epsilon

        epsilon = promised_epsilon(active_info[2], epsilon if epsilon is not None else 0.02)

    # Mail by route and audits, bucketed by decision time.
    decision_of = {m: cat for m, _, cat, *_ in decisions}
    routes: tuple[RouteBucket, ...] = ()
    audits: tuple[AuditBucket, ...] = ()
    audit_calls = [c for c in calls if c.role == "teacher" and c.purpose == "audit"
                   and c.error is None and c.message_id in decision_of]
    times = [_aware(d[3]) for d in decisions] + [_aware(c.created_at) for c in audit_calls]
    if times:
        at, labels, _ = _bucketer(times)
        counts = [[0, 0, 0] for _ in labels]
        for _, source, _, created, _, _ in decisions:
            counts[at(_aware(created))][{"student": 0, "teacher": 1}.get(source, 2)] += 1
        routes = tuple(RouteBucket(labels[i], *c) for i, c in enumerate(counts))
        ab = [[0, 0] for _ in labels]
        for c in audit_calls:
            i = at(_aware(c.created_at))
            ab[i][0] += 1
            # The daemon's audit rows say whether the two agreed (agent.audit.audit_output).
            agree = c.output.get("agree") if isinstance(c.output, dict) else None
            ab[i][1] += int(not agree if isinstance(agree, bool)
                            else _category(c.output) != decision_of[c.message_id])
        audits = tuple(AuditBucket(labels[i], n, k) for i, (n, k) in enumerate(ab))

    # Spend: cumulative teacher cost, against every decided email priced at the mean
    # cost of one teacher call (what teacher-only would have paid).
    teacher_calls = [c for c in calls if c.role == "teacher"]
    priced = [c.cost_usd for c in teacher_calls if c.cost_usd]
    mean_cost = sum(priced) / len(priced) if priced else 0.0
    estimated = False
    if teacher_calls and not priced and price_table is not None:
        # A teacher that bills nothing (recorded answers): price every call at the
        # teacher's planning estimate for emails of this size, so the panel still shows
        # what the cascade saves against Claude at the configured prices.
        from agent.teacher.pricing import estimate_cost

        with db.session() as s:
            avg = s.scalar(select(func.avg(func.length(Message.body_text)))) or 0.0
        mean_cost = estimate_cost(1, float(avg), price_table)
        estimated = True
    events = sorted([(_aware(d[3]), 0, 0.0) for d in decisions]
                    + [(_aware(c.created_at), 1, mean_cost if estimated else c.cost_usd or 0.0)
                       for c in teacher_calls], key=lambda e: (e[0], e[1]))
    spend_pts, emails, spent = [], 0, 0.0
    for t, kind, cost in events:
        if kind == 0:
            emails += 1
        spent += cost
        spend_pts.append(SpendPoint(emails, t.isoformat(), spent, emails * mean_cost))
    spend = tuple(spend_pts) if decisions and mean_cost else ()

    # Student vs teacher pairs on the same message (the student's latest classify call).
    student = {}
    for c in calls:
        if c.role == "student" and c.purpose == "classify" and c.error is None \
                and c.message_id is not None and _category(c.output):
            student[c.message_id] = c
    pairs = []
    for c in teacher_calls:
        st = student.get(c.message_id)
        ref = _category(c.output)
        if st is not None and ref and c.error is None:
            pairs.append((st, ref))
    version = active_info[0] if active_info else None
    cr = _coverage_risk(version, active_info[1] if active_info else {},
                        active_info[2] if active_info else {}, pairs)
    cm = confusion_from_pairs([(ref, _category(st.output)) for st, ref in pairs],
                              source="Student's category vs the teacher's on the same email "
                                     "(escalations and audits).")

    lat = []
    for name, pred in (("student classify", lambda c: c.role == "student" and c.purpose == "classify"),
                       ("student draft", lambda c: c.role == "student" and c.purpose == "draft"),
                       ("teacher", lambda c: c.role == "teacher")):
        st = percentiles([c.latency_ms for c in calls if pred(c) and c.error is None
                          and c.latency_ms], name)
        if st:
            lat.append(st)
    e2e = percentiles([(_aware(d[3]) - _aware(d[5])).total_seconds() * 1000 for d in decisions
                       if d[5] is not None], "stored → decided")
    if e2e:
        lat.append(e2e)

    n = len(decisions)
    by_source = {k: sum(1 for d in decisions if d[1] == k) for k in ("student", "teacher", "human")}
    a_n = sum(a.n for a in audits)
    a_k = sum(a.disagreements for a in audits)
    total_spend = (len(teacher_calls) * mean_cost if estimated
                   else sum(c.cost_usd or 0.0 for c in teacher_calls))
    summary = {
        "emails_decided": n,
        "student_alone_share": by_source["student"] / n if n else None,
        "escalation_rate": by_source["teacher"] / n if n else None,
        "audits": a_n,
        "audit_disagreement_rate": a_k / a_n if a_n else None,
        ("teacher_spend_estimated_usd" if estimated else "teacher_spend_usd"): total_spend,
        "teacher_only_usd": n * mean_cost if mean_cost else None,
        "saved": 1 - total_spend / (n * mean_cost) if n and mean_cost else None,
        "active_model": version or "none (cold start)",
    }
    if a_k:   # whom the disagreements a person settled proved right (review settle)
        from storage.audits import audit_summary

        st = audit_summary(db, epsilon=epsilon or 0.0)["settled"]
        summary["disputes_settled"] = (
            f"{st['n']} of {a_k}: student right {st['student_right']}, teacher right "
            f"{st['teacher_right']}, neither {st['neither']}")
    return ReportData(
        title=title, source=f"database {db.redacted_url()}",
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        epsilon=epsilon, summary=summary, routes=routes, audits=audits, spend=spend,
        coverage_risk=cr, confusion=cm, latency=tuple(lat),
        notes=(f"The teacher billed nothing (recorded answers): spend is estimated at "
               f"${mean_cost:.4f} per call, the teacher's planning estimate at the configured "
               "prices.",) if estimated else ())

"""Replay a labelled stream through the real cascade, as if the emails were arriving.

Per batch of arriving emails (no IMAP) the messages are stored ``pending`` and one pass
of the daemon's own :class:`agent.worker.TriageWorker` decides them: claim, classify with
the active student, route with the real router, the recorded teacher for escalations and
audits, commit one decision per email with its model_calls rows. Every ``retrain_every``
emails the real retraining runs on what the SQL log holds (real promotion gate); the
worker's hot-reloading student picks a promoted version up on its next pass, as in the
daemon. Teacher calls are priced by :class:`PricedTeacher` at the configured Claude
prices; the student costs ~0.

The components are passed in, so this module holds the loop and the accounting only;
``agent.simulate.build`` turns Settings into them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sqlalchemy import select

from agent.report.model import confusion_from_pairs, coverage_risk_curve, percentiles
from agent.router import Router, thresholds_of
from agent.simulate.cost import CostModel
from agent.teacher.records import TeacherRecord
from storage.db import Database
from storage.models import DecisionRow, Message, ModelCall
from storage.types import Email, TeacherResult

WORKER = "simulate"


class SimulationError(RuntimeError):
    """The replay cannot go on; the message says what to fix."""


@dataclass(frozen=True)
class RetrainOutcome:
    promoted: bool
    candidate_version: str | None
    n_examples: int
    gate_reason: str | None
    seconds: float
    error: str | None = None


class PricedTeacher:
    """A Teacher that prices another's answers as the Claude backend would be billed.

    The recorded teacher costs nothing; this wrapper fills in the tokens and the cost
    a real call for the same email would have (see :class:`CostModel`), so the model_calls
    rows, the spend cap arithmetic and the report carry realistic figures.
    """

    def __init__(self, inner: Any, cost: CostModel):
        self.inner, self.cost = inner, cost
        self.model_id = getattr(inner, "model_id", "teacher")
        self.cache_warm = False
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0

    def label(self, emails: Sequence[Email]) -> list[TeacherResult]:
        out = []
        for e, r in zip(emails, self.inner.label(emails)):
            if not r.ok:
                out.append(r)
                continue
            c = self.cost.call(e.subject, e.new_text or e.text,
                               {"from": e.from_addr, "category_probs": r.category_probs,
                                "draft": r.draft, "needs_reply": r.needs_reply},
                               cached=self.cache_warm)
            self.cache_warm = True
            self.calls += 1
            self.input_tokens += c.input_tokens + c.cache_read_tokens + c.cache_write_tokens
            self.output_tokens += c.output_tokens
            out.append(dataclasses.replace(
                r, input_tokens=c.input_tokens, output_tokens=c.output_tokens,
                cache_read_tokens=c.cache_read_tokens, cache_write_tokens=c.cache_write_tokens,
                cost_usd=c.usd))
        return out


@dataclass
class _Tally:
    """Running counts; ``windows`` get the difference every ``window`` emails."""

    emails: int = 0
    student: int = 0
    teacher: int = 0
    escalations: int = 0
    audits: int = 0
    audit_disagreements: int = 0
    correct: int = 0
    blended_usd: float = 0.0
    teacher_only_usd: float = 0.0


def _store(db: Database, recs: Sequence[TeacherRecord]) -> list[int]:
    """Store arriving messages ``pending``, as ingest would (store before any model sees them).

    The record id becomes the Message-ID, which the recorded teacher matches on.
    """
    with db.session() as s:
        rows = [Message(
            external_id=r.id, message_id=r.id,
            content_hash=hashlib.sha256(f"{r.subject}\n{r.body}".encode()).hexdigest(),
            subject=r.subject or "", from_addr=r.from_addr or "", body_text=r.body,
            new_text=r.body, state="pending") for r in recs]
        s.add_all(rows)
        s.flush()
        return [m.id for m in rows]


class Replay:
    """One replay: feed records in order, retrain every N, evaluate on the test records."""

    def __init__(self, db: Database, *, worker: Any, student: Callable[[], Any],
                 teacher: PricedTeacher, cost: CostModel, router: Router,
                 retrain: Callable[[str], Any], retrain_every: int,
                 window: int | None = None, progress: Callable[[str], None] = lambda _l: None,
                 checkpoint: Callable[[dict], None] | None = None):
        self.db, self.worker, self.student, self.teacher = db, worker, student, teacher
        self.cost, self.router, self.retrain = cost, router, retrain
        self.retrain_every = retrain_every
        self.batch = max(1, min(worker.batch_size, retrain_every))
        self.window = window or max(10, retrain_every // 4)
        self.progress = progress
        # Called with a partial result after every retrain, so a long replay that is
        # stopped early still leaves its curve so far on disk.
        self.checkpoint = checkpoint
        self._test_n = 0
        self.tally = _Tally()
        self._window_start = _Tally()
        self.windows: list[dict] = []
        self.curve: list[dict] = []
        self._only_cache_warm = False

    def _classifier(self):
        return self.student().classifier

    # ---- the stream --------------------------------------------------------------------
    def run(self, stream: Sequence[TeacherRecord], test: Sequence[TeacherRecord]) -> dict:
        t0 = self._t0 = time.perf_counter()
        self._test_n = len(test)
        pos = 0
        while pos < len(stream):
            # A batch never straddles a retrain point or a window end.
            room = min(self.retrain_every - self.tally.emails % self.retrain_every,
                       self.window - self.tally.emails % self.window, self.batch)
            self._triage(stream[pos:pos + room])
            pos += room
            if self.tally.emails % self.window == 0:
                self._close_window()
            if self.tally.emails % self.retrain_every == 0:
                self._retrain_point(test)
        if self.tally.emails > self._window_start.emails:
            self._close_window()
        final = self.evaluate(test)
        return self._result(test, final, time.perf_counter() - t0)

    def _triage(self, recs: Sequence[TeacherRecord]) -> None:
        ids = _store(self.db, recs)
        r = self.worker.run_once()
        if r.claimed != len(ids) or r.waiting:
            raise SimulationError(
                f"triage pass claimed {r.claimed} of {len(ids)} emails, {r.waiting} waiting for "
                "the teacher: every stream record must be answerable by the recorded teacher "
                "(ids, bodies) and the work dir must be fresh")
        with self.db.session() as s:
            got = dict(s.execute(select(DecisionRow.message_id, DecisionRow.category)
                                 .where(DecisionRow.message_id.in_(ids))).all())
        k = self.tally
        k.emails += len(ids)
        k.student += r.routes.get("student", 0) + r.routes.get("student_audited", 0)
        k.teacher += r.routes.get("teacher", 0)
        k.escalations += r.routes.get("teacher", 0)
        k.audits += r.audits
        k.audit_disagreements += r.audit_disagreements
        k.blended_usd += r.teacher_cost_usd
        k.correct += sum(1 for mid, rec in zip(ids, recs) if got.get(mid) == rec.category)
        for rec in recs:
            c = self.cost.call(rec.subject or "", rec.body, rec.to_dict(),
                               cached=self._only_cache_warm)
            self._only_cache_warm = True
            k.teacher_only_usd += c.usd

    def _close_window(self) -> None:
        a, b = self._window_start, self.tally
        clf = self._classifier()
        self.windows.append({
            "start": a.emails, "end": b.emails, "student": b.student - a.student,
            "teacher": b.teacher - a.teacher, "audits": b.audits - a.audits,
            "audit_disagreements": b.audit_disagreements - a.audit_disagreements,
            "blended_usd": b.blended_usd, "teacher_only_usd": b.teacher_only_usd,
            "correct": b.correct - a.correct,
            "active_version": getattr(clf, "version", None)})
        self._window_start = dataclasses.replace(b)

    # ---- retraining --------------------------------------------------------------------
    def _retrain_point(self, test: Sequence[TeacherRecord]) -> None:
        t0 = time.perf_counter()
        try:
            out = _outcome(self.retrain("simulate"), time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a failed retrain keeps the old student, as in the daemon
            out = RetrainOutcome(False, None, 0, None, time.perf_counter() - t0,
                                 error=f"{type(e).__name__}: {e}")
        # The worker's student reloads a promoted version on its next call (hot reload).
        clf = self._classifier()
        ev = self.evaluate(test, full=False) if clf else {}
        k = self.tally
        point = {
            "emails_seen": k.emails, "n_examples": out.n_examples,
            "candidate_version": out.candidate_version, "promoted": out.promoted,
            "gate_reason": out.gate_reason, "error": out.error,
            "retrain_seconds": round(out.seconds, 2),
            "active_version": getattr(clf, "version", None),
            "teacher_calls": k.teacher + k.audits, "teacher_share": (k.teacher + k.audits) / k.emails,
            "blended_usd": k.blended_usd, "teacher_only_usd": k.teacher_only_usd,
            "stream_accuracy": k.correct / k.emails,
            "test_coverage": ev.get("coverage"), "test_risk": ev.get("risk"),
            "test_accuracy": ev.get("accuracy"),
            "test_hindsight_coverage": ev.get("hindsight_coverage"),
        }
        self.curve.append(point)
        self.progress(
            f"[simulate] retrain {len(self.curve)} at {k.emails} emails: "
            f"{'promoted ' + str(out.candidate_version) if out.promoted else 'kept'} "
            f"({out.gate_reason or out.error or ''}; {out.seconds:.0f}s, {out.n_examples} labels); "
            f"teacher so far {point['teacher_share']:.1%}, test coverage "
            f"{_pct(point['test_coverage'])} at risk {_pct(point['test_risk'], 2)} "
            f"(in hindsight {_pct(point['test_hindsight_coverage'])})")
        if self.checkpoint is not None:
            partial = self._result([None] * self._test_n, ev, time.perf_counter() - self._t0)
            partial["partial"] = True
            self.checkpoint(partial)

    # ---- evaluation on the held-out test records ---------------------------------------
    def evaluate(self, test: Sequence[TeacherRecord], full: bool = True) -> dict:
        """The active student alone and the cascade (student, else teacher) on ``test``."""
        from distill.thresholds import coverage_at_risk

        n = len(test)
        clf = self._classifier()
        if clf is None or n == 0:
            return {"n": n, "coverage": 0.0, "risk": None, "accuracy": None,
                    "cascade_accuracy": 1.0 if n else None, "version": None}
        emails = [Email(id=r.id, subject=r.subject or "", text=r.body, new_text=r.body,
                        from_addr=r.from_addr or "") for r in test]
        triages = clf.classify(emails)
        thresholds = thresholds_of(getattr(clf, "thresholds", None))
        # The same routing decision the worker makes (drafting is off in a replay).
        alone = [not self.router.route(e, t, None, thresholds).escalate
                 for e, t in zip(emails, triages)]
        correct = [t.category == r.category for t, r in zip(triages, test)]
        handled = sum(alone)
        errors = sum(1 for a, c in zip(alone, correct) if a and not c)
        # The teacher's answers are the records here, so an escalated email is right.
        cascade = sum(1 for a, c in zip(alone, correct) if (c if a else True))
        conf = [float(t.confidence.get("category", 0.0)) for t in triages]
        # What a threshold picked in hindsight on this very file could hand the student at
        # the same target risk: the model's limit, next to what its certificate allows.
        cat = (getattr(clf, "thresholds", None) or {}).get("category")
        eps = cat.get("epsilon") if isinstance(cat, dict) else None
        out = {"n": n, "version": clf.version, "coverage": handled / n,
               "risk": errors / handled if handled else 0.0, "accuracy": sum(correct) / n,
               "cascade_accuracy": cascade / n, "handled": handled, "errors": errors,
               "hindsight_coverage": (None if eps is None
                                      else coverage_at_risk(conf, correct, float(eps))),
               "epsilon": eps}
        if full:
            cov, risk = coverage_risk_curve(list(zip(conf, correct)))
            out["coverage_risk"] = {"coverage": list(cov), "risk": list(risk), "n": n}
            out["operating_point"] = [out["coverage"], out["risk"]]
            cm = confusion_from_pairs([(r.category, t.category) for r, t in zip(test, triages)])
            out["confusion"] = ({"labels": list(cm.labels), "matrix": [list(x) for x in cm.matrix]}
                                if cm else None)
        return out

    # ---- the result ---------------------------------------------------------------------
    def _result(self, test, final: dict, seconds: float) -> dict:
        k = self.tally
        calls = k.teacher + k.audits
        n = max(1, k.emails)
        teacher_acc = 1.0   # the recorded teacher answers with the records themselves
        with self.db.session() as s:
            student_ms = list(s.scalars(select(ModelCall.latency_ms).where(
                ModelCall.role == "student", ModelCall.purpose == "classify")))
        lat = {}
        st = percentiles(student_ms, "student classify")
        if st:
            lat[st.name] = {"n": st.n, "p50": round(st.p50, 3), "p90": round(st.p90, 3),
                            "p99": round(st.p99, 3)}
        t = self.teacher
        return {
            "n_stream": k.emails, "n_test": len(test), "retrain_every": self.retrain_every,
            "elapsed_s": round(seconds, 1),
            "teacher": {"calls": calls, "escalations": k.escalations, "audits": k.audits,
                        "share": calls / n, "escalation_share": k.escalations / n},
            "cost": {"blended_usd": round(k.blended_usd, 6),
                     "teacher_only_usd": round(k.teacher_only_usd, 6), "student_usd": 0.0,
                     "ratio": k.blended_usd / k.teacher_only_usd if k.teacher_only_usd else None,
                     "mean_input_tokens": round(t.input_tokens / t.calls) if t.calls else None,
                     "mean_output_tokens": round(t.output_tokens / t.calls) if t.calls else None},
            "cascade": {"stream_accuracy": k.correct / n, "teacher_accuracy": teacher_acc,
                        "stream_relative": k.correct / n / teacher_acc,
                        "test_accuracy": final.get("cascade_accuracy"),
                        "test_relative": (final.get("cascade_accuracy") or 0.0) / teacher_acc},
            "student": {"version": final.get("version"), "test_coverage": final.get("coverage"),
                        "test_risk": final.get("risk"), "test_accuracy": final.get("accuracy"),
                        "test_hindsight_coverage": final.get("hindsight_coverage"),
                        "epsilon": final.get("epsilon"), "cost_usd": 0.0},
            "audits": {"n": k.audits, "disagreements": k.audit_disagreements,
                       "rate": k.audit_disagreements / k.audits if k.audits else None},
            "curve": self.curve, "windows": self.windows,
            "test_eval": {key: final.get(key) for key in
                          ("coverage_risk", "operating_point", "confusion")},
            "latency": lat,
        }


def _outcome(r: Any, seconds: float) -> RetrainOutcome:
    """distill.pipeline's result, whatever its exact shape, as the fields the curve needs."""
    get = (lambda k: r.get(k)) if isinstance(r, dict) else (lambda k: getattr(r, k, None))
    return RetrainOutcome(
        promoted=bool(get("promoted")),
        candidate_version=get("candidate_version") or get("version"),
        n_examples=int(get("n_examples") or 0),
        gate_reason=get("gate_reason") or get("reason"),
        seconds=seconds, error=get("error"))


def _pct(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}%}"

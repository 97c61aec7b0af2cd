"""Replay a labelled stream through the real cascade, as if the emails were arriving.

Per batch of arriving emails (no IMAP): store the messages, classify them with the active
student, route them with the real :class:`agent.router.Router`, ask the recorded teacher
about escalations and audits, and commit one decision per email with its model_calls rows
through the daemon's own ``storage.work.commit_decision``. Every ``retrain_every`` emails
the real retraining runs on what the SQL log holds (``retrain``, the real promotion gate),
and a promoted student takes over at once, as the daemon's hot reload would. Teacher calls
are priced by :class:`agent.simulate.cost.CostModel`; the student costs ~0.

The components are passed in (``Replay(...)``), so this module holds the loop and the
accounting only; ``agent.simulate.build`` turns Settings into them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from agent.audit import audit_output
from agent.report.model import confusion_from_pairs, coverage_risk_curve, percentiles
from agent.router import Route, Router, thresholds_of
from agent.simulate.cost import CostModel
from agent.teacher.records import TeacherRecord
from storage.db import Database
from storage.models import Message
from storage.types import Email, TeacherResult, Triage
from storage.calls import record_call, record_teacher_result
from storage.work import CallWriter, commit_decision, mark_acted

WORKER = "simulate"


class SimulationError(RuntimeError):
    """The replay cannot go on; the message says what to fix."""


@dataclass(frozen=True)
class Student:
    """What the replay needs of the active student: its classify call and thresholds."""

    version: str
    classify: Callable[[Sequence[Email]], list[Triage]]
    thresholds: dict[str, Any]
    model_id: str = "student"


@dataclass(frozen=True)
class RetrainOutcome:
    promoted: bool
    candidate_version: str | None
    n_examples: int
    gate_reason: str | None
    seconds: float
    error: str | None = None


@dataclass
class _Tally:
    """Running counts; ``windows`` get a copy every ``window`` emails."""

    emails: int = 0
    student: int = 0
    teacher: int = 0
    escalations: int = 0
    audits: int = 0
    audit_disagreements: int = 0
    correct: int = 0
    blended_usd: float = 0.0
    teacher_only_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0


def _email(mid: int, rec: TeacherRecord) -> Email:
    return Email(id=str(mid), subject=rec.subject or "", text=rec.body, new_text=rec.body,
                 from_addr=rec.from_addr or "", message_id=f"<{rec.id}@simulate.invalid>",
                 db_id=mid)


def _store(db: Database, recs: Sequence[TeacherRecord]) -> list[int]:
    """Store arriving messages, already claimed by the replay's worker (store before acting)."""
    now = datetime.now(timezone.utc)
    with db.session() as s:
        rows = [Message(
            external_id=r.id, message_id=f"<{r.id}@simulate.invalid>",
            content_hash=hashlib.sha256(f"{r.subject}\n{r.body}".encode()).hexdigest(),
            subject=r.subject or "", from_addr=r.from_addr or "", body_text=r.body,
            new_text=r.body, state="claimed", claimed_by=WORKER, claimed_at=now,
            internal_date=now) for r in recs]
        s.add_all(rows)
        s.flush()
        return [m.id for m in rows]


def _student_call(t: Triage, student: Student, escalated: bool) -> CallWriter:
    """A model_calls writer for one student classification (storage.work's CallWriter)."""
    def write(session, message_id: int | None) -> int:
        return record_call(
            session, message_id=message_id, role="student", purpose="classify", backend="torch",
            model_id=student.model_id, model_version=t.model_version or student.version,
            output={"category": t.category, "priority": t.priority, "needs_reply": t.needs_reply},
            probs=dict(t.category_probs), confidence=t.confidence.get("category"),
            escalated=escalated, latency_ms=float(t.latency_ms or 0.0))
    return write


def _teacher_label(r: TeacherResult) -> CallWriter:
    def write(session, message_id: int | None) -> int:
        return record_teacher_result(session, r, message_id=message_id, purpose="label",
                                     escalated=True)
    return write


def _teacher_audit(r: TeacherResult, t: Triage, version: str) -> CallWriter:
    """The audit row as the daemon writes it: the teacher's answer plus the agreement."""
    answer = {"priority": r.priority, "needs_reply": r.needs_reply, "draft": r.draft,
              "rationale": r.rationale}

    def write(session, message_id: int | None) -> int:
        probs = dict(r.category_probs) if r.category_probs else None
        return record_call(
            session, message_id=message_id, role="teacher", purpose="audit",
            backend=r.backend or "recorded", model_id=r.model_id, model_version=r.model_id,
            input_digest=r.input_digest, output=audit_output(version, t.category, r.category,
                                                             answer),
            probs=probs, confidence=max(probs.values()) if probs else None, escalated=False,
            input_tokens=r.input_tokens, output_tokens=r.output_tokens,
            cache_read_tokens=r.cache_read_tokens, cache_write_tokens=r.cache_write_tokens,
            cost_usd=r.cost_usd, latency_ms=r.latency_ms)
    return write


class Replay:
    """One replay: feed records in order, retrain every N, evaluate on the test records."""

    def __init__(self, db: Database, *, router: Router, teacher, cost: CostModel,
                 load_student: Callable[[Database], Student | None],
                 retrain: Callable[[Database], RetrainOutcome], retrain_every: int,
                 triage_batch: int = 32, window: int | None = None,
                 progress: Callable[[str], None] = lambda _line: None):
        self.db, self.router, self.teacher, self.cost = db, router, teacher, cost
        self.load_student, self.retrain = load_student, retrain
        self.retrain_every = retrain_every
        self.triage_batch = max(1, min(triage_batch, retrain_every))
        self.window = window or max(10, retrain_every // 4)
        self.progress = progress
        self.tally = _Tally()
        self.windows: list[dict] = []
        self._window_start = _Tally()
        self.curve: list[dict] = []
        self.student_ms: list[float] = []
        self.teacher_ms: list[float] = []
        self._teacher_cache_warm = False
        self._only_cache_warm = False
        self.student: Student | None = None

    # ---- the stream --------------------------------------------------------------------
    def run(self, stream: Sequence[TeacherRecord], test: Sequence[TeacherRecord]) -> dict:
        t0 = time.perf_counter()
        self.student = self.load_student(self.db)
        for start in range(0, len(stream), self.triage_batch):
            batch = stream[start:start + self.triage_batch]
            # Batches never straddle a retrain point, so retraining happens exactly every N.
            room = self.retrain_every - (self.tally.emails % self.retrain_every)
            for chunk in (batch[:room], batch[room:]):
                if chunk:
                    self._triage(chunk)
                    if self.tally.emails % self.retrain_every == 0:
                        self._retrain_point(test)
        if self.tally.emails > self._window_start.emails:
            self._close_window()
        final = self.evaluate(test)
        return self._result(stream, test, final, time.perf_counter() - t0)

    def _triage(self, recs: Sequence[TeacherRecord]) -> None:
        ids = _store(self.db, recs)
        emails = [_email(m, r) for m, r in zip(ids, recs)]
        student = self.student
        triages: list[Triage | None] = [None] * len(emails)
        if student is not None:
            triages = list(student.classify(emails))
            self.student_ms += [float(t.latency_ms or 0.0) for t in triages]
        thresholds = thresholds_of(student.thresholds) if student else {}
        routes: list[Route] = [self.router.route(e, t, None, thresholds)
                               for e, t in zip(emails, triages)]
        asks = [i for i, r in enumerate(routes) if r.escalate or r.audit]
        answers = dict(zip(asks, self._ask([recs[i] for i in asks], [emails[i] for i in asks])))
        for i, (mid, rec, t, route) in enumerate(zip(ids, recs, triages, routes)):
            self._decide(mid, rec, t, route, answers.get(i))
        self._tick_windows(len(recs))

    def _ask(self, recs: Sequence[TeacherRecord], emails: Sequence[Email]) -> list[TeacherResult]:
        if not emails:
            return []
        t0 = time.perf_counter()
        results = self.teacher.label([dataclasses.replace(e, id=r.id)
                                      for e, r in zip(emails, recs)])
        ms = (time.perf_counter() - t0) * 1000 / len(emails)
        priced = []
        for rec, res in zip(recs, results):
            c = self.cost.call(rec.subject or "", rec.body, rec.to_dict(),
                               cached=self._teacher_cache_warm)
            self._teacher_cache_warm = True
            self.teacher_ms.append(ms)
            priced.append(dataclasses.replace(
                res, input_tokens=c.input_tokens, output_tokens=c.output_tokens,
                cache_read_tokens=c.cache_read_tokens, cache_write_tokens=c.cache_write_tokens,
                cost_usd=c.usd))
        return priced

    def _decide(self, mid: int, rec: TeacherRecord, t: Triage | None, route: Route,
                answer: TeacherResult | None) -> None:
        k = self.tally
        student = self.student
        calls: list[CallWriter] = []
        if t is not None and student is not None:
            calls.append(_student_call(t, student, route.escalate))
        deciding = 0 if calls else None
        if route.escalate:
            if answer is None or not answer.ok:
                raise SimulationError(f"the recorded teacher has no usable answer for record "
                                      f"{rec.id}: {answer.error if answer else 'none'}")
            calls.append(_teacher_label(answer))
            deciding = len(calls) - 1
            decision = dict(source="teacher", category=answer.category,
                            priority=answer.priority or "normal",
                            needs_reply=bool(answer.needs_reply), rationale=answer.rationale,
                            model_version=answer.model_id, escalated=True, audited=False,
                            confidence={"category": max(answer.category_probs.values())}
                            if answer.category_probs else {})
            k.teacher += 1
            k.escalations += 1
        else:
            assert t is not None and student is not None
            decision = dict(source="student", category=t.category, priority=t.priority,
                            needs_reply=t.needs_reply, confidence=dict(t.confidence),
                            model_version=t.model_version or student.version, escalated=False,
                            audited=route.audit)
            k.student += 1
            if route.audit and answer is not None and answer.ok:
                agree = answer.category == t.category
                calls.append(_teacher_audit(answer, t, t.model_version or student.version))
                k.audits += 1
                k.audit_disagreements += int(not agree)
        if answer is not None:
            k.blended_usd += answer.cost_usd
            k.input_tokens += answer.input_tokens + answer.cache_read_tokens \
                + answer.cache_write_tokens
            k.output_tokens += answer.output_tokens
        only = self.cost.call(rec.subject or "", rec.body, rec.to_dict(),
                              cached=self._only_cache_warm)
        self._only_cache_warm = True
        k.teacher_only_usd += only.usd
        k.correct += int(decision["category"] == rec.category)
        k.emails += 1
        if not commit_decision(self.db, mid, WORKER, decision=decision, calls=calls,
                               deciding_call=deciding):
            raise SimulationError(f"message {mid} was already decided: the work dir must be "
                                  "fresh (pass an empty --work-dir)")
        mark_acted(self.db, mid, WORKER)

    def _tick_windows(self, n: int) -> None:
        # Windows close on multiples of ``window``; a batch may span a boundary only at its
        # end because triage_batch <= retrain_every and windows divide evenly by design.
        if self.tally.emails // self.window > self._window_start.emails // self.window:
            self._close_window()

    def _close_window(self) -> None:
        a, b = self._window_start, self.tally
        self.windows.append({
            "start": a.emails, "end": b.emails, "student": b.student - a.student,
            "teacher": b.teacher - a.teacher, "audits": b.audits - a.audits,
            "audit_disagreements": b.audit_disagreements - a.audit_disagreements,
            "blended_usd": b.blended_usd, "teacher_only_usd": b.teacher_only_usd,
            "correct": b.correct - a.correct,
            "active_version": self.student.version if self.student else None})
        self._window_start = dataclasses.replace(b)

    # ---- retraining --------------------------------------------------------------------
    def _retrain_point(self, test: Sequence[TeacherRecord]) -> None:
        out = self.retrain(self.db)
        if out.promoted:
            self.student = self.load_student(self.db)
        ev = self.evaluate(test, full=False) if self.student else {}
        k = self.tally
        point = {
            "emails_seen": k.emails, "n_examples": out.n_examples,
            "candidate_version": out.candidate_version, "promoted": out.promoted,
            "gate_reason": out.gate_reason, "error": out.error,
            "retrain_seconds": round(out.seconds, 2),
            "active_version": self.student.version if self.student else None,
            "teacher_calls": k.teacher + k.audits, "teacher_share": (k.teacher + k.audits) / k.emails,
            "blended_usd": k.blended_usd, "teacher_only_usd": k.teacher_only_usd,
            "stream_accuracy": k.correct / k.emails,
            "test_coverage": ev.get("coverage"), "test_risk": ev.get("risk"),
            "test_accuracy": ev.get("accuracy"),
        }
        self.curve.append(point)
        self.progress(
            f"[simulate] retrain {len(self.curve)} at {k.emails} emails: "
            f"{'promoted ' + str(out.candidate_version) if out.promoted else 'kept'} "
            f"({out.gate_reason or out.error or ''}; {out.seconds:.0f}s, {out.n_examples} labels); "
            f"teacher so far {point['teacher_share']:.1%}, test coverage "
            f"{_pct(point['test_coverage'])} at risk {_pct(point['test_risk'], 2)}")

    # ---- evaluation on the held-out test records ---------------------------------------
    def evaluate(self, test: Sequence[TeacherRecord], full: bool = True) -> dict:
        """The active student alone and the cascade (student, else teacher) on ``test``."""
        n = len(test)
        if self.student is None or n == 0:
            return {"n": n, "coverage": 0.0, "risk": None, "accuracy": None,
                    "cascade_accuracy": 1.0 if n else None, "version": None}
        emails = [Email(id=r.id, subject=r.subject or "", text=r.body, new_text=r.body,
                        from_addr=r.from_addr or "") for r in test]
        triages = self.student.classify(emails)
        thresholds = thresholds_of(self.student.thresholds)
        alone = [not self.router.classifier_clears(t, thresholds) for t in triages]
        correct = [t.category == r.category for t, r in zip(triages, test)]
        handled = sum(alone)
        errors = sum(1 for a, c in zip(alone, correct) if a and not c)
        # The teacher's answers are the records here, so an escalated email is right.
        cascade = sum(1 for a, c in zip(alone, correct) if (c if a else True))
        out = {"n": n, "version": self.student.version, "coverage": handled / n,
               "risk": errors / handled if handled else 0.0, "accuracy": sum(correct) / n,
               "cascade_accuracy": cascade / n, "handled": handled, "errors": errors}
        if full:
            conf = [float(t.confidence.get("category", 0.0)) for t in triages]
            cov, risk = coverage_risk_curve(list(zip(conf, correct)))
            out["coverage_risk"] = {"coverage": list(cov), "risk": list(risk), "n": n}
            out["operating_point"] = [out["coverage"], out["risk"]]
            cm = confusion_from_pairs([(r.category, t.category) for r, t in zip(test, triages)])
            out["confusion"] = ({"labels": list(cm.labels), "matrix": [list(x) for x in cm.matrix]}
                                if cm else None)
        return out

    # ---- the result ---------------------------------------------------------------------
    def _result(self, stream, test, final: dict, seconds: float) -> dict:
        k = self.tally
        calls = k.teacher + k.audits
        n = max(1, k.emails)
        teacher_acc = 1.0   # the recorded teacher answers with the records themselves
        lat = {}
        for name, xs in (("student classify", self.student_ms), ("teacher (recorded)", self.teacher_ms)):
            st = percentiles(xs, name)
            if st:
                lat[name] = {"n": st.n, "p50": round(st.p50, 3), "p90": round(st.p90, 3),
                             "p99": round(st.p99, 3)}
        return {
            "n_stream": k.emails, "n_test": len(test), "retrain_every": self.retrain_every,
            "risk": None, "elapsed_s": round(seconds, 1),
            "teacher": {"calls": calls, "escalations": k.escalations, "audits": k.audits,
                        "share": calls / n, "escalation_share": k.escalations / n},
            "cost": {"blended_usd": round(k.blended_usd, 6),
                     "teacher_only_usd": round(k.teacher_only_usd, 6),
                     "student_usd": 0.0,
                     "ratio": k.blended_usd / k.teacher_only_usd if k.teacher_only_usd else None,
                     "mean_input_tokens": round(k.input_tokens / calls) if calls else None,
                     "mean_output_tokens": round(k.output_tokens / calls) if calls else None},
            "cascade": {"stream_accuracy": k.correct / n, "teacher_accuracy": teacher_acc,
                        "stream_relative": k.correct / n / teacher_acc,
                        "test_accuracy": final.get("cascade_accuracy"),
                        "test_relative": (final.get("cascade_accuracy") or 0.0) / teacher_acc},
            "student": {"version": final.get("version"), "test_coverage": final.get("coverage"),
                        "test_risk": final.get("risk"), "test_accuracy": final.get("accuracy"),
                        "cost_usd": 0.0},
            "audits": {"n": k.audits, "disagreements": k.audit_disagreements,
                       "rate": k.audit_disagreements / k.audits if k.audits else None},
            "curve": self.curve, "windows": self.windows,
            "test_eval": {key: final.get(key) for key in
                          ("coverage_risk", "operating_point", "confusion")},
            "latency": lat,
        }


def _pct(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}%}"

"""The triage worker: one pass = claim a batch, classify, draft, route, commit, then act.

Order matters and is the crash-safety argument:

1. claim a batch (storage.work.claim_batch: each email to one worker);
2. classify with the active student; draft (student) when a reply is needed and the
   classification would let the student handle the email;
3. route (agent.router); the teacher labels the escalations and, in shadow, the audit
   sample, in one call;
4. commit, per email, the one decision with its model_calls rows and draft row
   (storage.work.commit_decision: refuses a second decision);
5. only then act on the mailbox: keywords, student draft appended to Drafts (guarded by
   the Message-ID committed in step 4, so a re-run never makes a second draft), move.
   Each action is recorded as done; the message becomes ``acted``.

A crash anywhere leaves either no decision (the email is claimed again and triaged from
scratch) or a committed decision whose remaining actions the next pass finishes.

When the teacher is unavailable (outage, spend cap), escalations are parked ``waiting``
with exponential backoff while student-handled mail keeps flowing; audits are skipped.
After a failure the worker stops calling the teacher for a while (:class:`TeacherBreaker`:
5 s, doubling, at most a minute): a backlog arriving during an outage waits without a
call per batch, and when the pause ends one email probes before the rest are sent.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

from agent.audit import audit_output
from agent.logs import get_logger
from agent.mail.errors import MessageNotFound
from agent.protocols import StudentClassifier, StudentDrafter, Teacher
from agent.router import Route, Router, thresholds_of
from agent.teacher.errors import SpendCapReached, TeacherUnavailable
from storage import work
from storage.calls import digest_text, record_call, record_teacher_result
from storage.db import Database
from storage.types import Draft, Email, TeacherResult, Triage

log = get_logger(component="worker")


class Actions(Protocol):
    """The mailbox side effects the worker needs (agent.mail.actions.MailboxActions)."""

    def set_keywords(self, email: Email, category: str, priority: str) -> object: ...
    def move(self, email: Email, folder: str) -> object: ...
    def append_draft(self, original: Email, body: str, *, draft_message_id: str) -> object: ...


@dataclass
class Student:
    """The active student: a classifier (None at cold start) and an optional drafter."""

    classifier: StudentClassifier | None = None
    drafter: StudentDrafter | None = None

    @property
    def version(self) -> str | None:
        return getattr(self.classifier, "version", None)


@dataclass
class PassResult:
    claimed: int = 0
    routes: dict[str, int] = field(default_factory=dict)   # student | student_audited | teacher
    waiting: int = 0                                         # escalations parked for later
    acted: int = 0
    action_errors: int = 0
    audits: int = 0
    audit_disagreements: int = 0
    teacher_cost_usd: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # claim -> acted, per email

    def count(self, route: str) -> None:
        self.routes[route] = self.routes.get(route, 0) + 1


@dataclass
class TeacherBreaker:
    """When to call the teacher again after it was unavailable.

    Closed (``failures == 0``): every escalation goes to the teacher. After a failure it is
    open for ``base_s * 2^(failures-1)`` seconds (at most ``cap_s``; a spent daily cap
    gives its own, longer pause): escalations wait without a call. Then it half-opens: one
    email probes, and only if the teacher answers are the others sent.
    """

    base_s: float = 5.0
    cap_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    until: float = 0.0
    reason: str | None = None

    def remaining(self) -> float:
        """Seconds until the teacher may be called again (0: now)."""
        return max(0.0, self.until - self.clock()) if self.failures else 0.0

    @property
    def probing(self) -> bool:
        """The pause is over but the last call failed: try one email first."""
        return self.failures > 0 and self.remaining() == 0.0

    def failed(self, reason: str, pause_s: float | None = None) -> float:
        """Record a failed call; returns the pause before the next one."""
        self.failures += 1
        pause = pause_s if pause_s is not None else \
            min(self.cap_s, self.base_s * 2 ** (self.failures - 1))
        self.until, self.reason = self.clock() + pause, reason
        return pause

    def answered(self) -> bool:
        """The teacher answered; True when that ends an outage."""
        was_down = self.failures > 0
        self.failures, self.until, self.reason = 0, 0.0, None
        return was_down


class TriageWorker:
    """Runs triage passes. Flat arguments; see agent.build.build_worker for the wiring."""

    def __init__(self, db: Database, *, worker_id: str, router: Router,
                 student: Callable[[], Student], teacher: Teacher | None,
                 actions_for: Callable[[str], Actions | None],
                 move_rules: dict[str, dict[str, str]], batch_size: int = 32,
                 backoff_base_s: float = 5.0, backoff_cap_s: float = 300.0,
                 breaker: TeacherBreaker | None = None):
        self.db = db
        self.worker_id = worker_id
        self.router = router
        self.student = student
        self.teacher = teacher
        self.actions_for = actions_for
        self.move_rules = move_rules
        self.batch_size = batch_size
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.breaker = breaker or TeacherBreaker(base_s=backoff_base_s)
        self.held: set[int] = set()       # ids claimed and not yet finished (for release)
        self._t0 = time.monotonic()

    def run_until_empty(self, max_passes: int = 10_000) -> PassResult:
        """Passes until nothing is due (``understudy triage``); results summed."""
        total = PassResult()
        for _ in range(max_passes):
            r = self.run_once()
            _add(total, r)
            if r.claimed == 0:
                break
        return total

    def run_once(self) -> PassResult:
        result = PassResult()
        self._t0 = time.monotonic()
        ids = work.claim_batch(self.db, self.worker_id, self.batch_size)
        result.claimed = len(ids)
        if not ids:
            return result
        self.held.update(ids)
        try:
            states = work.states_of(self.db, ids)
            emails = work.load_emails(self.db, ids)
            # Decided before a crash: only the mailbox actions are left.
            for e in emails:
                if states[e.db_id][1]:
                    self._act(e, None, result)
            self._triage([e for e in emails if not states[e.db_id][1]], result)
        finally:
            # Whatever is still held (an exception mid-pass) goes back to the queue.
            work.release(self.db, self.held, self.worker_id)
            self.held.clear()
        return result

    def release_all(self) -> None:
        work.release(self.db, self.held, self.worker_id)
        self.held.clear()

    # ---- triage ----------------------------------------------------------------------
    def _triage(self, emails: Sequence[Email], result: PassResult) -> None:
        """Decide each email, commit, act. Student-only emails are committed and acted on
        first, so a slow teacher call never delays mail the student handles alone."""
        if not emails:
            return
        student = self.student()
        clf = student.classifier
        triages: list[Triage | None] = list(clf.classify(emails)) if clf else [None] * len(emails)
        thresholds = thresholds_of(getattr(clf, "thresholds", None)) if clf else {}
        drafts = self._drafts(emails, triages, thresholds, student.drafter)
        routes = [self.router.route(e, t, drafts.get(e.db_id), thresholds)
                  for e, t in zip(emails, triages)]
        items = list(zip(emails, triages, routes))
        alone = [x for x in items if not (x[2].escalate or x[2].audit)]
        to_teacher = [x for x in items if x[2].escalate or x[2].audit]
        for e, t, r in alone:
            calls = self._student_calls(e, t, drafts.get(e.db_id), student, r)
            self._decided(e, r, self._commit_student(
                e, t, drafts.get(e.db_id), None, r, calls, student.version, result), result)
        if not to_teacher:
            return
        answers, unavailable = self._ask_teacher([x[0] for x in to_teacher])
        for e, t, r in to_teacher:
            calls = self._student_calls(e, t, drafts.get(e.db_id), student, r)
            answer = answers.get(e.id)
            if answer is not None:
                result.teacher_cost_usd += answer.cost_usd
            if r.escalate:
                if answer is None or not answer.ok:
                    self._wait(e, answer, unavailable, calls)
                    result.waiting += 1
                    continue
                todo = self._commit_teacher(e, t, answer, r, calls)
            else:
                todo = self._commit_student(e, t, drafts.get(e.db_id), answer, r, calls,
                                            student.version, result)
                r = r if answer is not None and answer.ok else Route(False)  # audit skipped
            self._decided(e, r, todo, result)

    def _decided(self, e: Email, r: Route, todo: dict | None, result: PassResult) -> None:
        if todo is None:   # someone else's decision stands (a recovered claim): not ours
            self.held.discard(e.db_id)
            return
        result.count(r.label)
        self._act(e, todo, result)

    def _drafts(self, emails, triages, thresholds, drafter) -> dict[int, Draft]:
        if drafter is None:
            return {}
        # Draft only where the student could handle the email: a draft for mail the
        # teacher decides anyway is wasted CPU.
        want = [e for e, t in zip(emails, triages)
                if self.router.needs_draft(t) and not self.router.classifier_clears(t, thresholds)
                and t.category not in self.router.always_escalate
                and not self.router.sender_forces_escalation(e)]
        if not want:
            return {}
        return {e.db_id: d for e, d in zip(want, drafter.draft(want))}

    def _ask_teacher(self, emails: Sequence[Email]) -> tuple[dict[str, TeacherResult], str | None]:
        if not emails:
            return {}, None
        if self.teacher is None:
            return {}, "no teacher configured"
        pause = self.breaker.remaining()
        if pause > 0:
            log.info("teacher paused after a failure; escalations wait without a call",
                     emails=len(emails), retry_in_s=round(pause, 1), reason=self.breaker.reason)
            return {}, f"{self.breaker.reason} (teacher paused; next try in {pause:.0f} s)"
        # After an outage one email probes; the rest follow only if the teacher answers.
        batches = [emails[:1], emails[1:]] if self.breaker.probing else [emails]
        answers: dict[str, TeacherResult] = {}
        for batch in (b for b in batches if b):
            try:
                answers.update((r.email_id, r) for r in self.teacher.label(batch))
            except TeacherUnavailable as e:
                # Answers obtained (and paid for) before it gave up are used; the rest wait.
                answers.update((r.email_id, r) for r in e.results)
                reason = f"{type(e).__name__}: {e}"
                # A spent daily cap resets at 00:00 UTC: no point retrying before (up to
                # an hour at a time). Outages use the breaker's own pause, which starts short.
                pause = self.breaker.failed(reason, min(
                    self.backoff_cap_s * 4, e.retry_after_s or 0.0)
                    if isinstance(e, SpendCapReached) else None)
                log.warning("teacher unavailable; escalations wait", error=str(e),
                            answered=len(answers), asked=len(emails),
                            failures=self.breaker.failures, retry_in_s=round(pause, 1))
                return answers, reason
            if self.breaker.answered():
                log.info("teacher answers again", probe=len(batch) == 1)
        if any(r.ok for r in answers.values()) and work.wake_waiting(self.db):
            log.info("waiting escalations are due now")
        return answers, None

    def _student_calls(self, e: Email, t: Triage | None, d: Draft | None, student: Student,
                       r: Route) -> list:
        if t is None:
            return []
        digest = digest_text(e.subject, e.new_text or e.text)
        calls = [lambda s, mid: record_call(
            s, message_id=mid, role="student", purpose="classify", backend="torch",
            model_id="student-classifier", model_version=t.model_version, input_digest=digest,
            output={"category": t.category, "priority": t.priority,
                    "needs_reply": t.needs_reply, "route": r.label, "reasons": list(r.reasons)},
            probs={"category": t.category_probs, "confidence": t.confidence},
            confidence=t.confidence.get("category"), escalated=r.escalate,
            latency_ms=t.latency_ms or 0.0)]
        if d is not None:
            calls.append(lambda s, mid: record_call(
                s, message_id=mid, role="student", purpose="draft", backend="drafter",
                model_id="student-drafter", model_version=d.model_version,
                input_digest=digest, output={"draft": d.text, "mean_logprob": d.mean_logprob,
                                               "min_logprob": d.min_logprob},
                confidence=d.confidence,
                escalated=r.escalate, latency_ms=d.latency_ms or 0.0))
        return calls

    def _wait(self, e: Email, answer: TeacherResult | None, unavailable: str | None,
              calls: list) -> None:
        if answer is not None:      # a paid-for failure is a row too
            calls = [*calls, lambda s, mid: record_teacher_result(s, answer, message_id=mid)]
        delay = max(self._backoff(e.db_id), self.breaker.remaining())
        reason = unavailable or (answer.error if answer else "no answer")
        work.record_calls(self.db, calls, e.db_id)
        if work.defer(self.db, e.db_id, self.worker_id, delay_s=delay, error=reason):
            self.held.discard(e.db_id)
        log.info("escalation waits for the teacher", message=e.db_id, retry_in_s=delay,
                 reason=reason)

    def _backoff(self, message_id: int) -> float:
        from storage.models import Message

        with self.db.session() as s:
            attempts = s.get(Message, message_id).attempts
        return work.backoff_s(attempts, self.backoff_base_s, self.backoff_cap_s)

    def _commit_teacher(self, e, t, answer: TeacherResult, r: Route, calls) -> dict | None:
        calls = [*calls, lambda s, mid: record_teacher_result(s, answer, message_id=mid)]
        needs_reply = answer.needs_reply if answer.needs_reply is not None else (
            t.needs_reply if t else False)
        decision = dict(source="teacher", category=answer.category,
                        priority=answer.priority or (t.priority if t else "normal"),
                        needs_reply=bool(needs_reply), confidence=dict(answer.category_probs),
                        rationale=answer.rationale, model_version=answer.model_id,
                        escalated=True)
        draft = None
        if needs_reply and answer.draft:
            # Escalated drafts wait for a human (agent.review); nothing goes to Drafts yet.
            draft = dict(source="teacher", body=answer.draft, status="pending_review",
                         draft_message_id=_draft_message_id(e))
        ok = work.commit_decision(self.db, e.db_id, self.worker_id, decision=decision,
                                  calls=calls, deciding_call=len(calls) - 1, draft=draft)
        log.info("decided", message=e.db_id, source="teacher", category=answer.category,
                 reasons=list(r.reasons), committed=ok)
        return _todo(decision, draft) if ok else None

    def _commit_student(self, e, t: Triage, d: Draft | None, answer, r: Route, calls,
                        version, result: PassResult) -> dict | None:
        audited = r.audit and answer is not None and answer.ok
        if r.audit and answer is not None:
            if answer.ok:
                out = audit_output(version, t.category, answer.category,
                                   {"priority": answer.priority,
                                    "needs_reply": answer.needs_reply, "draft": answer.draft})
                result.audits += 1
                result.audit_disagreements += not out["agree"]
                calls = [*calls, _audit_writer(answer, out)]
            else:
                calls = [*calls, lambda s, mid: record_teacher_result(
                    s, answer, message_id=mid, purpose="audit", escalated=False)]
        decision = dict(source="student", category=t.category, priority=t.priority,
                        needs_reply=t.needs_reply, confidence=dict(t.confidence),
                        model_version=t.model_version, escalated=False, audited=audited)
        draft = None
        if d is not None and t.needs_reply:
            draft = dict(source="student", body=d.text, confidence=d.confidence,
                         status="to_append", draft_message_id=_draft_message_id(e))
        ok = work.commit_decision(self.db, e.db_id, self.worker_id, decision=decision,
                                  calls=calls, deciding_call=0, draft=draft)
        return _todo(decision, draft) if ok else None

    # ---- mailbox actions ---------------------------------------------------------------
    def _act(self, email: Email, todo: dict | None, result: PassResult) -> None:
        mid = email.db_id
        todo = todo or work.pending_actions(self.db, mid)
        actions = self.actions_for(email.account) if email.account else None
        try:
            if actions is not None:
                self._do_actions(mid, email, todo, actions)
        except Exception as exc:  # noqa: BLE001 - any IMAP failure: retry on a later pass
            log.warning("mailbox action failed; retried later", message=mid,
                        error=f"{type(exc).__name__}: {exc}")
            work.mark_action(self.db, mid, "", error=f"{type(exc).__name__}: {exc}")
            result.action_errors += 1
            # The decision stands; only the actions are retried, after a pause, so an IMAP
            # outage does not spin the worker.
            if work.defer_actions(self.db, mid, self.worker_id, delay_s=self.backoff_base_s):
                self.held.discard(mid)
            return
        if work.mark_acted(self.db, mid, self.worker_id):
            result.acted += 1
        result.latencies_s.append(time.monotonic() - self._t0)
        self.held.discard(mid)

    def _do_actions(self, mid: int, email: Email, todo: dict, actions: Actions) -> None:
        # Every action is idempotent, so only what a retry needs is recorded: where a
        # draft went, and that a move happened (the message is not in its folder any more).
        done = set(todo["done"])
        folder = self.move_rules.get(email.account or "", {}).get(todo["category"])
        moving = bool(folder) and folder != email.folder
        if "move" in done:
            return
        try:
            actions.set_keywords(email, todo["category"], todo["priority"])
        except MessageNotFound:
            if not moving:
                raise
            # A crash after the move and before recording it: finish the move (it finds
            # the message in the target), then put the keywords there.
            res = actions.move(email, folder)
            actions.set_keywords(replace(email, folder=folder, uid=getattr(res, "uid", None)),
                                 todo["category"], todo["priority"])
            work.mark_action(self.db, mid, "move")
            return
        draft = todo["draft"]
        if draft and draft["status"] == "to_append" and "draft" not in done:
            res = actions.append_draft(email, draft["body"],
                                       draft_message_id=draft["draft_message_id"])
            work.mark_action(self.db, mid, "draft", draft_append=_as_dict(res))
        if moving:
            actions.move(email, folder)
            work.mark_action(self.db, mid, "move")


def _todo(decision: dict, draft: dict | None) -> dict:
    """What agent.worker acts on, straight from a decision just committed (no re-read)."""
    return {"category": decision["category"], "priority": decision["priority"],
            "source": decision["source"], "done": [],
            "draft": None if draft is None else {
                "status": draft["status"], "body": draft["body"],
                "draft_message_id": draft["draft_message_id"]}}


def _audit_writer(answer: TeacherResult, out: dict):
    def write(s, mid):
        from storage.models import ModelCall

        cid = record_teacher_result(s, answer, message_id=mid, purpose="audit", escalated=False)
        s.get(ModelCall, cid).output = out
        return cid
    return write


def _draft_message_id(e: Email) -> str:
    # Fixed when the decision is committed; append_draft looks for it before appending,
    # which is what makes a re-run after a crash idempotent.
    return f"<understudy-draft-{e.db_id}-{uuid.uuid4().hex[:12]}@understudy.invalid>"


def _as_dict(res: object) -> dict:
    if res is None:
        return {}
    if isinstance(res, dict):
        return res
    return {k: getattr(res, k, None) for k in ("folder", "uidvalidity", "uid", "message_id")}


def _add(total: PassResult, r: PassResult) -> None:
    total.claimed += r.claimed
    for k, v in r.routes.items():
        total.routes[k] = total.routes.get(k, 0) + v
    for f in ("waiting", "acted", "action_errors", "audits", "audit_disagreements",
              "teacher_cost_usd"):
        setattr(total, f, getattr(total, f) + getattr(r, f))
    total.latencies_s += r.latencies_s

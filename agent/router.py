"""The router: may the student handle this email alone, or must the teacher decide?

The student handles an email alone only when *all* of these hold:

* a student exists (cold start: the teacher decides everything);
* every head's calibrated confidence clears the threshold stored with the model
  (the thresholds were chosen on held-out data to keep disagreement under the promised
  risk epsilon with confidence 1 - delta; see distill/thresholds);
* when a reply is needed and drafting is on, the draft's confidence (geometric-mean token
  probability) clears ``draft_min_confidence`` and, when set, its least likely token's
  log-probability clears ``draft_min_token_logprob``;
* no rule forces escalation: the predicted category is marked always-escalate, or the
  sender matches an escalation glob.

Of the emails the student handles, a fixed fraction is also audited by the teacher in
shadow. The sample is a hash of the email's identity, not a coin flip, so re-processing
after a crash picks the same emails.

>>> r = Router(always_escalate={"billing"}, escalate_senders=("*@bank.example",))
>>> t = Triage("technical", "normal", False, confidence={"category": 0.99})
>>> r.route(Email(id="1", from_addr="a@b.c"), t, None, {"category": 0.9}).escalate
False
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parseaddr
from fnmatch import fnmatch
from typing import Iterable, Mapping

from storage.audits import in_audit_sample
from storage.types import Draft, Email, Triage

HEADS = ("category", "priority", "needs_reply")


@dataclass(frozen=True)
class Route:
    """Where one email goes: ``escalate`` to the teacher (with reasons) or the student
    alone, and whether a student-handled email is also ``audit``-ed in shadow."""

    escalate: bool
    reasons: tuple[str, ...] = ()
    audit: bool = False

    @property
    def label(self) -> str:
        return "teacher" if self.escalate else ("student_audited" if self.audit else "student")


class Router:
    """Pure routing rules: no I/O, so the worker and ``simulate`` share them."""

    def __init__(self, *, always_escalate: Iterable[str] = (),
                 escalate_senders: Iterable[str] = (), draft_min_confidence: float = 0.0,
                 draft_min_token_logprob: float | None = None,
                 audit_fraction: float = 0.0, drafting: bool = True, audit_salt: str = ""):
        self.always_escalate = frozenset(always_escalate)
        self.escalate_senders = tuple(p.lower() for p in escalate_senders)
        self.draft_min_confidence = draft_min_confidence
        self.draft_min_token_logprob = draft_min_token_logprob
        self.audit_fraction = audit_fraction
        self.drafting = drafting
        self.audit_salt = audit_salt

    def sender_forces_escalation(self, email: Email) -> bool:
        addr = parseaddr(email.from_addr or "")[1].lower()
        return any(fnmatch(addr, p) for p in self.escalate_senders)

    def needs_draft(self, triage: Triage | None) -> bool:
        """Whether the student should draft for this email before routing."""
        return self.drafting and triage is not None and triage.needs_reply

    def classifier_clears(self, triage: Triage, thresholds: Mapping[str, float]) -> list[str]:
        """Reasons the classification is not confident enough (empty: it clears)."""
        reasons = []
        if not thresholds:
            return ["no_thresholds"]
        for head in HEADS:
            limit = thresholds.get(head)
            if limit is None:
                continue
            conf = triage.confidence.get(head)
            if conf is None or conf < limit:
                reasons.append(f"low_confidence:{head}")
        return reasons

    def route(self, email: Email, triage: Triage | None, draft: Draft | None,
              thresholds: Mapping[str, float] | None) -> Route:
        if triage is None:
            return Route(True, ("cold_start",))
        reasons = self.classifier_clears(triage, thresholds or {})
        if self.needs_draft(triage):
            if draft is None or not draft.text.strip():
                reasons.append("no_draft")
            elif (draft.confidence if draft.confidence is not None else 0.0) \
                    < self.draft_min_confidence:
                reasons.append("low_confidence:draft")
            elif self.draft_min_token_logprob is not None and (
                    draft.min_logprob is None or draft.min_logprob < self.draft_min_token_logprob):
                # One token the model guessed (an amount, a date, a name) is enough for a
                # human to look, however fluent the rest of the reply.
                reasons.append("unsure_token:draft")
        if triage.category in self.always_escalate:
            reasons.append(f"always_escalate:{triage.category}")
        if self.sender_forces_escalation(email):
            reasons.append("sender_rule")
        if reasons:
            return Route(True, tuple(reasons))
        return Route(False, (), audit=self.sampled_for_audit(email))

    def sampled_for_audit(self, email: Email) -> bool:
        return in_audit_sample(email.message_id, email.id, self.audit_fraction,
                               self.audit_salt)


def thresholds_of(stored: Mapping | None) -> dict[str, float]:
    """Per-head thresholds from what a model version stores.

    Accepts ``{"category": 0.93, ...}``, ``{"heads": {"category": {"threshold": 0.93}}}``
    or ``{"category": {"threshold": 0.93, "trained": True, "epsilon": ...}}`` (the shape
    distill.classifier.Classifier.thresholds has); untrained heads are left out.
    """
    if not stored:
        return {}
    src = stored.get("heads", stored)
    out: dict[str, float] = {}
    for head in HEADS:
        v = src.get(head) if isinstance(src, Mapping) else None
        if isinstance(v, Mapping):
            # A head the model never saw labels for does not vote (its output is a default).
            if v.get("trained") is False:
                continue
            v = v.get("threshold")
        if isinstance(v, (int, float)):
            out[head] = float(v)
    return out

"""Seed escalated emails (message + teacher decision + pending draft) straight into SQL.

Shared by the review tests (unit, API and the browser e2e test).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime

from sqlalchemy import select

from storage.models import Account, DecisionRow, DraftRow, Mailbox, Message


def raw_email(i: int, *, subject: str, sender: str, to: str, body: str,
              html: str | None = None, date: datetime | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<seed-{i}@customers.example>"
    msg["Date"] = format_datetime(date or datetime.now(timezone.utc))
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


def seed_escalated(db, *, account: str = "test", address: str = "demo@localhost",
                   n: int = 3, start: int = 0, category: str = "billing",
                   html: str | None = None, ages_h: list[float] | None = None,
                   folder: str = "INBOX") -> list[dict]:
    """Insert ``n`` escalated emails with pending drafts; returns one dict per email.

    Each dict has ``draft_id``, ``message_db_id``, ``message_id``, ``raw``, ``subject``
    and ``draft``. ``ages_h[i]`` sets how many hours ago email i arrived.
    """
    now = datetime.now(timezone.utc)
    out = []
    with db.session() as s:
        acct = s.scalar(select(Account).where(Account.name == account))
        if acct is None:
            acct = Account(name=account, host="127.0.0.1", user=address)
            s.add(acct)
            s.flush()
        mbox = s.scalar(select(Mailbox).where(Mailbox.account_id == acct.id,
                                              Mailbox.name == folder))
        if mbox is None:
            mbox = Mailbox(account_id=acct.id, name=folder, uidvalidity=1)
            s.add(mbox)
            s.flush()
        for k in range(n):
            i = start + k
            age = (ages_h[k] if ages_h else k) or 0.0
            when = now - timedelta(hours=age)
            subject = f"Question {i} about my invoice"
            sender = f"Customer {i} <customer{i}@customers.example>"
            body = f"Hello, I was charged twice for order {1000 + i}. Please help.\n"
            raw = raw_email(i, subject=subject, sender=sender, to=address, body=body,
                            html=html, date=when)
            m = Message(mailbox_id=mbox.id, uidvalidity=1, uid=100 + i,
                        message_id=f"<seed-{i}@customers.example>",
                        content_hash=hashlib.sha256(raw).hexdigest(), raw=raw,
                        internal_date=when, sent_at=when, subject=subject,
                        from_addr=f"customer{i}@customers.example", to_addrs=[address],
                        body_text=body, new_text=body, body_html=html, state="decided")
            s.add(m)
            s.flush()
            dec = DecisionRow(message_id=m.id, source="teacher", category=category,
                              priority="normal", needs_reply=True,
                              confidence={"category": 0.61, "priority": 0.8},
                              rationale=f"Double charge on order {1000 + i}.",
                              model_version="claude-sonnet-4-5", escalated=True)
            s.add(dec)
            s.flush()
            draft = (f"Hello,\n\nSorry about the double charge on order {1000 + i}. "
                     "We have refunded it.\n\nBest regards")
            d = DraftRow(message_id=m.id, decision_id=dec.id, source="teacher", body=draft,
                         confidence=0.7, status="pending_review")
            s.add(d)
            s.flush()
            out.append({"draft_id": d.id, "message_db_id": m.id,
                        "message_id": m.message_id, "raw": raw, "subject": subject,
                        "draft": draft, "received": when})
    return out


def seed_audited(db, pairs: list[tuple[str, str]], *, version: str = "v1",
                 account: str = "test", start: int = 100) -> list[int]:
    """Emails the student handled alone and the teacher audited in shadow: one per
    (student category, teacher category) pair, the decision the student's, the audit row as
    the worker writes it (agent.audit.audit_output). Returns the message db ids."""
    from agent.audit import audit_output
    from storage.calls import record_call

    ids = []
    for k, (student, teacher) in enumerate(pairs):
        i = start + k
        seeded = seed_escalated(db, account=account, n=1, start=i, category=student)[0]
        with db.session() as s:
            s.delete(s.get(DraftRow, seeded["draft_id"]))
            dec = s.scalar(select(DecisionRow).where(
                DecisionRow.message_id == seeded["message_db_id"]))
            dec.source, dec.model_version, dec.escalated, dec.audited = (
                "student", version, False, True)
            record_call(s, message_id=seeded["message_db_id"], role="teacher",
                        purpose="audit", backend="claude", model_id="claude-sonnet-4-5",
                        output=audit_output(version, student, teacher,
                                            {"priority": "normal", "needs_reply": True}))
        ids.append(seeded["message_db_id"])
    return ids

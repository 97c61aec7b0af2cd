"""The daemon end to end: real Dovecot, a real (tiny) student, the local Messages-API
teacher, ``understudy run`` as a real subprocess.

Each test appends real mail (Banking77 texts, a case number per subject) and checks the
database and the IMAP server afterwards. Budget: the student is trained once per session
(cached across sessions by a hash of the training code).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import func, select

from storage import Database
from storage.models import DecisionRow, DraftRow, Message, ModelCall
from tests.e2e.daemon_kit import (Corpus, DaemonProc, activate, base_config, drafts_on_server,
                                  imap, server_flags, train_tiny_student, wait_for, write_config)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def tiny_student():
    """One small classifier for the whole session (trained on 150 Banking77 examples)."""
    return train_tiny_student()


@pytest.fixture
def sqlite_url(state_dir):
    url = f"sqlite:///{state_dir / 'understudy.db'}"
    d = Database(url)
    d.upgrade()
    d.dispose()
    return url


def _cases_in_requests(messages_api) -> Counter:
    seen = Counter()
    for r in messages_api.message_requests():
        text = " ".join(str(m.get("content")) for m in r.body.get("messages", []))
        for case in set(re.findall(r"Case (\d+):", text)):
            seen[int(case)] += 1
    return seen


def _decisions(db) -> dict[int, dict]:
    """case number -> its decision."""
    with db.session() as s:
        rows = s.execute(select(Message.subject, DecisionRow.source, DecisionRow.category,
                                DecisionRow.audited, DecisionRow.escalated, Message.state)
                         .join(DecisionRow, DecisionRow.message_id == Message.id)).all()
    out = {}
    for subj, source, cat, audited, esc, state in rows:
        case = int(re.search(r"Case (\d+):", subj).group(1))
        assert case not in out, f"case {case} has two decisions"
        out[case] = {"source": source, "category": cat, "audited": audited, "state": state}
    return out


def _append(dovecot, corpus, cases, rate_per_s: float | None = None):
    c = imap(dovecot)
    try:
        t0 = time.monotonic()
        for i, case in enumerate(cases):
            if rate_per_s:
                delay = t0 + i / rate_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            c.append("INBOX", corpus.raw(case))
    finally:
        c.logout()


def _counts(db):
    with db.session() as s:
        n_dec = s.scalar(select(func.count()).select_from(DecisionRow))
        n_acted = s.scalar(select(func.count()).where(Message.state == "acted"))
    return n_dec, n_acted


def test_300_emails_appended_while_the_daemon_runs(dovecot, messages_api, sqlite_url,
                                                   tiny_student, tmp_path):
    corpus = Corpus(300)
    messages_api.labeler = corpus.labeler
    db = Database(sqlite_url)
    version = activate(db, tiny_student)
    # Lost cards always go to a human-reviewed teacher decision (a category rule), so
    # both routes are exercised whatever the student's coverage.
    cfg = write_config(tmp_path / "understudy.toml", base_config(
        dovecot=dovecot, messages_api=messages_api, database_url=sqlite_url,
        taxonomy={"always_escalate": ["lost_or_stolen_card"]}))
    daemon = DaemonProc(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: "watching folder" in daemon.log_text(), 90, what="the watcher")
        _append(dovecot, corpus, range(300), rate_per_s=25)
        wait_for(lambda: _counts(db) == (300, 300), 240, every=1.0,
                 what="300 decisions acted on")
    finally:
        rc = daemon.terminate()
    assert rc == 0, daemon.log_text()[-3000:]
    assert "daemon stopped cleanly" in daemon.log_text()

    decisions = _decisions(db)
    assert sorted(decisions) == list(range(300))                   # exactly one each
    asked = _cases_in_requests(messages_api)
    by_source = Counter(d["source"] for d in decisions.values())
    assert by_source["student"] > 0 and by_source["teacher"] > 0, by_source
    for case, d in decisions.items():
        if d["source"] == "teacher":
            assert asked[case] == 1, case                          # escalations reach it
            assert d["category"] == corpus.gold(case)["category"]
        elif d["audited"]:
            assert asked[case] == 1, case                          # shadow audit
        else:
            assert asked[case] == 0, case                          # the rest never do
    # Keywords on the server match the decisions.
    flags = server_flags(dovecot)
    assert len(flags) == 300
    with db.session() as s:
        mids = dict(s.execute(select(Message.message_id, DecisionRow.category)
                              .join(DecisionRow)).all())
    for mid, cat in mids.items():
        assert f"understudy:category:{cat}" in flags[mid], (mid, flags[mid])
    # Every model call is a row: one classify per email, one teacher call per request.
    with db.session() as s:
        assert s.scalar(select(func.count()).where(
            ModelCall.role == "student", ModelCall.purpose == "classify")) == 300
        assert s.scalar(select(func.count()).where(ModelCall.role == "teacher")) == \
            len(messages_api.message_requests())
        # Escalated drafts wait for review; none is in Drafts (drafting is off here).
        assert s.scalar(select(func.count()).where(DraftRow.status != "pending_review")) == 0
    assert drafts_on_server(dovecot) == []
    assert version
    db.dispose()

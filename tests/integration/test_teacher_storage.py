"""Teacher rows, spend and dataset import/export on SQLite and a real PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from agent.teacher import SpendCapReached, build_teacher
from config import load_settings
from storage.calls import record_teacher_result
from storage.models import Message, ModelCall
from storage.queries import start_of_utc_day, teacher_spend_since
from storage.records import export_records, import_records, unlabelled_emails

pytestmark = pytest.mark.integration


def test_rows_spend_and_cap_on_each_database(db, messages_api):
    with db.session() as s:
        s.add_all(Message(content_hash=f"{i:064d}", body_text=t, new_text=t)
                  for i, t in enumerate(["refund my invoice", "app crash", "login locked"]))
    settings = load_settings(None, teacher={"base_url": messages_api.base_url,
                                            "model": "claude-sonnet-5-5"})
    teacher = build_teacher(settings, db, backoff_base_s=0.01, concurrency=1)
    messages_api.enqueue(("status", 429, {"retry-after": "0"}), "valid", "unknown_category")
    results = teacher.label(unlabelled_emails(db, 2))
    with db.session() as s:
        for r in results:
            record_teacher_result(s, r, message_id=int(r.email_id))
    with db.session() as s:
        rows = list(s.scalars(select(ModelCall).order_by(ModelCall.id)))
    assert [(r.retries, r.error is None) for r in rows] == [(1, True), (0, False)]
    assert rows[0].probs and abs(sum(rows[0].probs.values()) - 1) < 1e-9
    spend = teacher_spend_since(db, start_of_utc_day())
    assert spend == pytest.approx(sum(r.cost_usd for r in results)) and spend > 0
    capped = build_teacher(load_settings(None, teacher={
        "base_url": messages_api.base_url, "model": "claude-sonnet-5-5",
        "daily_spend_cap_usd": spend * 0.99}), db)
    with pytest.raises(SpendCapReached):
        capped.label(unlabelled_emails(db))
    assert len(unlabelled_emails(db)) == 2         # the failed one and the untried one


def test_import_export_round_trip_on_each_database(db):
    recs = [{"id": f"r{i}", "body": f"body {i}", "category": "billing",
             "category_probs": {"billing": 0.75, "other": 0.25}, "needs_reply": i % 2 == 0}
            for i in range(7)]
    stats = import_records(db, recs, source="t")
    assert (stats.imported, stats.skipped_existing) == (7, 0)
    assert import_records(db, recs[:3]).skipped_existing == 3
    out = list(export_records(db))
    assert [{k: v for k, v in r.items() if k != "source"} for r in out] == recs
    assert unlabelled_emails(db) == []             # imported records are never triaged

"""`teacher label`, `dataset import|export` and the recorded teacher, through the CLI."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from agent.cli import app
from agent.teacher import build_teacher, estimate_cost, read_records, taxonomy_of
from agent.teacher.base import prompt_tokens
from agent.teacher.recorded import RecordedTeacher
from agent.teacher.records import TeacherRecord
from config import load_settings
from storage.models import Message, ModelCall, Review
from storage.types import Email

RECORDS = [
    {"id": "r1", "from": "ann@example.com", "subject": "Refund", "body": "Please refund my "
     "last invoice, I was charged twice.", "category": "billing",
     "category_probs": {"billing": 0.9, "account": 0.1}, "priority": "high",
     "needs_reply": True, "draft": "Hello Ann, ...", "rationale": "double charge"},
    {"id": "r2", "body": "The export button crashes the app.", "category": "technical"},
    {"id": "r3", "subject": "Locked out", "body": "I cannot sign in since yesterday.",
     "category": "account", "needs_reply": True, "source": "human"},
]


@pytest.fixture
def cli(state_dir, monkeypatch):
    monkeypatch.setenv("UNDERSTUDY_TEACHER__MODEL", "claude-sonnet-5-5")   # not deprecated
    runner = CliRunner()

    def run(*args, ok=True):
        res = runner.invoke(app, list(args), catch_exceptions=False)
        if ok:
            assert res.exit_code == 0, res.output
        return res
    run("db", "upgrade")
    return run


@pytest.fixture
def records_file(tmp_path):
    p = tmp_path / "teacher.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return p


def _db():
    from storage import Database
    return Database(load_settings(None).db_url)


def test_dataset_import_export_round_trip(cli, records_file, tmp_path):
    res = cli("dataset", "import", str(records_file), "--json")
    assert json.loads(res.stdout) == {"file": str(records_file), "imported": 3,
                                      "skipped_existing": 0, "gold": 1,
                                      "categories_outside_taxonomy": []}
    again = json.loads(cli("dataset", "import", str(records_file), "--json").stdout)
    assert again["imported"] == 0 and again["skipped_existing"] == 3
    out = tmp_path / "export.jsonl"
    res = cli("dataset", "export", "--out", str(out))
    assert "exported 3 record(s)" in res.stdout
    back = [r.to_dict() for r in read_records(out)]
    for original, exported in zip(RECORDS, back):
        exported.pop("source")
        assert exported == {k: v for k, v in original.items() if k != "source"}
    assert [r.source for r in read_records(out)] == ["teacher", "teacher", "human"]
    with _db().session() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 3
        assert s.scalar(select(func.count()).select_from(Review)) == 1
        states = set(s.scalars(select(Message.state)))
    assert states == {"imported"}          # never triaged or touched in a mailbox
    # the student's training query sees imported records like teacher answers
    from storage.datasets import training_examples
    ex = {e.body: e for e in training_examples(_db())}
    assert ex[RECORDS[0]["body"]].category_probs == pytest.approx({"billing": .9, "account": .1})
    assert ex[RECORDS[2]["body"]].gold is True


def test_export_applies_gold_corrections(cli, records_file, tmp_path):
    cli("dataset", "import", str(records_file))
    db = _db()
    with db.session() as s:
        mid = s.scalar(select(Message.id).where(Message.external_id == "r1"))
        s.add(Review(message_id=mid, action="edit", category="account",
                     final_draft="Edited reply", is_gold=True))
    res = cli("dataset", "export")
    recs = {json.loads(line)["id"]: json.loads(line) for line in res.stdout.splitlines()}
    assert recs["r1"]["category"] == "account" and recs["r1"]["source"] == "human"
    assert recs["r1"]["draft"] == "Edited reply" and "category_probs" not in recs["r1"]
    assert recs["r2"]["source"] == "teacher"


def test_dataset_import_rejects_a_bad_file_naming_the_line(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + '{"id": "x", "body": "b"}\n')
    res = cli("dataset", "import", str(bad), ok=False)
    assert res.exit_code == 2 and f"{bad}:2" in res.output and "category" in res.output
    with _db().session() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 0   # all or nothing


def _seed(n: int) -> None:
    with _db().session() as s:
        s.add_all(Message(content_hash=f"{i:064d}", subject=f"s{i}", body_text="x" * (100 * i + 100),
                          new_text="x" * (100 * i + 100)) for i in range(n))


def test_dry_run_estimates_without_calling_the_teacher(cli, messages_api, monkeypatch):
    monkeypatch.setenv("UNDERSTUDY_TEACHER__BASE_URL", messages_api.base_url)
    _seed(3)
    data = json.loads(cli("teacher", "label", "--dry-run", "2", "--json").stdout)
    assert data["emails"] == 2 and data["avg_chars"] == pytest.approx((102 + 202) / 2)
    fixed = prompt_tokens(taxonomy_of(load_settings(None)))
    assert data["prompt_tokens"] == fixed
    assert data["estimated_usd"] == pytest.approx(estimate_cost(
        2, (102 + 202) / 2, load_settings(None).teacher.price_table, system_tokens=fixed,
        cached_system=fixed >= 1024), rel=1e-4)
    batch = json.loads(cli("teacher", "label", "--dry-run", "2", "--batch", "--json").stdout)
    assert batch["estimated_usd"] == pytest.approx(data["estimated_usd"] / 2, rel=1e-3)
    assert "nothing was sent" in cli("teacher", "label", "--dry-run", "5").stdout
    assert messages_api.requests == []


def test_label_records_every_call_and_retries_failures_next_time(cli, messages_api,
                                                                 monkeypatch):
    monkeypatch.setenv("UNDERSTUDY_TEACHER__BASE_URL", messages_api.base_url)
    monkeypatch.setenv("UNDERSTUDY_TEACHER__MAX_RETRIES", "1")
    _seed(3)
    messages_api.enqueue("valid", "malformed_json", "valid")
    first = json.loads(cli("teacher", "label", "--json").stdout)
    assert (first["labelled"], first["failed"], first["not_attempted"]) == (2, 1, 0)
    messages_api.start_outage(529, retry_after=0)
    res = cli("teacher", "label", "--json", ok=False)
    assert res.exit_code == 4 and "529" in json.loads(res.stdout)["stopped"]
    messages_api.end_outage()
    last = json.loads(cli("teacher", "label", "--json").stdout)
    assert last["labelled"] == 1
    assert "labelled 0 of 0" in cli("teacher", "label").stdout
    with _db().session() as s:
        rows = s.execute(select(ModelCall.message_id, ModelCall.error, ModelCall.retries)
                         .order_by(ModelCall.id)).all()
    assert len(rows) == 5                                 # 3 + 1 outage failure + 1 retry
    ok = [m for m, e, _ in rows if e is None]
    assert sorted(ok) == [1, 2, 3]                        # each email labelled exactly once
    outage_row = rows[3]
    assert "unavailable" in outage_row.error and outage_row.retries == 1


def test_batch_label_via_cli(cli, messages_api, monkeypatch):
    monkeypatch.setenv("UNDERSTUDY_TEACHER__BASE_URL", messages_api.base_url)
    _seed(2)
    data = json.loads(cli("teacher", "label", "--batch", "--poll-interval", "0", "--json").stdout)
    assert data["labelled"] == 2 and data["batch"] is True
    with _db().session() as s:
        assert {b for b in s.scalars(select(ModelCall.batch_id))} != {None}


def test_label_without_api_key_says_how_to_fix(cli):
    res = cli("teacher", "label", ok=False)
    assert res.exit_code == 2 and "ANTHROPIC_API_KEY" in res.output


# -- the recorded teacher -------------------------------------------------------------------

def test_recorded_teacher_matches_by_id_message_id_and_text(records_file):
    t = RecordedTeacher.from_file(records_file, taxonomy_names=list(
        load_settings(None).taxonomy.categories))
    a, b, c, d = t.label([
        Email(id="r1", text="whatever"),
        Email(id="99", message_id="r2", text="?"),
        Email(id="100", subject="Locked out", new_text="I cannot  sign in\nsince yesterday."),
        Email(id="101", text="never seen"),
    ])
    assert (a.category, a.category_probs, a.draft) == ("billing", RECORDS[0]["category_probs"],
                                                       "Hello Ann, ...")
    assert b.category == "technical" and b.category_probs == {"technical": 1.0}
    assert c.category == "account" and c.needs_reply is True
    assert not d.ok and "no recorded answer" in d.error
    assert all(r.cost_usd == 0 and r.backend == "recorded" for r in (a, b, c, d))


def test_build_teacher_recorded_rejects_unknown_categories(tmp_path, records_file):
    s = load_settings(None, teacher={"backend": "recorded", "records": str(records_file)})
    t = build_teacher(s)
    assert len(t) == 3
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps(TeacherRecord(id="z", body="b", category="weird").to_dict()) + "\n")
    t2 = build_teacher(load_settings(None, teacher={"backend": "recorded", "records": str(odd)}))
    [r] = t2.label([Email(id="z")])
    assert not r.ok and "not in the taxonomy" in r.error


def test_interrupted_batch_is_collected_next_run_not_paid_twice(cli, messages_api,
                                                                monkeypatch):
    monkeypatch.setenv("UNDERSTUDY_TEACHER__BASE_URL", messages_api.base_url)
    _seed(2)
    messages_api.batch_polls_until_done = 1000         # the batch takes "hours"
    res = cli("teacher", "label", "--batch", "--poll-interval", "0", "--max-wait", "0",
              "--json", ok=False)
    first = json.loads(res.stdout)
    assert res.exit_code == 4 and len(first["pending_batches"]) == 1
    assert first["labelled"] == 0
    again = json.loads(cli("teacher", "label", "--batch", "--max-wait", "0", "--json",
                           ok=False).stdout)
    assert again["requested"] == 0 and again["pending_batches"] == first["pending_batches"]
    messages_api.batch_polls_until_done = 0            # now it has ended
    last = json.loads(cli("teacher", "label", "--batch", "--json").stdout)
    assert last["collected_batches"] == first["pending_batches"] and last["labelled"] == 2
    submits = [r for r in messages_api.requests
               if (r.method, r.path) == ("POST", "/v1/messages/batches")]
    assert len(submits) == 1                           # never submitted twice
    with _db().session() as s:
        rows = s.execute(select(ModelCall.message_id, ModelCall.batch_id)).all()
        assert sorted(m for m, _ in rows) == [1, 2]
        assert {b for _, b in rows} == set(first["pending_batches"])


def test_import_warns_about_categories_outside_the_taxonomy(cli, tmp_path):
    f = tmp_path / "b77.jsonl"
    f.write_text(json.dumps({"id": "x", "body": "card?", "category": "card_arrival"}) + "\n")
    res = cli("dataset", "import", str(f), "--json")
    assert json.loads(res.stdout)["categories_outside_taxonomy"] == ["card_arrival"]
    assert "not in the configured taxonomy: card_arrival" in res.stderr

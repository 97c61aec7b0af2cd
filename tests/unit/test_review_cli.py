"""`understudy review ...` and `serve` through the real CLI (typer CliRunner)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent.cli import app
from agent.review.auth import verify_password
from storage.reviews import get_item
from tests.unit.review_seed import seed_escalated


@pytest.fixture
def runner():
    return CliRunner()


def test_hash_password(runner):
    r = runner.invoke(app, ["review", "hash-password", "--stdin", "--json"],
                      input="s3cret-passw0rd\n")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["env"] == "UNDERSTUDY_REVIEW_PASSWORD_HASH"
    assert verify_password("s3cret-passw0rd", out["hash"])
    assert not verify_password("s3cret-passw0rd!", out["hash"])
    # Prompt mode: prompts go to stderr, stdout is only the hash (for `$(...)`).
    r = runner.invoke(app, ["review", "hash-password"], input="abcdefgh1\nabcdefgh1\n")
    assert r.exit_code == 0, r.output
    assert verify_password("abcdefgh1", r.stdout.strip())
    r = runner.invoke(app, ["review", "hash-password"], input="abcdefgh1\nabcdefgh2\n"
                      "abcdefgh3\nabcdefgh3\n")
    assert verify_password("abcdefgh3", r.stdout.strip())
    r = runner.invoke(app, ["review", "hash-password", "--stdin"], input="short\n")
    assert r.exit_code == 1 and "at least 8" in r.output


def test_list_and_show(runner, sqlite_db):
    a = seed_escalated(sqlite_db, account="support", n=2, ages_h=[3, 30])
    b = seed_escalated(sqlite_db, account="sales", n=1, start=5, ages_h=[1],
                       category="technical")
    r = runner.invoke(app, ["review", "list"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "3 draft(s) waiting for review"
    assert [int(x.split()[0]) for x in lines[:-1]] == [
        b[0]["draft_id"], a[0]["draft_id"], a[1]["draft_id"]]
    r = runner.invoke(app, ["review", "list", "--limit", "2"])   # says what it left out
    assert r.stdout.strip().splitlines()[-1] == (
        "2 of 3 draft(s) waiting for review shown, newest first (--limit 3 for all)")
    out = json.loads(runner.invoke(app, ["review", "list", "--limit", "1", "--json"]).stdout)
    assert (out["count"], out["total"]) == (1, 3)
    r = runner.invoke(app, ["review", "list", "--account", "support", "--max-age", "1d",
                            "--json"])
    out = json.loads(r.stdout)
    assert out["count"] == 1 and out["items"][0]["draft_id"] == a[0]["draft_id"]
    r = runner.invoke(app, ["review", "show", "99999999999999999999"])
    assert r.exit_code == 1 and "no draft with id" in r.output and r.exception is not None \
        and isinstance(r.exception, SystemExit)
    r = runner.invoke(app, ["review", "list", "--max-age", "1000000d"])
    assert r.exit_code == 2 and "more than 100 years" in r.output
    r = runner.invoke(app, ["review", "list", "--category", "technical", "--json"])
    assert [i["draft_id"] for i in json.loads(r.stdout)["items"]] == [b[0]["draft_id"]]
    r = runner.invoke(app, ["review", "list", "--max-age", "soon"])
    assert r.exit_code == 2 and "unit" in r.output

    r = runner.invoke(app, ["review", "show", str(a[0]["draft_id"])])
    assert r.exit_code == 0, r.output
    for text in (a[0]["subject"], "Decided by teacher (claude-sonnet-4-5): billing / normal",
                 "category 61%", "Rationale: Double charge", "We have refunded it."):
        assert text in r.stdout, text
    r = runner.invoke(app, ["review", "show", str(a[0]["draft_id"]), "--json"])
    shown = json.loads(r.stdout)
    assert shown["status"] == "pending_review" and shown["draft"] == a[0]["draft"]
    assert shown["email"]["account"] == "support" and shown["decision"]["source"] == "teacher"
    r = runner.invoke(app, ["review", "show", "999"])
    assert r.exit_code == 1 and "review list" in r.output


def test_reject(runner, sqlite_db):
    (s,) = seed_escalated(sqlite_db, n=1)
    r = runner.invoke(app, ["review", "reject", str(s["draft_id"])])
    assert r.exit_code == 2                      # --reason is required
    r = runner.invoke(app, ["review", "reject", str(s["draft_id"]), "--reason", "wrong tone",
                            "--category", "other", "--no-needs-reply", "--reviewer", "ana"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"draft {s['draft_id']} rejected"
    item = get_item(sqlite_db, s["draft_id"])
    rev = item.reviews[0]
    assert (item.status, rev.reason, rev.category, rev.needs_reply, rev.reviewer) == (
        "rejected", "wrong tone", "other", False, "ana")
    r = runner.invoke(app, ["review", "reject", str(s["draft_id"]), "-r", "x",
                            "--category", "bogus"])
    assert r.exit_code == 0 and "already was" in r.stdout
    (t,) = seed_escalated(sqlite_db, n=1, start=3)
    r = runner.invoke(app, ["review", "reject", str(t["draft_id"]), "-r", "x",
                            "--category", "bogus"])
    assert r.exit_code == 1 and "unknown category 'bogus'" in r.output


def test_edit_in_editor_keeps_text_when_mailbox_is_not_configured(runner, sqlite_db,
                                                                   monkeypatch):
    (s,) = seed_escalated(sqlite_db, n=1)
    # $EDITOR is run by the shell with the temp file as its last argument.
    monkeypatch.setenv("EDITOR", "sed -i s/refunded/credited/")
    monkeypatch.delenv("VISUAL", raising=False)
    r = runner.invoke(app, ["review", "edit", str(s["draft_id"])])
    # No account is configured, so the approval is kept but cannot be delivered: exit 4.
    assert r.exit_code == 4, r.output
    assert "not in the configuration" in r.output and "approve it again" in r.output
    item = get_item(sqlite_db, s["draft_id"])
    assert item.status == "approved" and not item.delivered
    assert item.final_draft == s["draft"].replace("refunded", "credited")
    assert item.reviews[0].action == "edit"


def test_edit_from_file(runner, sqlite_db, tmp_path):
    (s,) = seed_escalated(sqlite_db, n=1)
    f = tmp_path / "reply.txt"
    f.write_text("Thanks, fixed.\n")
    r = runner.invoke(app, ["review", "edit", str(s["draft_id"]), "--body-file", str(f),
                            "--priority", "high"])
    assert r.exit_code == 4
    rev = get_item(sqlite_db, s["draft_id"]).reviews[0]
    assert (rev.final_draft, rev.priority) == ("Thanks, fixed.", "high")


def test_serve_refuses_to_start_without_a_login(runner, sqlite_db):
    r = runner.invoke(app, ["serve"])
    assert r.exit_code == 2
    assert "UNDERSTUDY_REVIEW_PASSWORD_HASH" in r.output and "hash-password" in r.output


def test_serve_rejects_a_malformed_hash(runner, sqlite_db, monkeypatch):
    monkeypatch.setenv("UNDERSTUDY_REVIEW_PASSWORD_HASH", "plaintext-password")
    r = runner.invoke(app, ["serve"])
    assert r.exit_code == 2 and "hash-password" in r.output
    assert "plaintext-password" not in r.output

"""End to end: review escalated drafts in headless Chromium against a real Dovecot.

Three escalated emails (plus one with hostile HTML) are APPENDed to the Dovecot INBOX and
seeded in SQL as teacher decisions with pending drafts. The real review app runs under
uvicorn on a free 127.0.0.1 port; Chromium (Debian's, driven by Playwright) logs in,
approves one draft with the keyboard, edits and approves another, rejects a third, and
opens the hostile email, then settles an audit disagreement on the disputes page. Then
the Dovecot Drafts folder must hold exactly the two approved replies with \\Draft and the
threading headers, the audited email the settled category's keyword, and SQL the gold
labels.
Screenshot: test-artifacts/review-queue.png.
"""

from __future__ import annotations

import email
import re
import socket
import threading
import time
from email import policy
from pathlib import Path

import pytest
from sqlalchemy import update

from agent.review import build_review_app
from config import AccountSettings, Settings
from storage.models import DraftRow, Message
from storage.reviews import get_item, gold_labels
from tests.unit.review_seed import seed_audited, seed_escalated

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking"]
PASSWORD = "review-e2e-password"
HOSTILE_HTML = (
    "<p>Please see the <b>attached</b> statement.</p>"
    "<script>window.__xss = 'script'</script>"
    "<img src=x onerror=\"window.__xss='onerror'\">"
    "<svg onload=\"window.__xss='svg'\"><circle r=5></circle></svg>"
    "<a id=approve href=\"javascript:window.__xss='link'\">pay now</a>"
    "<iframe srcdoc=\"<script>parent.__xss='iframe'</script>\"></iframe>"
    "<meta http-equiv=refresh content=\"0;url=https://evil.example/\">"
    "<div style=\"position:fixed;inset:0;background:red\">overlay</div>"
    "<img src=\"https://tracker.example/open.gif?u=1\" alt=\"tracker\">"
    "<form action=\"https://evil.example/\"><button>claim</button></form>")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """The review app under a real uvicorn, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False,
                                                    log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _imap(dovecot):
    from imapclient import IMAPClient

    c = IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=10)
    c.login(dovecot.user, dovecot.password)
    return c


def _append_to_inbox(dovecot, db, seeded: list[dict]) -> None:
    """APPEND the seeded raw messages and record their real UIDs in SQL."""
    c = _imap(dovecot)
    try:
        for s in seeded:
            resp = c.append("INBOX", s["raw"])
            m = re.search(rb"APPENDUID (\d+) (\d+)", resp if isinstance(resp, bytes) else b"")
            if m:
                with db.session() as sess:
                    sess.execute(update(Message).where(Message.id == s["message_db_id"])
                                 .values(uidvalidity=int(m.group(1)), uid=int(m.group(2))))
    finally:
        c.logout()


def _drafts_on_server(dovecot) -> list[tuple[tuple, email.message.EmailMessage]]:
    c = _imap(dovecot)
    try:
        c.select_folder("Drafts", readonly=True)
        uids = c.search("ALL")
        out = []
        for uid, data in c.fetch(uids, ["FLAGS", "BODY.PEEK[]"]).items():
            out.append((data[b"FLAGS"], email.message_from_bytes(data[b"BODY[]"],
                                                                  policy=policy.default)))
        return out
    finally:
        c.logout()


@pytest.mark.e2e
def test_review_in_browser_writes_two_drafts_to_dovecot(dovecot, sqlite_db, state_dir,
                                                        monkeypatch):
    pytest.importorskip("agent.mail.actions", reason="mail capability not landed yet")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed: run scripts/setup")
    from agent.review.auth import hash_password

    db = sqlite_db
    monkeypatch.setenv("UNDERSTUDY_REVIEW_PASSWORD_HASH", hash_password(PASSWORD))
    settings = Settings(state_dir=state_dir,
                        accounts=[AccountSettings(**dovecot.account_settings(name="test"))])
    # Arrival times: the three to review are the newest; the hostile one is older.
    seeded = seed_escalated(db, account="test", address=dovecot.user, n=3, ages_h=[0.1, 1, 2])
    hostile = seed_escalated(db, account="test", address=dovecot.user, n=1, start=3,
                             ages_h=[5], html=HOSTILE_HTML)
    # An email the student handled alone (billing) that the teacher's audit put in account.
    [audited_id] = seed_audited(db, [("billing", "account")], account="test", start=9)
    with db.session() as sess:
        m = sess.get(Message, audited_id)
        audited = {"message_db_id": audited_id, "raw": m.raw, "message_id": m.message_id}
    _append_to_inbox(dovecot, db, seeded + hostile + [audited])
    first, second, third = seeded
    edited_text = "Hello,\n\nWe have refunded the duplicate charge today.\n\nKind regards,\nAna"

    ARTIFACTS.mkdir(exist_ok=True)
    app = build_review_app(settings, db, reviewer_name="ana")
    dialogs: list[str] = []
    with _Server(app) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            csp_violations: list[str] = []
            page.on("console", lambda m: csp_violations.append(m.text)
                    if "Content Security Policy" in m.text else None)

            # Log in.
            page.goto(srv.url + "/")
            expect(page).to_have_url(srv.url + "/login")
            page.fill("#password", PASSWORD)
            page.click("#login")
            expect(page.locator("nav.queue a.qitem")).to_have_count(4)
            items = page.locator("nav.queue a.qitem")
            expect(items.first).to_have_attribute("aria-current", "true")
            expect(page.locator("#subject")).to_have_text(first["subject"])
            page.screenshot(path=str(ARTIFACTS / "review-queue.png"), full_page=True)

            # 1. Approve the newest with the keyboard: j then k comes back, a approves.
            page.keyboard.press("j")
            expect(page.locator("#subject")).to_have_text(second["subject"])
            page.keyboard.press("k")
            expect(page.locator("#subject")).to_have_text(first["subject"])
            page.keyboard.press("a")
            expect(page.locator("#flash")).to_contain_text(
                f"Draft {first['draft_id']} approved")
            expect(page.locator("#subject")).to_have_text(second["subject"])

            # 2. Edit the second (e focuses the editor), correct its labels, approve.
            page.keyboard.press("e")
            expect(page.locator("#draft")).to_be_focused()
            page.fill("#draft", edited_text)
            page.select_option("#category", "account")
            page.select_option("#priority", "high")
            page.keyboard.press("Escape")
            page.keyboard.press("a")
            expect(page.locator("#flash")).to_contain_text(
                f"Draft {second['draft_id']} edited and approved")

            # 3. Reject the third: r focuses the reason, Enter rejects.
            expect(page.locator("#subject")).to_have_text(third["subject"])
            page.keyboard.press("r")
            expect(page.locator("#reason")).to_be_focused()
            page.keyboard.type("Customer already answered by phone")
            page.uncheck("#needs_reply")
            page.locator("#reason").focus()
            page.keyboard.press("Enter")
            expect(page.locator("#flash")).to_contain_text(f"Draft {third['draft_id']} rejected")

            # 4. The hostile email is shown inert: nothing ran, no overlay, no form.
            expect(page.locator("nav.queue a.qitem")).to_have_count(1)
            expect(page.locator("#subject")).to_have_text(hostile[0]["subject"])
            expect(page.locator(".email-html")).to_contain_text("attached")
            page.wait_for_timeout(300)
            assert page.evaluate("window.__xss") is None
            assert page.evaluate("parent.__xss") is None
            assert dialogs == []
            assert page.locator(".email-html script, .email-html svg, .email-html iframe, "
                                ".email-html form, .email-html [style], .email-html [id]"
                                ).count() == 0
            assert page.locator(".email-html a").get_attribute("href") is None
            expect(page.locator(".email")).to_contain_text("Remote images blocked")
            assert page.url.startswith(srv.url)            # no meta refresh happened
            page.screenshot(path=str(ARTIFACTS / "review-hostile-email.png"), full_page=True)

            # 5. Settle the audit disagreement: the teacher was right.
            page.click("#disputes-link")
            expect(page.locator("article.dispute")).to_have_count(1)
            page.screenshot(path=str(ARTIFACTS / "review-disputes.png"), full_page=True)
            page.click(f"#dispute-{audited_id} button:has-text('teacher: account')")
            expect(page.locator("#flash")).to_contain_text(
                f"Email {audited_id} settled as account: the teacher was right")
            expect(page.locator("article.dispute")).to_have_count(0)
            assert csp_violations == [], csp_violations     # our own page needs no exceptions
        finally:
            browser.close()

    # The mailbox: exactly the two approved replies, threaded, flagged \Draft.
    drafts = _drafts_on_server(dovecot)
    assert len(drafts) == 2
    by_parent = {m["In-Reply-To"]: (flags, m) for flags, m in drafts}
    assert set(by_parent) == {first["message_id"], second["message_id"]}
    for s in (first, second):
        flags, m = by_parent[s["message_id"]]
        assert b"\\Draft" in flags
        assert s["message_id"] in m["References"]
        assert m["Subject"] == "Re: " + s["subject"]
        assert dovecot.user in m["From"]
    body = lambda m: m.get_body(("plain",)).get_content().replace("\r\n", "\n").strip()  # noqa: E731
    assert body(by_parent[first["message_id"]][1]) == first["draft"]
    assert body(by_parent[second["message_id"]][1]) == edited_text

    # The corrected labels are on the second email's keywords; the others are untouched.
    c = _imap(dovecot)
    try:
        c.select_folder("INBOX", readonly=True)
        flags = {}
        for uid, data in c.fetch(c.search("ALL"), ["FLAGS", "BODY.PEEK[HEADER]"]).items():
            mid = email.message_from_bytes(data[b"BODY[HEADER]"])["Message-ID"]
            flags[mid] = {f.decode() for f in data[b"FLAGS"]}
    finally:
        c.logout()
    assert {"understudy:category:account", "understudy:priority:high"} <= flags[
        second["message_id"]]
    assert not any(f.startswith("understudy:") for f in flags[first["message_id"]])
    # the settled category is on the audited email (the student's decision said billing)
    assert {"understudy:category:account", "understudy:priority:normal"} <= flags[
        audited["message_id"]]

    # SQL: draft states and the gold labels the next retrain will weigh higher.
    assert get_item(db, first["draft_id"]).delivered
    assert get_item(db, second["draft_id"]).final_draft == edited_text
    assert get_item(db, third["draft_id"]).status == "rejected"
    gold = {g["message_db_id"]: g for g in gold_labels(db)}
    assert set(gold) == {s["message_db_id"] for s in seeded} | {audited_id}
    assert (gold[audited_id]["action"], gold[audited_id]["category"]) == ("settle", "account")
    assert (gold[first["message_db_id"]]["action"], gold[first["message_db_id"]]["category"]
            ) == ("approve", "billing")
    g2 = gold[second["message_db_id"]]
    assert (g2["action"], g2["category"], g2["priority"], g2["draft"]) == (
        "edit", "account", "high", edited_text)
    g3 = gold[third["message_db_id"]]
    assert (g3["action"], g3["needs_reply"], g3["draft"]) == ("reject", False, None)

    # A crash after the APPEND but before it was recorded: approving again must find the
    # draft on the server by its Message-ID instead of writing a second one. While the
    # crashed delivery could still be running, no one else delivers.
    from datetime import datetime, timedelta, timezone

    from agent.review import build_review_service
    from agent.review.errors import AlreadyReviewed

    with db.session() as s:
        s.execute(update(DraftRow).where(DraftRow.id == first["draft_id"])
                  .values(appended_at=None, appended_uid=None,
                          updated_at=datetime.now(timezone.utc)))
    with pytest.raises(AlreadyReviewed, match="being delivered"):
        build_review_service(settings, db).approve(first["draft_id"], reviewer="ana")
    with db.session() as s:
        s.execute(update(DraftRow).where(DraftRow.id == first["draft_id"])
                  .values(updated_at=datetime.now(timezone.utc) - timedelta(minutes=10)))
    out = build_review_service(settings, db).approve(first["draft_id"], reviewer="ana")
    assert out.delivered and not out.changed
    assert len(_drafts_on_server(dovecot)) == 2

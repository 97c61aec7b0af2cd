"""Where approved drafts go: SMTP for accounts that enable sending (a real local SMTP
server from the stdlib), the mailbox otherwise, and a clear error for unknown accounts."""

from __future__ import annotations

import email
import socket
import threading
import warnings
from email import policy

import pytest

from agent.review.delivery import SmtpSender, appenders_from_settings, reply_subject
from agent.review.errors import DeliveryFailed
from config import AccountSettings, Settings
from storage.types import Email

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import asyncore
    import smtpd


ORIGINAL = Email(id="1", subject="Refund?", text="Where is my refund?",
                 from_addr="Customer <c@customers.example>",
                 message_id="<orig-1@customers.example>",
                 references=("<older@customers.example>",))


@pytest.fixture
def smtp_sink():
    got: list[tuple[str, list[str], bytes]] = []

    class Sink(smtpd.SMTPServer):
        def process_message(self, peer, mailfrom, rcpttos, data, **kw):
            got.append((mailfrom, rcpttos, data))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Sink(("127.0.0.1", port), None, decode_data=False)
    t = threading.Thread(target=asyncore.loop, kwargs={"timeout": 0.05}, daemon=True)
    t.start()
    yield port, got
    server.close()
    t.join(5)


def test_smtp_sender_sends_a_threaded_reply(smtp_sink):
    port, got = smtp_sink
    send = SmtpSender(host="127.0.0.1", port=port, from_addr="support@shop.example",
                      user=None, password=None)
    res = send(ORIGINAL, "Your refund left today.", draft_message_id="<r-1@shop.example>")
    assert res.message_id == "<r-1@shop.example>" and res.folder is None
    ((mailfrom, rcpt, data),) = got
    assert mailfrom == "support@shop.example" and rcpt == ["c@customers.example"]
    m = email.message_from_bytes(data, policy=policy.default)
    assert m["Subject"] == "Re: Refund?" and m["Message-ID"] == "<r-1@shop.example>"
    assert m["In-Reply-To"] == "<orig-1@customers.example>"
    assert m["References"] == "<older@customers.example> <orig-1@customers.example>"
    assert m.get_content().strip() == "Your refund left today."


def test_smtp_reply_goes_to_reply_to(smtp_sink):
    from dataclasses import replace

    port, got = smtp_sink
    send = SmtpSender(host="127.0.0.1", port=port, from_addr="support@shop.example",
                      user=None, password=None)
    form = replace(ORIGINAL, from_addr="noreply@forms.example",
                   reply_to=("dana@customers.example", "ops@customers.example"))
    send(form, "Done.", draft_message_id="<r-2@shop.example>")
    ((_mailfrom, rcpt, data),) = got
    assert rcpt == ["dana@customers.example", "ops@customers.example"]
    m = email.message_from_bytes(data, policy=policy.default)
    assert m["To"] == "dana@customers.example, ops@customers.example"


def test_reply_subject():
    assert reply_subject("Refund?") == "Re: Refund?"
    assert reply_subject("RE: Refund?") == "RE: Refund?"
    assert reply_subject("") == "Re:"


def test_routing_by_account(monkeypatch):
    monkeypatch.setenv("ACCT_PW", "pw-123456")
    common = {"host": "127.0.0.1", "user": "u@shop.example", "password_env": "ACCT_PW",
              "security": "none"}
    s = Settings(accounts=[
        AccountSettings(name="sends", smtp_host="127.0.0.1", smtp_port=2525,
                        send_enabled=True, **common),
        AccountSettings(name="drafts", smtp_host="127.0.0.1", **common)])
    appender_for = appenders_from_settings(s)
    assert isinstance(appender_for("sends"), SmtpSender)
    # Without send_enabled the mailbox's Drafts folder is used, even with an smtp_host.
    assert getattr(appender_for("drafts"), "__name__", "") == "append_draft"
    assert appender_for("sends") is appender_for("sends")
    with pytest.raises(DeliveryFailed, match="not in the configuration"):
        appender_for("nope")

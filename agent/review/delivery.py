"""Where an approved draft goes: the account's Drafts folder, or SMTP when sending is enabled.

``appenders_from_settings`` turns the account list into a function ``account name ->
appender``; an appender has the signature of
``agent.mail.actions.MailboxActions.append_draft(original, body, *, draft_message_id)``.

Sending is opt-in per account (``send_enabled = true`` and ``smtp_host``): then the reply
is sent over SMTP (STARTTLS unless the port is 465, which uses implicit TLS; the IMAP
login and password are reused) instead of being left in Drafts. SMTP cannot be asked
"did you already send this?", so a crash between sending and recording the delivery
could send twice on a retry; the Drafts path has no such window.
"""

from __future__ import annotations

import ipaddress
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Callable

from agent.review.errors import DeliveryFailed
from agent.review.service import Appender
from storage.types import Email


@dataclass(frozen=True)
class SentResult:
    """What :class:`SmtpSender` returns (the same fields as an APPEND result)."""

    folder: str | None
    uidvalidity: int | None
    uid: int | None
    message_id: str


def reply_subject(subject: str) -> str:
    s = (subject or "").strip()
    return s if s[:3].lower() == "re:" else f"Re: {s}".strip()


def build_reply(original: Email, body: str, *, from_addr: str, message_id: str) -> EmailMessage:
    """A plain-text reply threaded under ``original`` (In-Reply-To and References)."""
    msg = EmailMessage()
    msg["From"] = from_addr
    msg["To"] = ", ".join(original.reply_addrs)
    msg["Subject"] = reply_subject(original.subject)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = message_id
    if original.message_id:
        msg["In-Reply-To"] = original.message_id
        refs = [r for r in original.references if r] + [original.message_id]
        msg["References"] = " ".join(dict.fromkeys(refs))
    msg.set_content(body)
    return msg


class SmtpSender:
    """Sends approved replies for one account (flat arguments; see ``appenders_from_settings``)."""

    def __init__(self, *, host: str, port: int, from_addr: str, user: str | None,
                 password: str | None, timeout_s: float = 30.0,
                 ca_file: str | None = None):
        self.host, self.port, self.from_addr = host, port, from_addr
        self.user, self.password, self.timeout_s = user, password, timeout_s
        self.ca_file = ca_file

    def __call__(self, original: Email, body: str, *, draft_message_id: str) -> SentResult:
        if not original.reply_addrs:
            raise DeliveryFailed("the original email has no From or Reply-To address to "
                                 "reply to")
        msg = build_reply(original, body, from_addr=self.from_addr,
                          message_id=draft_message_id)
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.port == 465:
            client: smtplib.SMTP = smtplib.SMTP_SSL(self.host, self.port,
                                                    timeout=self.timeout_s, context=ctx)
        else:
            client = smtplib.SMTP(self.host, self.port, timeout=self.timeout_s)
        with client:
            tls = self.port == 465
            client.ehlo()
            if not tls and client.has_extn("starttls"):
                client.starttls(context=ctx)
                client.ehlo()
                tls = True
            if self.user and self.password and client.has_extn("auth"):
                if not tls and not _is_loopback(self.host):
                    raise DeliveryFailed(
                        f"SMTP server {self.host}:{self.port} offers no TLS; refusing to send "
                        "the password in clear (use port 465 or a server with STARTTLS)")
                client.login(self.user, self.password)
            client.send_message(msg)
        return SentResult(folder=None, uidvalidity=None, uid=None, message_id=draft_message_id)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def actions_from_settings(settings: Any) -> Callable[[str], Any]:
    """``account name -> MailboxActions`` (one per account, so one IMAP connection)."""
    cache: dict[str, Any] = {}

    def actions_for(name: str) -> Any:
        if name not in cache:
            from agent.mail import build_mailbox_actions

            cache[name] = build_mailbox_actions(settings, name)
        return cache[name]

    return actions_for


def appenders_from_settings(settings: Any, actions_for: Callable[[str], Any] | None = None
                            ) -> Callable[[str | None], Appender]:
    """``account name -> appender`` for every configured account (built lazily, cached)."""
    from config.secrets import read_secret

    accounts = {a.name: a for a in settings.accounts}
    actions_for = actions_for or actions_from_settings(settings)
    cache: dict[str, Appender] = {}

    def appender_for(name: str | None) -> Appender:
        if name is None or name not in accounts:
            raise DeliveryFailed(
                f"the email's account {name!r} is not in the configuration; add it under "
                "[[accounts]] so the approved draft can be written to its Drafts folder")
        if name not in cache:
            acct = accounts[name]
            if acct.send_enabled and acct.smtp_host:
                password = read_secret(acct.password_env) if acct.password_env else None
                cache[name] = SmtpSender(
                    host=acct.smtp_host, port=acct.smtp_port,
                    from_addr=acct.address or acct.user, user=acct.user, password=password,
                    ca_file=str(acct.ca_file) if acct.ca_file else None)
            else:
                cache[name] = actions_for(name).append_draft
        return cache[name]

    return appender_for


def relabelers_from_settings(settings: Any, actions_for: Callable[[str], Any] | None = None
                             ) -> Callable[[str | None], Any]:
    """``account name -> MailboxActions.set_keywords`` (None for an unknown account)."""
    names = {a.name for a in settings.accounts}
    actions_for = actions_for or actions_from_settings(settings)

    def relabel_for(name: str | None) -> Any:
        return actions_for(name).set_keywords if name in names else None

    return relabel_for

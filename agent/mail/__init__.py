"""Mail in and out over IMAP: parsing, exactly-once ingestion, idempotent mailbox actions.

Builders turn :class:`config.Settings` into flat constructor arguments:

    >>> sources = build_mail_sources(settings, db)         # doctest: +SKIP
    >>> sum(s.sync() for s in sources)                     # one ingest pass
    >>> actions = build_mailbox_actions(settings, "support")  # doctest: +SKIP
    >>> actions.set_keywords(email, "billing", "high")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.mail.errors import (  # noqa: F401 - re-exported
    FolderNotFound,
    MailAuthError,
    MailConnectError,
    MailError,
    MessageNotFound,
    TokenCommandError,
)

if TYPE_CHECKING:
    from agent.mail.actions import MailboxActions
    from agent.mail.auth import Connector
    from agent.mail.source import ImapMailSource
    from config import AccountSettings, Settings
    from storage.db import Database


def build_connector(account: "AccountSettings", *, timeout_s: float = 60.0) -> "Connector":
    from agent.mail.auth import Connector

    return Connector(host=account.host, port=account.effective_port, security=account.security,
                     user=account.user, auth=account.auth, password_env=account.password_env,
                     oauth2_token_command=account.oauth2_token_command,
                     ca_file=str(account.ca_file) if account.ca_file else None,
                     timeout_s=timeout_s)


def build_mail_sources(settings: "Settings", db: "Database", *,
                       accounts: list[str] | None = None) -> list["ImapMailSource"]:
    """One :class:`ImapMailSource` per configured account (or the named ``accounts``)."""
    from agent.mail.source import ImapMailSource

    d = settings.daemon
    return [ImapMailSource(db, account=a.name, connector=build_connector(a), folders=a.folders,
                           fetch_batch=d.fetch_batch, poll_interval_s=d.poll_interval_s,
                           idle_timeout_s=d.idle_timeout_s)
            for a in settings.accounts if accounts is None or a.name in accounts]


def build_mailbox_actions(settings: "Settings", account_name: str) -> "MailboxActions":
    """The :class:`MailboxActions` of one configured account (KeyError-like if unknown)."""
    from agent.mail.actions import MailboxActions

    by_name = {a.name: a for a in settings.accounts}
    if account_name not in by_name:
        raise MailError(f"no account named {account_name!r} in the configuration; "
                        f"configured: {', '.join(sorted(by_name)) or 'none'}")
    a = by_name[account_name]
    return MailboxActions(build_connector(a), address=a.address or a.user,
                          drafts_folder=a.drafts_folder, account=a.name)

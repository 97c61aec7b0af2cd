"""Mail exceptions; each message says how to fix the problem."""

from __future__ import annotations


class MailError(Exception):
    """Base class for IMAP problems."""


class MailConnectError(MailError):
    """The IMAP server could not be reached (network, TLS, wrong host/port/security)."""


class MailAuthError(MailError):
    """The server refused the login (wrong user/password, expired or missing OAuth2 token)."""


class TokenCommandError(MailAuthError):
    """The configured ``oauth2_token_command`` failed or printed no token."""


class FolderNotFound(MailError):
    """A configured folder does not exist on the server."""


class MessageNotFound(MailError):
    """The message an action targets is no longer where it was, nor where it would go."""

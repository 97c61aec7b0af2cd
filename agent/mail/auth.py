"""Connecting and logging in: TLS, STARTTLS or plain; password or XOAUTH2.

Gmail and Microsoft 365 refuse plain passwords for most accounts, so XOAUTH2 takes an
access token printed by a configured command (e.g. ``oauth2l fetch --credentials ...``
or a small script around the provider's refresh-token flow). The command prints either
the bare token, or JSON with ``access_token`` and ``expires_in`` (seconds) or
``expires_at`` (epoch seconds). Tokens are cached until a minute before they expire (a
bare token: ``token_ttl_s``) and refreshed at once when the server rejects one.

    >>> c = Connector(host="127.0.0.1", port=143, security="none", user="u",
    ...               password_env="IMAP_PW")            # doctest: +SKIP
    >>> client = c.connect()                             # logged-in IMAPClient
"""

from __future__ import annotations

import json
import shlex
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field

from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from agent.mail.errors import MailAuthError, MailConnectError, TokenCommandError
from config.secrets import MissingSecret, read_secret, register_secret


class TokenSource:
    """Runs ``command`` for an OAuth2 access token and caches it until it expires."""

    def __init__(self, command: str, *, token_ttl_s: float = 3000.0, timeout_s: float = 30.0):
        self.command = command
        self.token_ttl_s = token_ttl_s
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def token(self, *, refresh: bool = False) -> str:
        with self._lock:
            if refresh or self._token is None or time.time() >= self._expires:
                self._token, self._expires = self._run()
            return self._token

    def _run(self) -> tuple[str, float]:
        try:
            out = subprocess.run(shlex.split(self.command), capture_output=True, text=True,
                                 timeout=self.timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TokenCommandError(f"oauth2_token_command failed to run ({e}); check the "
                                    "command in the account's config") from e
        if out.returncode != 0:
            raise TokenCommandError(
                f"oauth2_token_command exited with {out.returncode}: "
                f"{out.stderr.strip()[:300]}; run it by hand to see why")
        text = out.stdout.strip()
        now = time.time()
        ttl = self.token_ttl_s
        token = text
        if text.startswith("{"):
            try:
                d = json.loads(text)
            except ValueError as e:
                raise TokenCommandError(f"oauth2_token_command printed invalid JSON: {e}") from e
            token = str(d.get("access_token") or d.get("token") or "")
            if "expires_in" in d:
                ttl = float(d["expires_in"])
            elif "expires_at" in d:
                ttl = float(d["expires_at"]) - now
        if not token:
            raise TokenCommandError("oauth2_token_command printed no token; it must print "
                                    "the access token or JSON with access_token")
        register_secret(token)
        # Refresh a minute early so a token never expires between check and use.
        return token, now + max(ttl - 60.0, 0.0)


@dataclass
class Connector:
    """Opens logged-in IMAP connections for one account (flat settings)."""

    host: str
    port: int
    security: str = "tls"                  # tls | starttls | none
    user: str = ""
    auth: str = "password"                 # password | xoauth2
    password_env: str | None = None
    oauth2_token_command: str | None = None
    ca_file: str | None = None
    timeout_s: float = 60.0
    _tokens: TokenSource | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.auth == "xoauth2" and self.oauth2_token_command:
            self._tokens = TokenSource(self.oauth2_token_command)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.ca_file:
            ctx.load_verify_locations(cafile=self.ca_file)
        return ctx

    def connect(self) -> IMAPClient:
        """A connected, logged-in client. Raises MailConnectError or MailAuthError."""
        try:
            client = IMAPClient(self.host, port=self.port, ssl=self.security == "tls",
                                ssl_context=self.ssl_context() if self.security != "none" else None,
                                timeout=self.timeout_s)
            # Timezone-aware INTERNALDATEs, not naive local times.
            client.normalise_times = False
            if self.security == "starttls":
                client.starttls(self.ssl_context())
        except (OSError, ssl.SSLError) as e:
            raise MailConnectError(
                f"cannot connect to {self.host}:{self.port} ({self.security}): "
                f"{e.__class__.__name__}: {e}; check host, port and security") from e
        except Exception as e:  # noqa: BLE001 - imaplib errors during greeting/STARTTLS
            raise MailConnectError(f"IMAP greeting/STARTTLS failed on {self.host}:{self.port}: "
                                   f"{e}; check port and security") from e
        try:
            self._login(client)
        except BaseException:
            close_quietly(client)
            raise
        return client

    def _login(self, client: IMAPClient) -> None:
        if self.auth == "xoauth2":
            assert self._tokens is not None
            for attempt in (0, 1):
                try:
                    client.oauth2_login(self.user, self._tokens.token(refresh=attempt == 1))
                    return
                except LoginError as e:
                    if attempt == 1:
                        raise MailAuthError(
                            f"XOAUTH2 login for {self.user} rejected ({e}) even with a fresh "
                            "token; check the token command's scopes (IMAP) and the user") from e
        try:
            password = read_secret(self.password_env or "")
        except MissingSecret as e:
            raise MailAuthError(str(e)) from e
        try:
            client.login(self.user, password)
        except LoginError as e:
            raise MailAuthError(f"login for {self.user} on {self.host} rejected: {e}; check "
                                f"user and ${self.password_env}") from e


def close_quietly(client: IMAPClient) -> None:
    """Log out, or just drop the socket when the connection is already dead."""
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - the connection may be dead already
        try:
            client.shutdown()
        except Exception:  # noqa: BLE001
            pass

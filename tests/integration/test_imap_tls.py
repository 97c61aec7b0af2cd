"""TLS and STARTTLS against a real Dovecot with a self-signed certificate."""

from __future__ import annotations

import pytest

from agent.mail import MailConnectError, build_connector, build_mail_sources
from config import AccountSettings, Settings
from tests.fixtures.dovecot import PASSWORD_ENV, LocalDovecot, find_dovecot

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_dovecot(tmp_path, monkeypatch):
    if find_dovecot() is None:
        pytest.skip("dovecot binary not found: install dovecot-imapd (scripts/setup does)")
    server = LocalDovecot(tmp_path / "dovecot", tls=True)
    monkeypatch.setenv(PASSWORD_ENV, server.password)
    server.start()
    yield server
    server.cleanup()


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_ingest_over_tls(tls_dovecot, sqlite_db, security):
    tls_dovecot.deliver_files([b"Subject: secret\r\n\r\nover TLS\r\n"])
    acct = AccountSettings(**tls_dovecot.account_settings(security=security))
    assert acct.effective_port == (tls_dovecot.tls_port if security == "tls" else tls_dovecot.port)
    client = build_connector(acct).connect()
    try:
        assert client.ssl if security == "tls" else client._starttls_done  # noqa: SLF001
    finally:
        client.logout()
    (src,) = build_mail_sources(Settings(accounts=[acct]), sqlite_db)
    assert src.sync() == 1


def test_unknown_certificate_is_refused(tls_dovecot):
    acct = AccountSettings(**tls_dovecot.account_settings(security="tls", ca_file=None))
    with pytest.raises(MailConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        build_connector(acct).connect()

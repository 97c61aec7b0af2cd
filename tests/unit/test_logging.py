import io
import json
import logging

import structlog

from agent.logs import configure_logging
from config import register_secret

SECRETS = {
    "imap_password": "Tr0ub4dor&3-imap",
    "anthropic_key": "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "review_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
    "bearer": "eyJhbGciOiJIUzI1NiJ9.payload.signature",
    "login_pw": "correct-horse-battery",
}


def _capture(json_mode: bool):
    buf = io.StringIO()
    configure_logging(json=json_mode, level="debug", stream=buf)
    return buf


def _emit_everything():
    log = structlog.get_logger("test")
    log.info("login", user="support@example.com", password=SECRETS["imap_password"])
    log.info("client", api_key=SECRETS["anthropic_key"])
    log.info("request", headers={"Authorization": f"Bearer {SECRETS['bearer']}",
                                 "x-api-key": SECRETS["anthropic_key"]})
    log.info("review", password_hash=SECRETS["review_hash"])
    log.info(f'> b\'a001 LOGIN support@example.com "{SECRETS["login_pw"]}"\'')
    log.info("free text", detail=f"connect failed with api_key={SECRETS['anthropic_key']}")
    # stdlib loggers (imapclient, httpx, anthropic) go through the same redaction
    logging.getLogger("imapclient.imaplib").debug(
        "> b'xyz1 LOGIN user@example.com %s'", SECRETS["login_pw"])
    logging.getLogger("httpx").warning("headers: {'authorization': 'Bearer %s'}", SECRETS["bearer"])
    try:
        raise RuntimeError(f"auth failed for token={SECRETS['bearer']}")
    except RuntimeError:
        log.exception("boom")


def test_no_secret_reaches_console_output():
    buf = _capture(json_mode=False)
    _emit_everything()
    out = buf.getvalue()
    assert "LOGIN" in out and "support@example.com" in out   # the context survives
    for name, secret in SECRETS.items():
        assert secret not in out, name


def test_no_secret_reaches_json_output():
    buf = _capture(json_mode=True)
    _emit_everything()
    lines = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    assert len(lines) >= 9
    out = buf.getvalue()
    for name, secret in SECRETS.items():
        assert secret not in out, name


def test_registered_secret_values_are_masked_anywhere():
    buf = _capture(json_mode=True)
    register_secret("plain-value-no-pattern-42")
    structlog.get_logger().info("weird", note="the pw is plain-value-no-pattern-42 ok")
    assert "plain-value-no-pattern-42" not in buf.getvalue()
    assert "***" in buf.getvalue()


def test_the_default_handler_follows_a_swapped_stderr_and_survives_it_closing(monkeypatch):
    import sys

    configure_logging(json=True)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    structlog.get_logger("t").info("one", api_key="sk-ant-secret-1234567890")
    first_text = first.getvalue()
    first.close()                                    # what a test harness does to its capture
    monkeypatch.setattr(sys, "stderr", second)
    structlog.get_logger("t").info("two")
    assert '"one"' in first_text and "sk-ant-secret" not in first_text
    assert '"two"' in second.getvalue() and '"one"' not in second.getvalue()


def test_a_traceback_on_the_console_shows_no_local_variables_and_no_secret():
    """uvicorn logs a 500 with exc_info: the console renderer must not print the frames'
    locals (request headers, session ids) nor an unredacted copy of the traceback."""
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    # A uvicorn started with its default log config (as any earlier server in the process
    # may have been) gives its loggers their own handlers, unredacted and not propagating.
    logging.config.dictConfig(LOGGING_CONFIG)
    buf = io.StringIO()
    configure_logging(json=False, stream=buf)

    def handler():
        headers = {"authorization": "Bearer tok-in-a-local-variable-123"}  # noqa: F841
        session_id = "sess-only-in-locals-456"                              # noqa: F841
        raise ValueError("failed; authorization: Bearer tok-in-the-message-789")

    try:
        handler()
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        structlog.get_logger().exception("structlog too")
    out = buf.getvalue()
    assert out.count("Traceback (most recent call last)") == 2
    assert "in handler" in out and "ValueError: failed" in out
    for secret in ("tok-in-a-local-variable", "sess-only-in-locals", "tok-in-the-message"):
        assert secret not in out

"""Reviewing escalated drafts: the shared service, the web app and their builders.

Builders turn :class:`config.Settings` into the flat arguments the classes take:

>>> service = build_review_service(settings, db)                  # doctest: +SKIP
>>> service.approve(7, reviewer="ana", category="billing")        # doctest: +SKIP
>>> app = build_review_app(settings, db)   # FastAPI; `understudy serve` runs it  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from agent.review.errors import (
    AlreadyReviewed,
    AuthNotConfigured,
    BadPasswordHash,
    DeliveryFailed,
    DraftNotFound,
    InvalidCorrection,
    ReviewError,
)
from agent.review.service import ReviewOutcome, ReviewService

__all__ = [
    "AlreadyReviewed", "AuthNotConfigured", "BadPasswordHash", "DeliveryFailed",
    "DraftNotFound", "InvalidCorrection", "ReviewError", "ReviewOutcome", "ReviewService",
    "build_authenticator", "build_review_app", "build_review_service",
]


def build_review_service(settings: Any, db: Any) -> ReviewService:
    from agent.review.delivery import (
        actions_from_settings,
        appenders_from_settings,
        relabelers_from_settings,
    )

    actions_for = actions_from_settings(settings)
    return ReviewService(db, categories=list(settings.taxonomy.categories),
                         priorities=list(settings.taxonomy.priorities),
                         appender_for=appenders_from_settings(settings, actions_for),
                         relabel_for=relabelers_from_settings(settings, actions_for))


def build_authenticator(settings: Any):
    """The login check from ``review.password_hash_env`` / ``review.token_env``."""
    from agent.review.auth import Authenticator
    from config.secrets import read_secret

    return Authenticator(
        password_hash=read_secret(settings.review.password_hash_env, required=False),
        token=read_secret(settings.review.token_env, required=False))


def build_review_app(settings: Any, db: Any, *, reviewer_name: str = "reviewer",
                     secure_cookies: bool = False, host: str | None = None):
    """The app for ``understudy serve``; bound to loopback it answers only loopback names."""
    import ipaddress

    from agent.review.app import create_app

    host = host or settings.review.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    # Starlette compares the Host header without its port; an IPv6 literal keeps its
    # brackets there ("[::1]:8765" -> "[::1]").
    names = {host.strip("[]"), "127.0.0.1", "localhost", "::1"}
    allowed = sorted(names | {f"[{n}]" for n in names if ":" in n}) if loopback else None
    return create_app(service=build_review_service(settings, db),
                      authenticator=build_authenticator(settings),
                      reviewer_name=reviewer_name, secure_cookies=secure_cookies,
                      allowed_hosts=allowed)

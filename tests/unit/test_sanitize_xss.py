"""The email HTML sanitizer against XSS payloads: nothing executable may survive.

Each output is re-parsed with the stdlib HTML parser and every tag, attribute and URL is
checked against what the review page can show inertly.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest

from agent.review.sanitize import ALLOWED_ATTRIBUTES, ALLOWED_TAGS, blocked_image_hosts, sanitize_html

PAYLOADS = [
    "<script>alert(1)</script>",
    "<SCRIPT SRC=http://evil.example/xss.js></SCRIPT>",
    "<img src=x onerror=alert(1)>",
    "<img src=x:alert(alt) onerror=eval(src) alt=0>",
    "<svg onload=alert(1)>",
    "<svg><script>alert(1)</script></svg>",
    "<svg><a xlink:href='javascript:alert(1)'><text x=0 y=20>x</text></a></svg>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "<math href='javascript:alert(1)'>click</math>",
    "<a href='javascript:alert(1)'>x</a>",
    "<a href='JaVaScRiPt:alert(1)'>x</a>",
    "<a href='jav&#x09;ascript:alert(1)'>x</a>",
    "<a href='&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)'>x</a>",
    "<a href=' \x01javascript:alert(1)'>x</a>",
    "<a href='vbscript:msgbox(1)'>x</a>",
    "<a href='data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg=='>x</a>",
    "<a href='#' onclick='alert(1)'>x</a>",
    "<a href='/logout'>relative link into the app</a>",
    "<iframe src='javascript:alert(1)'></iframe>",
    "<iframe srcdoc='&lt;script&gt;alert(1)&lt;/script&gt;'></iframe>",
    "<object data='javascript:alert(1)'></object>",
    "<embed src='data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+'>",
    "<form action='javascript:alert(1)'><input type=submit value=go></form>",
    "<button formaction='javascript:alert(1)'>x</button>",
    "<isindex action=javascript:alert(1) type=submit>",
    "<meta http-equiv='refresh' content='0;url=javascript:alert(1)'>",
    "<link rel=stylesheet href='http://evil.example/x.css'>",
    "<base href='http://evil.example/'>",
    "<style>@import 'http://evil.example/x.css'; body{background:url(javascript:alert(1))}</style>",
    "<div style='background:url(javascript:alert(1))'>x</div>",
    "<div style='width: expression(alert(1))'>x</div>",
    "<p style='position:fixed;top:0;left:0;width:100%;height:100%'>overlay</p>",
    "<table background='javascript:alert(1)'><tr><td>x</td></tr></table>",
    "<body onload=alert(1)>x",
    "<details open ontoggle=alert(1)>x</details>",
    "<video><source onerror=alert(1)></video>",
    "<input autofocus onfocus=alert(1)>",
    "<marquee onstart=alert(1)>x</marquee>",
    "<noscript><p title='</noscript><img src=x onerror=alert(1)>'></noscript>",
    "<scr<script>ipt>alert(1)</script>",
    "<<script>alert(1)//<</script>",
    "\"><script>alert(1)</script>",
    "<!--<img src=x onerror=alert(1)>-->",
    "<template><script>alert(1)</script></template>",
    "<img src='http://tracker.example/pixel.gif?u=42' width=1 height=1>",
    "<img src='data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+'>",
    "<a id='approve' class='approve' name='csrf_token' href='https://ok.example'>clobber</a>",
    "<img src=\"x` `<script>alert(1)</script>\"` `>",
    "<div><a href='https://ok.example' target='_blank' rel='opener'>ok</a></div>",
]

URL_ATTRS = {"href", "src"}
RASTER_DATA = re.compile(r"^data:image/(png|gif|jpe?g|webp);base64,", re.I)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, attrs))


def assert_inert(html: str) -> None:
    p = _Collect()
    p.feed(html)
    p.close()
    assert "<script" not in html.lower() and "<style" not in html.lower()
    for tag, attrs in p.tags:
        assert tag in ALLOWED_TAGS, (tag, html)
        allowed = ALLOWED_ATTRIBUTES.get(tag, set()) | ({"rel"} if tag == "a" else set())
        for name, value in attrs:
            assert name in allowed, (tag, name, html)
            assert not name.startswith("on")
            v = re.sub(r"[\x00-\x20]", "", value or "").lower()
            assert "javascript:" not in v and "vbscript:" not in v and "expression(" not in v
            if name in URL_ATTRS:
                scheme = urlsplit(v).scheme
                if tag == "a":
                    assert scheme in ("http", "https", "mailto"), (v, html)
                else:
                    assert RASTER_DATA.match(v), (v, html)
        if tag == "a":
            assert dict(attrs).get("rel") == "noopener noreferrer", html


def test_at_least_25_payloads():
    assert len(PAYLOADS) >= 25


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_is_inert(payload):
    out = sanitize_html(payload)
    assert_inert(out)
    # Wrapped in ordinary content, too: sanitizing must not depend on position.
    assert_inert(sanitize_html(f"<div><p>Hello</p>{payload}<p>bye</p></div>"))


def test_sanitizing_is_stable():
    # Sanitized output fed back in stays the same (no mutation-XSS round trips).
    for payload in PAYLOADS:
        once = sanitize_html(payload)
        assert sanitize_html(once) == once


def test_ordinary_email_keeps_its_structure():
    html = ("<html><head><title>t</title><style>p{color:red}</style></head><body>"
            "<h1>Invoice</h1><p>Dear <b>Ana</b>,<br>see <a href='https://shop.example/i/1'>"
            "your invoice</a>.</p><table><tr><th colspan=2>Total</th></tr>"
            "<tr><td>Sum</td><td>10 EUR</td></tr></table><ul><li>one</li></ul>"
            "<img alt='dot' src='data:image/png;base64,iVBORw0KGgo='>"
            "<blockquote>quoted</blockquote></body></html>")
    out = sanitize_html(html)
    assert_inert(out)
    for kept in ("<h1>Invoice</h1>", "<b>Ana</b>", 'href="https://shop.example/i/1"',
                 '<th colspan="2">Total</th>', "<li>one</li>", "data:image/png;base64",
                 "<blockquote>quoted</blockquote>"):
        assert kept in out
    assert "color:red" not in out and "<title>" not in out


def test_remote_images_are_blocked_and_reported():
    html = ("<img src='https://tracker.example/p.gif' alt='logo'>"
            "<img src='http://cdn.example/a.png'><img src='https://tracker.example/q.gif'>"
            "<img src='data:image/png;base64,iVBORw0KGgo='>")
    out = sanitize_html(html)
    assert "tracker.example" not in out and "cdn.example" not in out
    assert 'alt="logo"' in out and "data:image/png" in out
    assert blocked_image_hosts(html) == ["tracker.example", "cdn.example"]

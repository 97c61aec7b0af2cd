"""Make hostile email HTML inert before the review page shows it.

Email HTML is written by whoever sent the mail, so it is treated like an attack: the
allow-list below keeps text structure (paragraphs, lists, tables, links, inline
images) and nothing that can run code, restyle the page, submit a form or phone home.
nh3 (a binding of the Rust ``ammonia`` sanitizer) parses with a real HTML5 parser, so
the mis-nesting and encoding tricks that defeat regex filters do not apply.

What is removed and why:

* ``script``, ``style``, ``noscript``, ``template`` … with their content: code and CSS.
* ``iframe``, ``object``, ``embed``, ``form``, ``input``, ``meta``, ``link``, ``base``,
  ``svg``, ``math``: not in the allow-list, so dropped (their text is kept).
* every ``on*`` handler, ``style``, ``class`` and ``id``: a style attribute can overlay
  the page; a class could borrow our own UI styles to fake a button; an id could
  clobber ``document.getElementById`` lookups in the page script (DOM clobbering).
* links other than http(s) and mailto (``javascript:``, ``data:``, ``vbscript:``), and
  every kept link gets ``rel="noopener noreferrer"``.
* remote images: a remote ``src`` is a read receipt for the sender, so it is dropped
  and the image shows as a placeholder with the host it would have loaded from. Inline
  ``data:`` images of raster types stay (the CSP allows ``img-src data:``); SVG data
  URIs are dropped.

>>> sanitize_html('<p onclick="x()">Hi <script>alert(1)</script><b>there</b></p>')
'<p>Hi <b>there</b></p>'
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import nh3

ALLOWED_TAGS = frozenset({
    "a", "abbr", "b", "blockquote", "br", "caption", "cite", "code", "dd", "del", "div",
    "dl", "dt", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd",
    "li", "ol", "p", "pre", "q", "s", "small", "span", "strike", "strong", "sub", "sup",
    "table", "tbody", "td", "tfoot", "th", "thead", "tr", "u", "ul",
})
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title", "width", "height"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan"},
    "abbr": {"title"},
}
# Tags dropped together with everything inside them.
DROPPED_WITH_CONTENT = frozenset({"script", "style", "noscript", "template", "title",
                                  "iframe", "object", "embed", "svg", "math", "textarea",
                                  "select", "head"})
LINK_SCHEMES = frozenset({"http", "https", "mailto"})
_RASTER_DATA_URI = re.compile(r"^data:image/(png|gif|jpe?g|webp);base64,[a-z0-9+/=\s]+$", re.I)
_DIMENSION = re.compile(r"^\d{1,4}$")


def _filter_attribute(tag: str, attr: str, value: str) -> str | None:
    if tag == "img" and attr == "src":
        # Only inline raster images survive; nh3 has already rejected unknown schemes,
        # this also rejects remote http(s) images and SVG data URIs.
        return value if _RASTER_DATA_URI.match(value.strip()) else None
    if tag == "a" and attr == "href":
        # "data" is in url_schemes only for inline images; links may not use it.
        scheme = urlsplit(value.strip()).scheme.lower()
        return value if scheme in LINK_SCHEMES else None
    if tag == "img" and attr == "alt":
        return value[:200]
    if attr in ("width", "height", "colspan", "rowspan"):
        return value if _DIMENSION.match(value.strip()) else None
    return value


def sanitize_html(html: str) -> str:
    """Return an inert HTML fragment safe to place inside the review page."""
    return nh3.clean(
        html,
        tags=set(ALLOWED_TAGS),
        clean_content_tags=set(DROPPED_WITH_CONTENT),
        attributes={k: set(v) for k, v in ALLOWED_ATTRIBUTES.items()},
        attribute_filter=_filter_attribute,
        url_schemes=set(LINK_SCHEMES | {"data"}),
        link_rel="noopener noreferrer",
        strip_comments=True,
        # A relative link would point into this app (e.g. at a review action).
        url_relative="deny",
    )


def blocked_image_hosts(html: str) -> list[str]:
    """Hosts of the remote images :func:`sanitize_html` blocked (shown to the reviewer)."""
    hosts = []
    for src in re.findall(r"<img\b[^>]*?\bsrc\s*=\s*[\"']?([^\"'\s>]+)", html, re.I):
        parts = urlsplit(src.strip())
        if parts.scheme.lower() in ("http", "https") and parts.hostname:
            if parts.hostname not in hosts:
                hosts.append(parts.hostname)
    return hosts

"""The security headers every response carries, whichever layer answers it.

Written once, here; :func:`secured` applies them to a raw ASGI response start, and every
path uses it: the app's ASGI entry for all of Quart's answers, the lean stream path for its
own, and hitl's hypercorn protocol for the errors hypercorn answers itself.
"""

from __future__ import annotations

# Pages load nothing from elsewhere and run no inline script (htmx is configured to match).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",  # for browsers that ignore the CSP's frame-ancestors
    "Content-Security-Policy": CSP,
    # API answers and pages show live state: not kept by browsers or proxies. A response
    # that says otherwise keeps its own (streams: no-cache; static files: a max-age).
    "Cache-Control": "no-store",
}

RawHeaders = list[tuple[bytes, bytes]]

# The same, ready for a raw ASGI ``http.response.start``.
RAW_SECURITY_HEADERS: RawHeaders = [(name.lower().encode(), value.encode())
                                    for name, value in SECURITY_HEADERS.items()]


def secured(headers: RawHeaders) -> RawHeaders:
    """A response's raw headers (lower-case names), with each security header it lacks."""
    present = {name.lower() for name, _ in headers}
    return headers + [header for header in RAW_SECURITY_HEADERS if header[0] not in present]

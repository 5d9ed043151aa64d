"""The security headers every response carries, whichever layer answers it."""

from __future__ import annotations

# Pages load nothing from elsewhere and run no inline script (htmx is configured to match).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP}

# The same, ready for a raw ASGI ``http.response.start``.
RAW_SECURITY_HEADERS = [(name.lower().encode(), value.encode())
                        for name, value in SECURITY_HEADERS.items()]

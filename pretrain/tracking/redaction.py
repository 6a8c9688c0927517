"""Secrets out of what is logged: MLflow params and checkpoint meta hold the whole config.

`redact` walks a config (dicts, lists, strings) and replaces the password of any
`scheme://user:password@host` URL, the query string of a URL that signs or authenticates
(presigned S3 URLs: `X-Amz-Signature`, `X-Amz-Credential`; SAS `sig=`; `token=`), and the value
of any key named like a secret (`password`, `secret`, `token`, `api_key`). A URL list joined
by `::` is redacted part by part. Resuming needs none of these: the config given at launch is
the one that runs.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "***"
_SECRET_KEY = re.compile(r"(passw|secret|token|api_?key|credential|signature|^sig$|auth)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`https://u:p@h/x?X-Amz-Signature=..` -> `https://u:***@h/x?***`; other strings unchanged."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
    query = parts.query
    if query and any(_SECRET_KEY.search(key) or key.lower().startswith("x-amz-") for key, _ in parse_qsl(query)):
        query = MASK
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact(value: Any) -> Any:
    """A copy of `value` with secrets masked (see the module docstring)."""
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and _SECRET_KEY.search(k) and isinstance(v, str) and v else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str) and "://" in value:
        return "::".join(redact_url(part) for part in value.split("::"))
    return value

"""Redaction of credentials in text that leaves the process: error rows, logs, summaries.

AWS key ids, secret keys, session tokens, presigned-URL query strings and `name=value`
secrets are replaced by [REDACTED...] markers; ordinary text (paths, hex digests) is kept.
"""

from __future__ import annotations

import re

_SECRET_NAMES = (
    r"aws_secret_access_key|aws_session_token|aws_security_token|secret_access_key|secret_key|"
    r"session_token|security_token|x-amz-security-token|x-amz-credential|x-amz-signature|"
    r"awsaccesskeyid|signature|password|passwd|token|access_key|aws_access_key_id"
)
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Query strings of (presigned) URLs: keep scheme/host/path, drop every parameter.
    (
        re.compile(
            r"(?i)((?:https?|s3)://[^\s?#\"'<>]*)\?[^\s\"'<>]*(?:x-amz-|signature=|awsaccesskeyid=|token=|sig=)[^\s\"'<>]*"
        ),
        r"\1?[REDACTED]",
    ),
    (re.compile(r"(?i)(authorization\s*[:=]\s*)[^\r\n]+"), r"\1[REDACTED]"),
    (re.compile(rf"(?i)\b({_SECRET_NAMES})(\"?\s*[:=]\s*[\"']?)[^\s\"'&,;}}]+"), r"\1\2[REDACTED]"),
    (
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|AKPA|ABIA|ACCA)[A-Z0-9]{12,}\b"),
        "[REDACTED-KEY-ID]",
    ),
    # Session tokens / long base64 blobs.
    (re.compile(r"[A-Za-z0-9/+]{100,}={0,2}"), "[REDACTED-TOKEN]"),
    # 40-char secret access keys: base64 alphabet with upper, lower and digit (hex digests don't match).
    (
        re.compile(
            r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[0-9])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
        ),
        "[REDACTED-SECRET]",
    ),
)


def redact(text: str) -> str:
    """Remove AWS key ids, secret keys, session tokens and presigned-URL query strings from text."""
    for pattern, repl in _REDACTIONS:
        text = pattern.sub(repl, text)
    return text


def scrubbed(exc: BaseException) -> BaseException:
    """The same exception, or a copy of its type whose message has been redacted."""
    msg = str(exc)
    clean = redact(msg)
    if clean == msg:
        return exc
    try:
        return type(exc)(clean)
    except Exception:
        return OSError(clean)

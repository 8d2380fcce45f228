"""Pseudonymisation: keyed-hash patient ids, and redaction of identity values from text.

The key lives in a file the user controls (``ingest.pseudonym_key_file``), created with a random secret on first
use; the same key gives the same ids across runs. Without the key nobody can map an id back to a patient.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from medseg.errors import ConfigError, safe_text
from medseg.io import write_text

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
# Exports name files and folders by UIDs the headers do not always carry (a blank SOPInstanceUID in a file named
# CT.1.2.840...): anything shaped like a DICOM UID is redacted, known or not.
UID_SHAPE = re.compile(r"(?<![\w.])\d+(?:\.\d+){5,}(?![\w])")


def load_or_create_key(path: Path) -> bytes:
    """Read the pseudonymisation key, creating a random one (mode 0600) if the file does not exist."""
    if not path.exists():
        write_text(path, secrets.token_hex(32) + "\n")
        os.chmod(path, 0o600)
        log.warning("created a new pseudonymisation key at %s: keep it to keep patient ids stable", path)
    key = path.read_text().strip().encode()
    if len(key) < 16:
        raise ConfigError(f"pseudonymisation key {path} is too short: use at least 16 characters")
    return key


def pseudonym(key: bytes, source_id: str) -> str:
    """A stable, non-reversible patient id: ``P`` plus 10 base32 characters of HMAC-SHA256(key, id).

    >>> pseudonym(b"0123456789abcdef", "12345")
    'PHAKLYNVAEM'
    """
    # surrogateescape: a folder name with bytes that are not UTF-8 gets its own stable id instead of an error
    digest = hmac.new(key, source_id.strip().encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    return "P" + base64.b32encode(digest).decode()[:10]


def debug_traceback(logger: logging.Logger, what: str, redact: Callable[[str], str]) -> None:
    """Log the exception being handled at debug level, its traceback passed through ``redact``: an exception's
    message may quote a source path, and a folder may be named after the patient."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s:\n%s", what, redact(traceback.format_exc()))


class Redactor:
    """Replaces every known identity value (names, ids, dates, UIDs, source folder names) in a text."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        for value in values:
            value = str(value).strip()
            parts = {value, *re.split(r"[\^ ]+", value)} if "^" in value else {value}
            # Very short values (a one-letter name part, a 2-digit ID) would shred ordinary words.
            self._values.update(p for p in parts if len(p) >= 3)
        if self._values:
            alternatives = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in alternatives), re.IGNORECASE)

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
        return safe_text(UID_SHAPE.sub(REDACTED, text))

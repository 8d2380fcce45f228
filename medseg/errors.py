"""Typed errors raised at medseg's boundaries. Each message names the bad file or value and what to do."""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of every error medseg raises on purpose."""


class ConfigError(MedsegError):
    """A configuration file or value is invalid."""


class ImageReadError(MedsegError):
    """A file could not be read as an image, label or DICOM object."""


class GeometryError(MedsegError):
    """Geometry is inconsistent: a slice gap, mixed orientations, or a label on the wrong grid."""


class ManifestError(MedsegError):
    """A data manifest is missing, malformed or inconsistent with the files it names."""


class DeviceError(MedsegError):
    """The requested compute device is not available."""


class ModelLoadError(MedsegError):
    """A model file is missing, unreadable, or not a plain-data medseg checkpoint (never unpickled as code)."""


class TrackingError(MedsegError):
    """The MLflow tracking server or model registry cannot be reached or refused a request."""


MAX_REASON_CHARS = 500


def one_line_reason(err: BaseException, root: str | None = None) -> str:
    """A failure's reason for a report row: one line, with ``root`` made relative, and never a traceback.

    A medseg error's own message is the reason (it already says what and what to do); any other exception, one
    we did not foresee, is named by its type in front of its message, so that the report still tells a corrupt
    file from a bug. Callers redact the result (it may hold a file name) before it is written or logged.

    Args:
        err: the exception.
        root: the input folder; its path is cut from the message (the report names inputs relative to it).

    Returns:
        The reason, at most ``MAX_REASON_CHARS`` characters, with undecodable file name bytes as U+FFFD.

    >>> one_line_reason(KeyError("Rows"))
    "KeyError: 'Rows'"
    >>> one_line_reason(ValueError("/in/p1/x.dcm: bad\\nvalue"), "/in")
    'ValueError: p1/x.dcm: bad value'
    """
    message = str(err)
    if root:
        root = str(root).rstrip("/")
        message = message.replace(root + "/", "").replace(root, ".")
    if not isinstance(err, MedsegError) or not message:
        message = f"{type(err).__name__}: {message}" if message else type(err).__name__
    message = " ".join(safe_text(message).split())
    if len(message) > MAX_REASON_CHARS:
        message = message[: MAX_REASON_CHARS - 3] + "..."
    return message


def safe_text(text: str) -> str:
    """``text`` that can be written as UTF-8: a file name's undecodable bytes (held as lone surrogates, Python's
    ``surrogateescape``) become U+FFFD.

    >>> safe_text("scan_\\udcff.dcm") == "scan_\\ufffd.dcm"
    True
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that no file name byte made
        return text.encode("utf-8", "replace").decode("utf-8")

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

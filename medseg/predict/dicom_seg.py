"""DICOM-SEG out (highdicom): a label on a series' source grid becomes a Segmentation that references the series.

The SEG is the one output of `medseg predict` that carries the source's patient and study identity: highdicom
copies them from the source datasets so that the object files back into the same patient's record in the PACS.
It is BINARY (one segment per class), the type 3D Slicer, OHIF and every PACS viewer open; LABELMAP SEG
(DICOM 2024) is not yet widely read.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import medseg
from medseg.config import TISSUE_CODE, CodeConfig, PredictConfig
from medseg.errors import GeometryError, ImageReadError
from medseg.ingest.dicom import LPS_TO_RAS, Frame, frames_of, stack_geometry
from medseg.io import atomic_path
from medseg.metrics import instances_largest_first
from medseg.predict.functional import default_color, label_to_frames
from medseg.volume import Label

# highdicom logs the source's SOP instance UIDs at INFO: identity values must not reach our logs.
logging.getLogger("highdicom").setLevel(logging.ERROR)
log = logging.getLogger(__name__)

ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence  # DCM 123110, the family a segmentation network is in


def source_frames(files: Sequence[Path], tolerance_mm: float) -> tuple[list[Frame], np.ndarray]:
    """The series' frames (headers only) in the slice order of :func:`medseg.ingest.dicom.read_series`.

    Args:
        files: every file of the series.
        tolerance_mm: slice tolerance, as given to ``read_series``.

    Returns:
        ``(ordered_frames, ras_affine)``: frame ``k`` is slice ``k`` of the volume ``read_series`` returns, and the
        affine is that volume's, so that a caller can check both readers agree.

    Raises:
        ImageReadError: a file is not readable DICOM.
        GeometryError: the slices do not form one regular grid.
    """
    frames: list[Frame] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:  # pydicom raises many types for a corrupt file
            raise ImageReadError(f"{Path(path).name}: not a readable DICOM file ({err})") from err
        _fill_type2(ds)
        frames.extend(frames_of(ds))
    ordered, lps_affine = stack_geometry(frames, tolerance_mm)
    return ordered, LPS_TO_RAS @ lps_affine


# Type 2 attributes (present, may be empty) of the patient and study modules that highdicom copies into the SEG.
# Exports from research PACS and anonymisers often drop them altogether; an empty value is what DICOM asks for.
TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip


def _fill_type2(ds: Dataset) -> None:
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")


def _code(code: CodeConfig) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def segment_descriptions(
    classes: Sequence[str], config: PredictConfig, instances: Sequence[tuple[int, int]] | None = None
) -> list[hd.seg.SegmentDescription]:
    """One segment per class, numbered like the label values (class ``i`` is segment ``i``, from 1); with
    ``instances`` (``(class index, instance number)`` per segment, see :func:`instance_segments`) one segment per
    instance, labelled ``<class label> <n>`` with the class's codes and colour and a TrackingID/UID of its own."""
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg", family=ALGORITHM_FAMILY, version=medseg.__version__)
    descriptions = []
    pairs = instances if instances is not None else [(i, 0) for i in range(1, len(classes) + 1)]
    for number, (index, instance) in enumerate(pairs, start=1):
        name = classes[index - 1]
        segment = config.segments.get(name)
        rgb = (segment.color_rgb if segment else None) or default_color(index)
        label = (segment.label if segment else None) or name
        tracking = {"tracking_id": f"{label} {instance}", "tracking_uid": hd.UID()} if instance else {}
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"{label} {instance}" if instance else label,
                segmented_property_category=_code(segment.category if segment else TISSUE_CODE),
                segmented_property_type=_code(segment.type if segment else TISSUE_CODE),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*rgb),
                **tracking,
            )
        )
    return descriptions


MAX_SEGMENTS = 65535  # Segment Number is an unsigned 16-bit value


def instance_segments(label: np.ndarray, n_classes: int) -> tuple[np.ndarray, list[tuple[int, int]]] | None:
    """A label map renumbered so that every instance (connected component) of every class is its own value 1..K,
    class by class, largest instance first (the order of ``instances.tsv``); and ``(class index, instance
    number)`` for each value. None when there are more instances than a DICOM-SEG has segment numbers."""
    out = np.zeros(label.shape, dtype=np.uint16)
    pairs: list[tuple[int, int]] = []
    for c in range(1, n_classes + 1):
        components, n = instances_largest_first(label == c)
        if len(pairs) + n > MAX_SEGMENTS:
            log.warning(
                "more than %d connected components: one DICOM-SEG segment per class instead of per instance",
                MAX_SEGMENTS,
            )
            return None
        inside = components > 0
        out[inside] = components[inside] + len(pairs)
        pairs.extend((c, rank) for rank in range(1, n + 1))
    return out, pairs


def _layout(frames: Sequence[Frame], seg_frames: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """Source datasets and the SEG's frames in the order highdicom pairs them.

    Single-frame files: one dataset per slice, in slice order. A multi-frame object: itself, with the frames put
    back into the object's own frame order (the slice order can differ).
    """
    if all(f.index is None for f in frames):
        return harmonised_sources([f.dataset for f in frames]), seg_frames
    datasets = {id(f.dataset): f.dataset for f in frames}
    if len(datasets) != 1 or any(f.index is None for f in frames):
        raise ImageReadError("a series that mixes multi-frame objects with other files cannot be referenced")
    reordered = np.empty_like(seg_frames)
    for k, frame in enumerate(frames):
        reordered[frame.index] = seg_frames[k]
    return list(datasets.values()), reordered


# Attributes every single-frame source must write identically for highdicom (it compares ImageOrientationPatient
# as written, and takes PixelSpacing and SliceThickness from the first slice for the whole SEG).
SHARED_GEOMETRY = ("ImageOrientationPatient", "PixelSpacing", "SliceThickness")
SHARED_ATOL = 1e-4  # direction cosines and mm; ingest's stack_geometry already refused larger differences


def harmonised_sources(datasets: Sequence[Dataset], atol: float = SHARED_ATOL) -> list[Dataset]:
    """The source headers as highdicom needs them: shared geometry written identically on every slice.

    Real archives write the same orientation with different decimal digits on different slices (``-0.059771`` on
    some, ``-0.0597709`` on others); highdicom compares the strings' values exactly and refuses the series.
    Where an attribute of :data:`SHARED_GEOMETRY` agrees on every slice within ``atol``, each slice gets a copy of
    its header carrying the first slice's value. Everything else (positions, SOPInstanceUIDs) is kept, so the SEG
    still references every source instance. The callers' datasets are not modified.

    Args:
        datasets: single-frame source headers (pixel data is not needed).
        atol: largest difference treated as a difference of formatting only.

    Returns:
        The datasets themselves where nothing needs changing, else changed deep copies.
    """
    if len(datasets) < 2:
        return list(datasets)
    first = datasets[0]
    replace = []
    for keyword in SHARED_GEOMETRY:
        if keyword not in first:
            continue
        values = [ds.get(keyword) for ds in datasets]
        if len({_written(v) for v in values}) == 1:
            continue
        try:
            numbers = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in values]
        except (TypeError, ValueError):
            continue  # missing or unparsable on some slice: leave it to highdicom to name
        if all(n.shape == numbers[0].shape and np.allclose(n, numbers[0], atol=atol) for n in numbers):
            replace.append(keyword)
    if not replace:
        return list(datasets)
    harmonised = []
    for ds in datasets:
        ds_copy = copy.deepcopy(ds)
        for keyword in replace:
            setattr(ds_copy, keyword, copy.deepcopy(first[keyword].value))
        harmonised.append(ds_copy)
    return harmonised


def _written(value: object) -> tuple[str, ...]:
    """A decimal string attribute as written (``"4"`` and ``"4.000000"`` differ), one string per value."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return (str(value),)
    return tuple(str(v) for v in value)  # type: ignore[union-attr]


def build_segmentation(
    label: Label,
    frames: Sequence[Frame],
    classes: Sequence[str],
    config: PredictConfig,
    model_label: str | None = None,
    instances: tuple[np.ndarray, list[tuple[int, int]]] | None = None,
) -> hd.seg.Segmentation:
    """A BINARY DICOM-SEG of ``label`` referencing the source frames.

    Args:
        label: ``(1, columns, rows, slices)`` class indices on the series' source grid (as ``read_series`` reads).
        frames: the series' frames in slice order (:func:`source_frames`).
        classes: foreground class names; label value ``i`` is ``classes[i - 1]``.
        config: segment names, colours and codes; series number and description.
        model_label: the registered model version (``<name> v<version>``): then the second SoftwareVersions value,
            the ContentCreatorName (``medseg^<label>``) and the end of the SeriesDescription (64 characters at most).
        instances: with ``config.seg_instances``, :func:`instance_segments` of ``label`` where the caller has it
            already (``medseg predict`` measures the instances' volumes from it); computed here otherwise.

    Returns:
        The Segmentation (not yet written). Empty frames are left out, except when every frame is empty: then
        highdicom keeps them all, so an empty prediction is still a valid object with every segment described.
    """
    pairs = None
    if config.seg_instances:
        instances = instances if instances is not None else instance_segments(label.array[0], len(classes))
        if instances is not None and instances[1]:  # an empty prediction keeps one (empty) segment per class
            label, pairs = Label(instances[0][None], label.affine), instances[1]
    seg_frames = label_to_frames(label)
    if seg_frames.shape != (len(frames), *frames[0].shape):
        raise GeometryError(
            f"label frames {list(seg_frames.shape)} do not match the series' {len(frames)} frames of {frames[0].shape}"
        )
    sources, pixels = _layout(frames, seg_frames)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels.astype(np.uint8 if int(pixels.max(initial=0)) < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(classes, config, pairs),
        series_instance_uid=hd.UID(),
        series_number=config.seg_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=config.manufacturer,
        manufacturer_model_name="medseg predict",
        software_versions=(medseg.__version__, model_label) if model_label else medseg.__version__,
        device_serial_number="0",
        series_description=_described(config.seg_series_description, model_label),
        content_creator_name=f"medseg^{model_label}"[:64] if model_label else None,
        content_label="SEGMENTATION",
        content_description="automatic segmentation by medseg",
        omit_empty_frames=True,
    )
    if "FrameOfReferenceUID" not in seg:
        # A radiograph (no frame of reference): the SEG sits on its source instance, frame for frame. Its orientation
        # is said in words (General Image, type 2C). highdicom copies the pixel spacing into a Pixel Measures item
        # without SliceThickness (a projection has none), which the standard allows but highdicom's own reader
        # refuses; the spacing is the source's, so the item goes and the SEG reads back (dciodvfy: no error).
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")
        shared = seg.SharedFunctionalGroupsSequence[0]
        if "PixelMeasuresSequence" in shared and "SliceThickness" not in shared.PixelMeasuresSequence[0]:
            del shared.PixelMeasuresSequence
    return seg


def _described(description: str, model_label: str | None) -> str:
    """The series description, ending with the model version when there is one (DICOM LO: 64 characters)."""
    if not model_label:
        return description
    suffix = f" [{model_label}]"
    return description[: max(0, 64 - len(suffix))] + suffix[:64]


def write_segmentation(seg: hd.seg.Segmentation, path: Path) -> Path:
    """Write atomically."""
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path

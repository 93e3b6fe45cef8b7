"""Recover which original image (source) and which case a file came from, from its name.

Roboflow names files ``<original>_png_jpg.rf.<hash>.jpg`` and the uploader pre-augmented many
originals as ``<original>_aug_N``. All files of one *source* are copies of one image. Frames of one
case (``...-37a``, ``...-37b``) are a stricter level; ``PatientNNNNN_PlaneK_i_of_n`` (the normal
images, from another dataset) group by patient. Grouped splits use these to keep copies together.
"""

import re

_RF_SUFFIX = re.compile(r"\.rf\.[0-9a-f]+$", re.IGNORECASE)
_EXT_SUFFIX = re.compile(r"(_(png|jpe?g|bmp|tiff?))+$", re.IGNORECASE)
_AUG_SUFFIX = re.compile(r"_aug_\d+$", re.IGNORECASE)
_PATIENT = re.compile(r"^(Patient\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"(\d+)([a-z]?)", re.IGNORECASE)


def source_group(filename: str) -> str:
    """The original image a file was derived from: strips extension, Roboflow hash and ``_aug_N``."""
    stem = filename.rsplit("/", 1)[-1]
    stem = re.sub(r"\.(jpe?g|png|bmp|tiff?|dcm)$", "", stem, flags=re.IGNORECASE)
    stem = _RF_SUFFIX.sub("", stem)
    stem = _EXT_SUFFIX.sub("", stem)
    return _AUG_SUFFIX.sub("", stem)


def case_group(source: str, label: str) -> str:
    """The case a source image belongs to: frames ``37a``/``37b`` of one label share a case.

    The case number is the first number followed by a frame letter (``encephalocele-3-23b`` → 23,
    ``vein-of-galen-40b2`` → 40), else the last number; a name without numbers is its own case.
    The label is part of the key, so equal numbers in different classes stay apart.
    """
    patient = _PATIENT.match(source)
    if patient:
        return patient.group(1)
    name = re.sub(r"^copy-of-", "", source, flags=re.IGNORECASE)
    numbers = _NUMBER.findall(name)
    if not numbers:
        return f"{label}:{name}"
    lettered = [n for n, letter in numbers if letter]
    return f"{label}:{int(lettered[0] if lettered else numbers[-1][0])}"

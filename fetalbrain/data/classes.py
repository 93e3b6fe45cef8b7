"""Readable names for the dataset's class labels (the export keeps its original misspellings)."""

NORMAL_CLASS = "normal"

DISPLAY_NAMES = {
    "anold-chiari-malformation": "Arnold-Chiari malformation",
    "arachnoid-cyst": "Arachnoid cyst",
    "cerebellah-hypoplasia": "Cerebellar hypoplasia",
    "colphocephaly": "Colpocephaly",
    "encephalocele": "Encephalocele",
    "holoprosencephaly": "Holoprosencephaly",
    "hydracenphaly": "Hydranencephaly",
    "intracranial-hemorrdge": "Intracranial haemorrhage",
    "intracranial-tumor": "Intracranial tumour",
    "m-magna": "Mega cisterna magna",
    "mild-ventriculomegaly": "Mild ventriculomegaly",
    "moderate-ventriculomegaly": "Moderate ventriculomegaly",
    "normal": "Normal",
    "polencephaly": "Porencephaly",
    "severe-ventriculomegaly": "Severe ventriculomegaly",
    "vein-of-galen": "Vein of Galen malformation",
}


def display_name(label: str) -> str:
    """The clinician-facing name of a label; unknown labels are prettified, never dropped."""
    return DISPLAY_NAMES.get(label, label.replace("-", " ").replace("_", " ").capitalize())

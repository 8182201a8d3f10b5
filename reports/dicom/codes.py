"""Coded concepts used in the SEG, SR and SC objects (documented in docs/results-format.md).

Every concept is built from pydicom's copy of the DICOM PS3.16 code tables
(``pydicom.sr.codedict.codes``) where the standard has it, so a typo cannot slip in. The few
SNOMED CT disorder concepts that PS3.16 does not list are spelled out here with their source.

Subtype findings for which no SNOMED CT identifier could be verified offline (epidural and
intraventricular hemorrhage) use this node's private coding scheme ``99ICHT`` (PS3.3 8.2: a
private scheme designator starts with "99"). Every subtype group also carries a standard
Finding Site (PS3.16 anatomy codes), so a consumer that knows only standard codes can still
tell the groups apart.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from triage.labels import DISPLAY, LABELS

PRIVATE_SCHEME = "99ICHT"  # CodingSchemeDesignator of this node's private codes (SH, <= 16 chars)
PRIVATE_SCHEME_VERSION = "1"


def _cc(code: object) -> CodedConcept:
    """A pydicom ``Code`` as a highdicom ``CodedConcept`` (what highdicom returns on read-back)."""
    return CodedConcept(code.value, code.scheme_designator, code.meaning, code.scheme_version)  # type: ignore[attr-defined]


def private_scheme_identification() -> Dataset:
    """The Coding Scheme Identification item that declares :data:`PRIVATE_SCHEME` (PS3.3 C.12.1)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "ICH triage node private codes"
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = "ich-triage open-source project"
    return item


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning, PRIVATE_SCHEME_VERSION)


# --- SEG: segmented property category / type (CID 7150 / CID 7159), per-subtype anatomy (CID 7151)
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = _cc(codes.SCT.MorphologicallyAbnormalStructure)  # SCT 49755003
HEMORRHAGE = _cc(codes.SCT.Hemorrhage)  # SCT 50960005, CID 7159 "Lesion Segmentation Types"

ANATOMY: dict[str, CodedConcept] = {
    "epidural": _cc(codes.SCT.DuraMater),  # SCT 18545000 (the collection lies on the dura)
    "intraparenchymal": _cc(codes.SCT.Brain),  # SCT 12738006
    "intraventricular": _cc(codes.SCT.BrainVentricle),  # SCT 35764002
    "subarachnoid": _cc(codes.SCT.SubarachnoidSpace),  # SCT 35951006
    "subdural": _cc(codes.SCT.DuraMater),  # SCT 18545000
    "any": _cc(codes.SCT.Intracranial),  # SCT 1101003
}

# --- SR: the Finding of each measurement group (one per label, fixed order)
FINDING: dict[str, CodedConcept] = {
    # PS3.16 (pydicom): "Intracranial hemorrhage (disorder)".
    "any": _cc(codes.SCT.IntracranialHemorrhage),  # SCT 1386000
    # Not in PS3.16; identifiers as published in HL7 FHIR value sets (stroke diagnosis codes).
    "intraparenchymal": CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "subarachnoid": CodedConcept("21454007", "SCT", "Subarachnoid intracranial hemorrhage"),
    "subdural": CodedConcept("35486000", "SCT", "Subdural intracranial hemorrhage"),
    # No verifiable SNOMED CT identifier offline: private codes (see module docstring).
    "epidural": _private("EDH", DISPLAY["epidural"]),
    "intraventricular": _private("IVH", DISPLAY["intraventricular"]),
}

# --- SR: measurements and evaluations
PROBABILITY = _cc(codes.DCM.Probability)  # DCM 122157
VOLUME = _cc(codes.SCT.Volume)  # SCT 118565006
METHOD_VOXEL_SUM = _cc(codes.DCM.SumOfSegmentedVoxelMethodForVolume)  # DCM 126030
METHOD_ABC2 = _cc(codes.DCM.LWHMethodForVolumeOfEllipsoid)  # DCM 126029 (ABC/2 is the LWH ellipsoid estimate)
PRESENT = _cc(codes.SCT.Present)  # SCT 52101004
ABSENT = _cc(codes.SCT.Absent)  # SCT 272519000
PRIORITY = _cc(codes.SCT.Priority)  # SCT 260870009
URGENT = _cc(codes.SCT.UrgentProcedure)  # SCT 103391001 (CID 3414 meaning "Urgent Procedure")
ROUTINE = _cc(codes.SCT.Routine)  # SCT 373115008
THRESHOLD = _cc(codes.DCM.ThresholdValue)  # DCM 122411 "Threshold Value"
# The bundle's input-domain check (triage/models/domain.py), answered Yes / No: private, no standard concept
INPUT_DOMAIN = _private("DOMAIN", "Input within the model's training domain")
YES = _cc(codes.SCT.Yes)  # SCT 373066001
NO = _cc(codes.SCT.No)  # SCT 373067005
PROCEDURE_CT = _cc(codes.LN.CTUnspecifiedBodyRegion)  # LN 25045-6, CID 100
ALGORITHM_FAMILY = _cc(codes.DCM.ArtificialIntelligence)  # CID 7162 "Segmentation Algorithm Families"

# --- units (UCUM)
UNIT_ONE = _cc(codes.UCUM.NoUnits)  # UCUM "1"
UNIT_ML = CodedConcept("ml", "UCUM", "milliliter")


# Outline / display colours per subtype (also the SEG RecommendedDisplayCIELabValue).
COLORS: dict[str, tuple[int, int, int]] = {
    "any": (230, 0, 230),  # magenta: not to be mistaken for intraparenchymal red
    "epidural": (255, 140, 0),
    "intraparenchymal": (255, 32, 32),
    "intraventricular": (0, 200, 255),
    "subarachnoid": (255, 230, 0),
    "subdural": (60, 255, 60),
}

assert set(FINDING) == set(LABELS) == set(ANATOMY) == set(COLORS)

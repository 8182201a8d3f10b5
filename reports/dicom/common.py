"""Shared helpers for the result objects: identity of the producer, Patient/Study copying, flags."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata

from pydicom.dataset import Dataset

from triage.labels import SHORT, SUBTYPES
from triage.models.types import BundleIdentity, Prediction

MANUFACTURER = "ICH-Triage open source"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"

# Series numbers of our derived series (fixed, so re-runs look the same at the PACS).
SERIES_NUMBER = {"seg": 9901, "sr": 9902, "sc": 9903}

# Every attribute of the Patient IE (Patient, Clinical Trial Subject modules) and the Study IE
# (General Study, Patient Study, Clinical Trial Study modules), PS3.3 C.7.1.1 / C.7.2.1-3.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient module
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "PatientSex", "QualityControlSubject", "ReferencedPatientSequence",
    "ReferencedPatientPhotoSequence", "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup",
    "EthnicGroupCodeSequence", "PatientComments", "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence", "StrainDescription",
    "StrainNomenclature", "StrainStockSequence", "StrainAdditionalInformation", "StrainCodeSequence",
    "GeneticModificationsSequence", "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "SourcePatientGroupIdentificationSequence", "GroupOfPatientsIdentificationSequence",
    # Clinical Trial Subject module
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    # General Study module
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "RequestingServiceCodeSequence", "ReferencedStudySequence",
    "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    # Patient Study module
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize", "PatientWeight",
    "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension", "PatientSizeCodeSequence",
    "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "PatientState",
    "Occupation", "AdditionalPatientHistory", "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID",
    "IssuerOfServiceEpisodeIDSequence", "ServiceEpisodeDescription", "PatientSexNeutered", "ReasonForVisit",
    "ReasonForVisitCodeSequence",
    # Clinical Trial Study module
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "ConsentForClinicalTrialUseSequence",
)  # fmt: skip


TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip

# Type 2 attributes of the Patient, Clinical Trial Subject, General Study and Clinical Trial Study modules.
_KEEP_EMPTY = frozenset(
    TYPE2_PATIENT_STUDY
    + ("ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialProtocolName", "ClinicalTrialTimePointID")
)


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy every Patient and Study IE attribute present in ``source`` onto ``target``.

    Viewers file a derived object with its study only when these match the source exactly;
    validators (dcentvfy) compare them across objects too. Empty values are kept only for Type 2
    attributes: an empty Type 1C one in the source (seen in de-identified series, e.g.
    DeidentificationMethod) would make the derived object invalid.
    """
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    for kw in PATIENT_STUDY_KEYWORDS:
        if kw in source and (not source[kw].is_empty or kw in _KEEP_EMPTY):
            target[kw] = source[kw]  # same DataElement (tag, VR, value)
        elif kw in target and target[kw].is_empty and kw not in _KEEP_EMPTY:
            del target[kw]
    if (
        str(target.get("PatientIdentityRemoved", "")).upper() == "YES"
        and not target.get("DeidentificationMethod")
        and not target.get("DeidentificationMethodCodeSequence")
    ):
        # Type 1C then; the source lacks it (so is invalid itself): say so rather than invent a method.
        target.DeidentificationMethod = "Not recorded in the source images"
    for kw in TYPE2_PATIENT_STUDY:  # Type 2: present, maybe empty
        if kw not in target:
            setattr(target, kw, None)


def with_type2(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` in which missing Type 2 Patient/Study attributes are present and empty.

    highdicom reads these from the first source; real (de-identified) series often omit them.
    """
    missing = [kw for kw in TYPE2_PATIENT_STUDY if kw not in ds]
    if not missing:
        return ds
    out = Dataset()
    out.update(ds)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for kw in missing:
        setattr(out, kw, None)
    return out


def findings_short(prediction: Prediction) -> list[str]:
    """Short names of the subtypes called present, in label order (e.g. ``["IPH", "IVH"]``)."""
    return [SHORT[s] for s in SUBTYPES if prediction.present.get(s, False)]


def flag_text(prediction: Prediction) -> str:
    """POSITIVE or NEGATIVE, with "(OUT OF DOMAIN)" when the input-domain check found the series
    unlike the model's training studies (triage/models/domain.py)."""
    flag = "POSITIVE" if prediction.positive else "NEGATIVE"
    return f"{flag} (OUT OF DOMAIN)" if prediction.out_of_domain else flag


def series_description(kind: str, prediction: Prediction) -> str:
    """E.g. ``ICH AI SR: POSITIVE - NOT FOR DIAGNOSTIC USE`` or ``ICH AI SR: POSITIVE (OUT OF DOMAIN) -
    NOT FOR DIAGNOSTIC USE`` (LO, at most 64 characters, ASCII)."""
    text = f"ICH AI {kind.upper()}: {flag_text(prediction)} - {NOT_FOR_DIAGNOSIS}"
    return text[:64]


def software_versions(identity: BundleIdentity) -> str:
    """SoftwareVersions: the bundle and the node version in one LO value."""
    try:
        node = metadata.version("ich-triage")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        node = "0"
    return f"{identity.name} {identity.version} / ich-triage {node}"[:64]


def check_sources(sources: Sequence[Dataset], n_slices: int | None = None) -> None:
    """Raise ``ValueError`` with a clear message when the source headers cannot be used."""
    if not sources:
        raise ValueError("no source instances given")
    if n_slices is not None and len(sources) != n_slices:
        raise ValueError(f"{len(sources)} source instances but the volume has {n_slices} slices")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in sources}
    if len(series) != 1 or "" in series:
        raise ValueError("source instances must all belong to one series with a SeriesInstanceUID")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in sources}
    if len(studies) != 1 or "" in studies:
        raise ValueError("source instances must all belong to one study with a StudyInstanceUID")

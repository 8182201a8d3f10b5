"""The six labels in their fixed order (RSNA 2019 naming), used everywhere."""

from __future__ import annotations

LABELS: tuple[str, ...] = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
SUBTYPES: tuple[str, ...] = LABELS[1:]
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABELS)}

# Human-readable names for reports and pages.
DISPLAY: dict[str, str] = {
    "any": "Intracranial hemorrhage",
    "epidural": "Epidural hemorrhage",
    "intraparenchymal": "Intraparenchymal hemorrhage",
    "intraventricular": "Intraventricular hemorrhage",
    "subarachnoid": "Subarachnoid hemorrhage",
    "subdural": "Subdural hemorrhage",
}
SHORT: dict[str, str] = {
    "any": "ICH",
    "epidural": "EDH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
}

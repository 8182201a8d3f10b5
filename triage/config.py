"""Node configuration: one TOML file plus ``TRIAGE_<KEY>`` environment overrides.

Keys are flat (``dicom_port``). A TOML table flattens into its prefix, so ``[selection]
min_slices = 16`` is the key ``selection_min_slices`` and ``TRIAGE_SELECTION_MIN_SLICES``
overrides it. Precedence: defaults < TOML file < environment. Any invalid value stops the
node at start with a :class:`ConfigError` naming the key and where it came from.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "TRIAGE_"
# Environment variables with the prefix that are not settings: the config file path, the
# password for `triage user add`, and test hooks (TRIAGE_TEST_*), which are never settings.
NON_SETTING_VARS = frozenset({"TRIAGE_CONFIG", "TRIAGE_NEW_PASSWORD"})
TEST_HOOK_PREFIX = "TRIAGE_TEST_"
SECRET_KEYS = ("webhook_secret", "secret_key", "database_url")
URL_KEYS = ("webhook_url",)  # shown with any password in them masked
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, max 16


class ConfigError(ValueError):
    """Raised when the configuration cannot be used; the message names the key."""


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives result objects (``AET@host:port``)."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class AllowedPeer:
    """An allowed calling AE title, optionally restricted to a host or CIDR network."""

    aet: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def matches(self, aet: str, address: str | None) -> bool:
        if aet.strip() != self.aet:
            return False
        if self.network is None:
            return True
        if not address:
            return False
        try:
            return ipaddress.ip_address(address) in self.network
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.aet if self.network is None else f"{self.aet}@{self.network}"


def _check_aet(value: str) -> str:
    value = value.strip()
    if not _AET_RE.match(value) or not value:
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


def parse_destination(text: str) -> Destination:
    m = re.match(r"^\s*([^@]+)@(\[[^\]]+\]|[^:]+):(\d+)\s*$", text)
    if not m:
        raise ValueError(f"{text!r} is not AET@host:port")
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return Destination(_check_aet(m.group(1)), m.group(2).strip("[]"), port)


def parse_allowed(text: str) -> AllowedPeer:
    aet, _, net = text.partition("@")
    network = ipaddress.ip_network(net.strip(), strict=False) if net.strip() else None
    return AllowedPeer(_check_aet(aet), network)


def _split_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


class Settings(BaseModel):
    """Every configurable key with its default. Defaults need no file."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    # --- where things live
    data_dir: Path = Field(default=Path("./var"), description="Root for the file store and SQLite")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty = SQLite in data_dir")
    bundle_path: str = Field(default="", description="Model bundle directory; empty = shipped default")

    # --- DICOM node
    ae_title: str = "ICHTRIAGE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(default=11112, ge=1, le=65535)
    allowed_aets: list[AllowedPeer] = Field(default_factory=list)
    check_called_aet: bool = True
    max_associations: int = Field(default=16, ge=1, le=1000)
    dicom_reuse_port: bool = Field(
        default=False, description="Let several receiver processes listen on dicom_port at once (SO_REUSEPORT, "
        "Linux): the kernel spreads associations over them, so more cores take more images per second")
    max_pdu: int = Field(default=0, ge=0, description="Maximum PDU size we receive; 0 = unlimited")
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_verify_client: bool = False
    fsync: bool = True
    disk_floor_mb: int = Field(default=1024, ge=0)

    # --- series assembly and selection
    stable_seconds: float = Field(default=5.0, ge=0)
    early_complete: bool = True
    selection_modalities: list[str] = Field(default_factory=lambda: ["CT"])
    selection_body_parts: list[str] = Field(
        default_factory=lambda: ["HEAD", "BRAIN", "SKULL", "CEREBRUM", "HEADNECK", ""]
    )
    selection_head_keywords: list[str] = Field(
        default_factory=lambda: ["HEAD", "BRAIN", "CRANE", "KOPF", "CEREBR", "SKULL", "CT HEAD"]
    )
    selection_exclude_keywords: list[str] = Field(
        default_factory=lambda: ["LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "DOSE", "BONE", "CTA", "ANGIO"]
    )
    selection_bone_kernels: list[str] = Field(
        default_factory=lambda: ["BONE", "H70", "H60", "B70", "B60", "LUNG", "YC", "EDGE", "SHARP"]
    )
    selection_min_slices: int = Field(default=16, ge=1)
    selection_min_thickness_mm: float = Field(default=0.5, gt=0)
    selection_max_thickness_mm: float = Field(default=6.0, gt=0)
    selection_max_tilt_deg: float = Field(default=30.0, ge=0)
    selection_spacing_tolerance: float = Field(
        default=0.25, ge=0, description="Allowed relative deviation of slice spacing from the median"
    )
    selection_allow_uneven_spacing: bool = Field(
        default=True, description="Process (and record) uneven spacing rather than skip it"
    )
    inference_max_slices: int = Field(
        default=400, ge=16,
        description="A series of more slices is analysed as averaged slabs of consecutive slices (at most this "
                    "many): bounds the worker's memory and time (docs/deploy.md, sizing)",
    )
    stat_keywords: list[str] = Field(
        default_factory=lambda: ["STAT", "EMERG", "CODE STROKE", "STROKE", "TRAUMA", "NOTFALL", "URGENT"]
    )

    # --- destinations and notifications
    destinations: list[Destination] = Field(default_factory=list)
    send_compressed: bool = False
    webhook_url: str = ""
    webhook_secret: str = ""
    hl7_destination: str = Field(default="", description="host:port of an HL7 v2 MLLP listener")
    hl7_sending_facility: str = "ICHTRIAGE"
    hl7_receiving_application: str = "RIS"

    # --- queue and worker
    worker_id: str = ""
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda(:\\d+)?)$")
    inference_threads: int = Field(
        default=0, ge=0, le=256,
        description="CPU threads of one inference (torch intra-op); 0 = auto: one core left to the rest of "
                    "the node, at most 2")
    inference_runtime: str = Field(
        default="auto", pattern="^(auto|torch|onnx)$",
        description="Where the slice network runs on CPU: `auto` = ONNX Runtime when the bundle has a verified "
                    "ONNX export (`triage export BUNDLE`; the default bundle ships one), else PyTorch; `onnx` = "
                    "ONNX Runtime or fail at start; `torch` = always PyTorch. Results record it (device "
                    "`cpu+onnxruntime`)")
    lease_seconds: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    retry_base_seconds: float = Field(default=5.0, ge=0)
    retry_max_seconds: float = Field(default=900.0, ge=0)
    unreachable_wait_hours: float = Field(
        default=72.0, ge=0,
        description="How long a delivery waits, without spending its attempts, for a destination that cannot be "
                    "reached at all (a PACS outage); after that its failures count and it dies after "
                    "`max_attempts` (a dead letter to retry from /ops)")
    poll_seconds: float = Field(default=0.5, gt=0)
    thresholds: dict[str, float] = Field(default_factory=dict)

    # --- retention
    retention_days: float = Field(default=30.0, ge=0, description="0 = keep forever")
    purge_interval_minutes: float = Field(default=60.0, gt=0)

    # --- web
    web_host: str = "0.0.0.0"
    web_port: int = Field(default=8080, ge=1, le=65535)
    secret_key: str = Field(default="", description="Session signing key; empty = generated once, kept in the database")
    session_https_only: bool = False
    trusted_proxy_header: str = Field(default="", description="e.g. X-Remote-User; empty = off")
    lockout_attempts: int = Field(
        default=5, ge=1, description="Failed logins on one account from one address before that address waits")
    lockout_address_attempts: int = Field(
        default=20, ge=1, description="Failed logins from one address (any user names) before it waits")
    lockout_account_addresses: int = Field(
        default=3, ge=2, description="Addresses waiting on one account at once before the account waits for all")
    lockout_base_seconds: float = Field(default=30.0, gt=0, description="First wait; each further one doubles")
    lockout_minutes: float = Field(default=15.0, gt=0, description="Longest wait (the back-off's cap)")
    hsts_seconds: int = Field(
        default=31536000, ge=0,
        description="Strict-Transport-Security max-age sent on HTTPS requests and when session_https_only; 0 = off")
    viewer_url_template: str = Field(
        default="", description="'Open in viewer' link on the worklist and study page, e.g. "
        "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}; empty = no link")
    dicomweb_cors_origins: list[str] = Field(
        default_factory=list, description="Browser origins allowed to call /dicomweb with a bearer token "
        "(a viewer served from another origin, e.g. https://ohif.example.org); empty = same origin only")

    # --- logging
    log_format: str = Field(default="console", pattern="^(console|json)$")
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("dicomweb_cors_origins", mode="before")
    @classmethod
    def _cors_origins(cls, v: Any) -> list[str]:
        items = [str(s).strip().rstrip("/") for s in _split_list(v)]
        items = [s for s in items if s]
        for origin in items:
            if "*" in origin or not origin.lower().startswith(("https://", "http://")) or origin.count("/") != 2:
                raise ValueError(f"{origin!r} is not an origin such as https://viewer.example.org")
        return items

    @field_validator("viewer_url_template")
    @classmethod
    def _viewer_template(cls, v: str) -> str:
        v = v.strip()
        if v and ("{study_uid}" not in v or not v.lower().startswith(("https://", "http://", "/"))):
            raise ValueError("must be an http(s) URL (or a path) containing {study_uid}")
        return v

    @field_validator("ae_title")
    @classmethod
    def _aet(cls, v: str) -> str:
        return _check_aet(v)

    @field_validator("destinations", mode="before")
    @classmethod
    def _dest(cls, v: Any) -> list[Destination]:
        return [d if isinstance(d, Destination) else parse_destination(d) for d in _split_list(v)]

    @field_validator("allowed_aets", mode="before")
    @classmethod
    def _allowed(cls, v: Any) -> list[AllowedPeer]:
        return [a if isinstance(a, AllowedPeer) else parse_allowed(a) for a in _split_list(v)]

    @field_validator(
        "selection_modalities",
        "selection_body_parts",
        "selection_head_keywords",
        "selection_exclude_keywords",
        "selection_bone_kernels",
        "stat_keywords",
        mode="before",
    )
    @classmethod
    def _upper_list(cls, v: Any) -> list[str]:
        if isinstance(v, str):
            return [p.strip().upper() for p in v.split(",")]
        return [str(p).strip().upper() for p in v]

    @field_validator("thresholds", mode="before")
    @classmethod
    def _thresholds(cls, v: Any) -> dict[str, float]:
        if isinstance(v, str):
            v = json.loads(v) if v.strip().startswith("{") else dict(
                p.split("=", 1) for p in _split_list(v)
            )
        return {str(k): float(x) for k, x in dict(v).items()}

    @field_validator("hl7_destination")
    @classmethod
    def _hl7(cls, v: str) -> str:
        if v and not re.match(r"^[^:]+:\d+$", v):
            raise ValueError(f"{v!r} is not host:port")
        return v

    # --- derived values
    @property
    def queue_params(self) -> dict[str, Any]:
        """The job queue's keyword arguments (``storage.queue.JobQueue``), for every process that builds one."""
        return {"lease_seconds": self.lease_seconds, "max_attempts": self.max_attempts,
                "retry_base_seconds": self.retry_base_seconds, "retry_max_seconds": self.retry_max_seconds,
                "unreachable_wait_seconds": self.unreachable_wait_hours * 3600.0}

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'triage.sqlite3'}"

    @property
    def store_dir(self) -> Path:
        return self.resolved_data_dir / "store"

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain values, secrets masked (for ``config show``)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, list):
                value = [str(v) for v in value]
            elif isinstance(value, Path):
                value = str(value)
            if name in SECRET_KEYS and value:
                value = _mask_url(value) if name == "database_url" else "********"
            elif name in URL_KEYS and value:
                value = _mask_url(str(value))
            out[name] = value
        out["effective_database_url"] = _mask_url(self.effective_database_url)
        return out


def _mask_url(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1********@", url)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}".lower()
        if isinstance(value, dict) and name != "thresholds":
            flat.update(_flatten(value, f"{name}_"))
        else:
            flat[name] = value
    return flat


def load_settings(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from defaults, an optional TOML file and the environment."""
    env = dict(os.environ if env is None else env)
    path = path or env.get(f"{ENV_PREFIX}CONFIG") or None
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                values = _flatten(tomllib.load(fh))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
        origin = {k: f"{p}" for k in values}
    fields = Settings.model_fields
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key in NON_SETTING_VARS or key.startswith(TEST_HOOK_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in fields:
            raise ConfigError(f"unknown configuration key {name!r} (from environment variable {key})")
        values[name] = raw
        origin[name] = f"environment variable {key}"
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown configuration key {unknown[0]!r} (from {origin.get(unknown[0], '?')})")
    try:
        return Settings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        where = origin.get(key, "default")
        raise ConfigError(f"invalid configuration key {key!r} (from {where}): {err['msg']}") from exc

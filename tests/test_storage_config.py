"""Configuration: defaults, TOML, environment overrides, errors naming the key, masked `config show`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from triage.config import ConfigError, Destination, load_settings

REPO = Path(__file__).resolve().parent.parent
TRIAGE = str(REPO / ".venv" / "bin" / "triage")

TOML = """
ae_title = "NODE1"
dicom_port = 10400
destinations = ["PACS@10.0.0.5:104", "VNA@[::1]:11112"]
retention_days = 7

[selection]
min_slices = 24
exclude_keywords = ["scout", "Dose"]

[thresholds]
any = 0.4
"""


def test_defaults_need_no_file(tmp_path: Path) -> None:
    s = load_settings(None, env={"TRIAGE_DATA_DIR": str(tmp_path)})
    assert (s.ae_title, s.dicom_port, s.web_port) == ("ICHTRIAGE", 11112, 8080)
    assert (s.lease_seconds, s.max_attempts, s.retry_base_seconds, s.retry_max_seconds) == (60.0, 5, 5.0, 900.0)
    assert s.retention_days == 30.0 and s.disk_floor_mb == 1024 and s.fsync is True
    assert s.effective_database_url == f"sqlite:///{tmp_path.resolve() / 'triage.sqlite3'}"
    assert s.store_dir == tmp_path.resolve() / "store"
    assert s.destinations == [] and s.selection_min_slices == 16


def test_toml_file_and_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "triage.toml"
    cfg.write_text(TOML)
    s = load_settings(cfg, env={})
    assert (s.ae_title, s.dicom_port, s.retention_days) == ("NODE1", 10400, 7.0)
    assert s.destinations == [Destination("PACS", "10.0.0.5", 104), Destination("VNA", "::1", 11112)]
    assert s.selection_min_slices == 24
    assert s.selection_exclude_keywords == ["SCOUT", "DOSE"]
    assert s.thresholds == {"any": 0.4}
    # TRIAGE_CONFIG names the file when no path is passed
    assert load_settings(None, env={"TRIAGE_CONFIG": str(cfg)}).ae_title == "NODE1"


def test_environment_overrides_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "triage.toml"
    cfg.write_text(TOML)
    s = load_settings(
        cfg,
        env={"TRIAGE_DICOM_PORT": "11999", "TRIAGE_SELECTION_MIN_SLICES": "30", "TRIAGE_DESTINATIONS": "X@h:1",
             "TRIAGE_FSYNC": "false", "PATH": "/usr/bin"},
    )
    assert (s.dicom_port, s.selection_min_slices, s.fsync) == (11999, 30, False)
    assert s.destinations == [Destination("X", "h", 1)]
    assert s.ae_title == "NODE1"  # not overridden: the file's value stays


@pytest.mark.parametrize(
    ("env", "toml", "needles"),
    [
        ({"TRIAGE_DICOM_PORT": "70000"}, "", ["dicom_port", "TRIAGE_DICOM_PORT"]),
        ({"TRIAGE_LEASE_SECONDS": "soon"}, "", ["lease_seconds", "TRIAGE_LEASE_SECONDS"]),
        ({}, 'ae_title = "BAD\\\\AET"\n', ["ae_title", "triage.toml"]),
        ({}, "[selection]\nmin_slices = 0\n", ["selection_min_slices", "triage.toml"]),
        ({"TRIAGE_NO_SUCH_KEY": "1"}, "", ["no_such_key", "TRIAGE_NO_SUCH_KEY"]),
        ({}, "destinations = ['PACS-no-port']\n", ["destinations"]),
        ({}, "dicom_port = \n", ["not valid TOML"]),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, env: dict[str, str], toml: str, needles: list[str]) -> None:
    cfg = tmp_path / "triage.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env=env)
    for needle in needles:
        assert needle in str(info.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", env={})


def test_cli_config_show_masks_secrets_and_cli_reports_bad_keys(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")},
        "TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "TRIAGE_WEBHOOK_SECRET": "hook-s3cret-value",
        "TRIAGE_SECRET_KEY": "session-s3cret-value",
        "TRIAGE_DATABASE_URL": "postgresql://triage:db-s3cret-pw@db.example:5432/triage",
        "TRIAGE_DICOM_PORT": "11113",
    }
    out = subprocess.run([TRIAGE, "config", "show"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "s3cret" not in out.stdout + out.stderr
    shown = json.loads(out.stdout)
    assert shown["dicom_port"] == 11113
    assert shown["webhook_secret"] == "********" and shown["secret_key"] == "********"
    assert shown["database_url"] == "postgresql://triage:********@db.example:5432/triage"
    assert shown["effective_database_url"] == shown["database_url"]

    env["TRIAGE_DICOM_PORT"] = "0"
    bad = subprocess.run([TRIAGE, "config", "show"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "dicom_port" in bad.stderr and "TRIAGE_DICOM_PORT" in bad.stderr

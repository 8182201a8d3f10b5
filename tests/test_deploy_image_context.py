"""What deploy/Dockerfile copies into the image is enough to run the node.

No container engine runs here, so this rebuilds the image's /opt/ich-triage tree the way the
Dockerfile does (its COPY instructions, filtered by its .dockerignore allow-list) in a temporary
directory, and runs the node from that tree alone: imports, database migrations (the alembic
scripts must travel with the packages), ``config show``, the probe script and the shipped model
bundle. A runtime file outside what the Dockerfile copies makes this test fail.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, for the patterns used here: a pattern matches the path or one of
    its parent directories (``**/name`` matches any path component); the last match wins and
    ``!`` re-includes."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, pat) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def build_app_tree(dest: Path) -> Path:
    """Copy what the build stage's COPY instructions copy, as the image's /opt/ich-triage."""
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.lstrip().startswith("#")]
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    build_stage = text.split("\nFROM ")[1]  # the first FROM after the ARG is the build stage
    workdir = Path("/")
    copies = 0
    for line in build_stage.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "WORKDIR":
            workdir = Path(rest.strip())
        elif word == "COPY" and not rest.startswith("--from"):
            *sources, target = rest.split()
            target_path = workdir / target if not target.startswith("/") else Path(target)
            for src in sources:
                src_path = REPO / src
                to = target_path / src_path.name if target.endswith("/") else target_path
                for f in [src_path] if src_path.is_file() else sorted(src_path.rglob("*")):
                    rel = f.relative_to(REPO).as_posix()
                    if f.is_dir() or _ignored(rel, patterns):
                        continue
                    out = dest / (to if src_path.is_file() else to / f.relative_to(src_path)).relative_to("/")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
                    copies += 1
    assert copies > 10
    app = dest / "opt" / "ich-triage"
    assert (app / "pyproject.toml").is_file()
    return app


def test_dockerignore_rules() -> None:
    patterns = ["*", "!triage/", "!deploy/healthcheck.py", "**/__pycache__"]
    assert _ignored("tests/test_x.py", patterns)
    assert _ignored(".venv/bin/python", patterns)
    assert not _ignored("triage/cli.py", patterns)
    assert _ignored("triage/__pycache__/cli.cpython-311.pyc", patterns)
    assert not _ignored("deploy/healthcheck.py", patterns)
    assert _ignored("deploy/compose.yaml", patterns)


def test_node_runs_from_the_image_tree(tmp_path: Path) -> None:
    app = build_app_tree(tmp_path / "root")
    assert not (app / "tests").exists() and not (app / ".venv").exists()
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({
        "PYTHONPATH": str(app),  # ahead of the checkout's editable install
        "PYTHONDONTWRITEBYTECODE": "1",
        "TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "TRIAGE_DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'triage.sqlite3'}",
        "TRIAGE_LOG_FORMAT": "json",
    })

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)

    where = run("-c", "import triage, storage.migrate as m, reports; "
                      "from triage.models.bundle import DEFAULT_BUNDLE as b; "
                      "print(triage.__file__, m.ROOT, b, b.is_dir())")
    assert where.returncode == 0, where.stderr
    module, root, bundle_dir, bundle_present = where.stdout.split()
    assert (module, root) == (str(app / "triage" / "__init__.py"), str(app))
    # The shipped default bundle travels with the packages whenever the checkout has one.
    in_repo = REPO / Path(bundle_dir).relative_to(app)
    assert bundle_present == str(in_repo.is_dir())
    if in_repo.is_dir():
        def files(root_dir: Path) -> list[str]:
            return sorted(p.relative_to(root_dir).as_posix() for p in root_dir.rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts)

        assert files(Path(bundle_dir)) == files(in_repo)
    (tmp_path / "data").mkdir()
    up = run("-m", "triage.cli", "db", "upgrade")
    assert up.returncode == 0, up.stderr
    assert "database at revision" in up.stdout
    probe = run(str(app / "deploy" / "healthcheck.py"), "db")
    assert probe.returncode == 0, probe.stderr
    show = run("-m", "triage.cli", "config", "show")
    assert show.returncode == 0 and '"data_dir"' in show.stdout, show.stderr


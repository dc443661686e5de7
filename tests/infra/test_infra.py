"""infra/: the compose stack, the Helm chart and the Dockerfile are valid, and every setting they pass is one
the Settings object really reads.

The validators are installed by ``.ci/run`` into ``.ci-tools/`` (hadolint, kubernetes-validate, helm, the
Docker Compose v2 CLI plugin, the Compose specification's JSON schema); without them (a developer machine) those checks skip, and under CI
(``FLYWHEEL_CI=1``) a missing tool is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from flywheel.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".ci-tools"
COMPOSE = ROOT / "infra" / "compose" / "compose.yaml"
ENV_EXAMPLE = ROOT / "infra" / "compose" / ".env.example"
CHART = ROOT / "infra" / "helm" / "flywheel"


def _tool(name: str) -> str:
    for candidate in (TOOLS / "bin" / name, TOOLS / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("FLYWHEEL_CI") == "1":
        pytest.fail(f"{name} is not installed: .ci/run installs it into .ci-tools/")
    pytest.skip(f"{name} not installed (.ci/run installs it into .ci-tools/)")


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


def _interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution on the parsed file: ${VAR} from the env file, $$ is a literal $."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    if isinstance(node, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            if m.group(1) not in env:
                raise KeyError(f"compose.yaml uses ${{{m.group(1)}}}, which .env.example does not define")
            return env[m.group(1)]
        return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, node)
    return node


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), _env_example())


def test_the_compose_stack_has_every_part_with_health_checks(compose):
    services = compose["services"]
    brokers = [s for s in services if s.startswith("kafka-")]
    assert len(brokers) == 3
    for b in brokers:
        env = services[b]["environment"]
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller" and env["KAFKA_CONTROLLER_QUORUM_VOTERS"].count("@") == 3
    for needed in ("postgres", "minio", "mlflow", "redis", "airflow-apiserver", "airflow-scheduler",
                   "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "api", "proxy", "consumer"):
        assert needed in services, needed
        assert "healthcheck" in services[needed], f"{needed} has no health check"
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["airflow-worker"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert "--backend-store-uri=postgresql" in " ".join(services["mlflow"]["command"])
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert src.startswith(".") or src in compose["volumes"], f"{name}: volume {src} is not declared"


def _docker_compose() -> tuple[list[str], dict[str, str]]:
    """``docker compose`` with the plugin .ci/run installs (DOCKER_CONFIG=.ci-tools/docker) or one of this
    machine's own; skips (fails under CI) where neither exists. No engine is needed for ``config``."""
    docker = shutil.which("docker")
    env = dict(os.environ)
    if (TOOLS / "docker" / "cli-plugins" / "docker-compose").exists():
        env["DOCKER_CONFIG"] = str(TOOLS / "docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, env=env).returncode == 0:
        return [docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE)], env
    _tool("docker-compose-plugin")
    raise AssertionError("unreachable")


def test_docker_compose_config_accepts_the_stack(tmp_path):
    cmd, env = _docker_compose()
    r = subprocess.run([*cmd, "config", "--format", "json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    services = resolved["services"]
    assert {"kafka-1", "kafka-2", "kafka-3", "postgres", "minio", "mlflow", "redis", "api", "proxy"} <= set(services)
    assert services["api"]["deploy"]["replicas"] == 2
    # What compose resolves from .env.example is what our own reading of the file (the fixture) sees.
    env_file = _env_example()
    assert services["mlflow"]["environment"]["AWS_ACCESS_KEY_ID"] == env_file["MINIO_ROOT_USER"]
    # A broken file is refused: the check can fail.
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["api"]["depends_on"] = {"no-such-service": {"condition": "service_healthy"}}
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(broken))
    r = subprocess.run([cmd[0], "compose", "-f", str(bad), "--project-directory", str(COMPOSE.parent),
                        "--env-file", str(ENV_EXAMPLE), "config", "-q"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "no-such-service" in r.stderr, r.stderr


def test_the_compose_file_matches_the_compose_specification(compose):
    """The Compose specification's JSON schema, checked by jsonschema (a second, independent reading)."""
    schema_path = TOOLS / "compose_spec.json"
    if not schema_path.exists():
        _tool("compose_spec.json")
    import jsonschema

    schema = json.loads(schema_path.read_text())
    doc = dict(compose)
    if "name" not in schema.get("properties", {}):
        doc.pop("name")  # the top-level project name came to the specification after this schema's release
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert not errors, errors


def _settings_keys(env: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("FLYWHEEL_")}


def _assert_settings_read(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every FLYWHEEL_ key names a Settings field, and Settings built from that environment holds the value."""
    for k in [k for k in os.environ if k.startswith("FLYWHEEL_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    s = Settings()
    for key, raw in env.items():
        if key == "FLYWHEEL_HOME":
            assert s.home == Path(raw).resolve()
            continue
        m = re.fullmatch(r"FLYWHEEL_([A-Z]+)__([A-Z0-9_]+)", key)
        assert m, f"{key} is not FLYWHEEL_<SECTION>__<FIELD>"
        section, name = m.group(1).lower(), m.group(2).lower()
        assert section in Settings.model_fields, f"{key}: Settings has no section {section!r}"
        sub = getattr(s, section)
        assert name in type(sub).model_fields, f"{key}: Settings.{section} has no field {name!r}"
        value = getattr(sub, name)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):
            assert value == [type(value[0]).model_validate(x) for x in json.loads(raw)] if value else json.loads(raw) == []
        elif isinstance(value, bool):
            assert value == (str(raw).lower() in ("1", "true", "yes", "on")), key
        elif isinstance(value, int | float):
            assert value == type(value)(raw), key
        elif raw == "":
            assert value in ("", None), key
        else:
            assert str(value) == str(raw), f"{key}: set {raw!r}, Settings holds {value!r}"


def test_every_setting_the_compose_file_passes_is_read_by_settings(compose, monkeypatch):
    seen: set[str] = set()
    for svc in compose["services"].values():
        env = _settings_keys(svc.get("environment") or {})
        if env:
            _assert_settings_read({k: str(v) for k, v in env.items()}, monkeypatch)
            seen |= set(env)
    assert {"FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS", "FLYWHEEL_LAKE__URI", "FLYWHEEL_MLFLOW__TRACKING_URI",
            "FLYWHEEL_API__KEYS", "FLYWHEEL_API__POLICY_FROM_REGISTRY"} <= seen


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("helm"), *args], capture_output=True, text=True)


def _rendered(*sets: str) -> list[dict[str, Any]]:
    r = _helm("template", "flywheel", str(CHART), *[x for s in sets for x in ("--set", s)])
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_the_chart_lints_renders_and_matches_the_kubernetes_schemas(tmp_path):
    lint = _helm("lint", "--strict", str(CHART))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = _rendered()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler", "Secret", "Service"]
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    r = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # more consumers than partitions would sit idle: the chart refuses to render them
    bad = _helm("template", "flywheel", str(CHART), "--set", "consumer.replicas=20")
    assert bad.returncode != 0 and "consumer.replicas (20) > settings.kafka.partitions (12)" in bad.stderr


def test_every_setting_the_chart_passes_is_read_by_settings(monkeypatch):
    docs = _rendered("secrets.lakeAccessKeyId=key", "secrets.lakeSecretAccessKey=secret",
                     "settings.lake.s3_endpoint_url=http://minio:9000")
    env: dict[str, str] = {}
    for d in docs:
        if d["kind"] == "ConfigMap":
            env |= d["data"]
        if d["kind"] == "Secret":
            env |= d["stringData"]
    names = set()
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                names |= {e["name"] for e in c.get("env", [])}
                for e in c.get("env", []):
                    if "value" in e:
                        env[e["name"]] = e["value"]
    assert names - set(env) <= {"FLYWHEEL_KAFKA__SASL_PASSWORD"}  # optional secret keys not set here
    env.setdefault("FLYWHEEL_KAFKA__SASL_PASSWORD", "pw")
    _assert_settings_read(env, monkeypatch)


def test_the_dockerfile_lints_clean():
    r = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

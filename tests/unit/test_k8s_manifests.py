"""deploy/k8s: every manifest valid against the Kubernetes schemas (kubernetes-validate's bundled ones, no
network; KEDA's CRD against a small structural schema here), and the invariants between the manifests,
the Dockerfile, the CLI and the settings: drain vs grace period, gRPC probes, image targets, env names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices

from scoring_service.config import Settings
from tests.servers.common import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"
REDIS = REPO_ROOT / "deploy" / "redis"  # the cache Redis' files, shared with docker-compose.yml
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # the oldest supported minor (grpc probes, CronJob timeZone GA) and the newest
ENV_OUTSIDE_SETTINGS = {"OMP_WAIT_POLICY"}  # read by libgomp, not by the service

# KEDA ships no JSON schema that kubernetes-validate bundles: the fields these manifests use, with their types.
_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata"],
    "properties": {
        "type": {"const": "kafka"},
        "metadata": {
            "type": "object",
            "required": ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"],
            "additionalProperties": {"type": "string"},
        },
    },
    "additionalProperties": False,
}
KEDA_SCALED_JOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["jobTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "jobTargetRef": {"type": "object", "required": ["template"]},
                "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "successfulJobsHistoryLimit": {"type": "integer", "minimum": 0},
                "failedJobsHistoryLimit": {"type": "integer", "minimum": 0},
                "scalingStrategy": {"type": "object", "properties": {"strategy": {"enum": ["default", "custom", "accurate",
                                                                                            "eager"]}}},
            },
        },
    },
}


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


DOCS = _docs()


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for name, doc in DOCS:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "Job"):
            specs.append((name, spec["template"]["spec"]))
        elif kind == "CronJob":
            specs.append((name, spec["jobTemplate"]["spec"]["template"]["spec"]))
        elif kind == "ScaledJob":
            specs.append((name, spec["jobTargetRef"]["template"]["spec"]))
    return specs


def _settings_env_names() -> set[str]:
    names = set()
    for field, info in Settings.model_fields.items():
        names.add(f"FRAUDSCORE_{field.upper()}")
        if isinstance(info.validation_alias, AliasChoices):
            names |= {c for c in info.validation_alias.choices if isinstance(c, str)}
    return names


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert {r for r in kustomization["resources"] if r.endswith(".yaml")} == files
    assert "../redis" in kustomization["resources"]  # the ConfigMap made of deploy/redis
    assert len(DOCS) >= 10


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), DOCS, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCS])
def test_manifest_is_valid(name, doc, version):
    if doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(doc, KEDA_SCALED_JOB_SCHEMA)
        jsonschema.validate(doc["spec"]["jobTargetRef"]["template"]["spec"], {"type": "object", "required": ["containers"]})
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def test_invalid_manifest_is_rejected():
    """The validation above can fail: a misspelt field and a wrong type are caught."""
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    scaled = next(doc for _, doc in DOCS if doc["kind"] == "ScaledJob")
    broken = {**scaled, "spec": {**scaled["spec"], "triggers": [{"type": "kafka", "metadata": {"topic": "x"}}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, KEDA_SCALED_JOB_SCHEMA)


def test_no_secret_values_committed():
    assert not _of_kind("Secret")
    for name, spec in _pod_specs():
        for c in spec["containers"]:
            for env in c.get("env", []):
                if "value" in env:
                    assert not re.search(r"://[^/@\s]*:[^/@\s]*@", env["value"]), (name, env)  # no credentials in URLs
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "fraudscore-secrets", (name, env)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<ref>") for e in container.get("env", [])}


def test_grace_period_covers_drain_and_in_flight_calls():
    (deployment,) = _of_kind("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = _env(container)
    drain_s = float(env.get("FRAUDSCORE_DRAIN_S", Settings.model_fields["drain_s"].default))
    budget_s = float(env.get("FRAUDSCORE_BUDGET_MS", Settings.model_fields["budget_ms"].default)) / 1000
    pre_stop = container.get("lifecycle", {}).get("preStop")
    pre_stop_s = float(pre_stop["sleep"]["seconds"]) if pre_stop and "sleep" in pre_stop else 0.0
    # config.py: terminationGracePeriodSeconds must exceed drain + budget + ~3 s
    assert spec["terminationGracePeriodSeconds"] > pre_stop_s + drain_s + budget_s + 3
    # readiness notices NOT_SERVING within the drain period
    ready = container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] < drain_s


def test_probes_use_grpc_health_on_the_serving_port():
    (deployment,) = _of_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert _env(container)["FRAUDSCORE_LISTEN"].endswith(f":{grpc_port}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(container[probe]) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, probe
        assert container[probe]["grpc"]["port"] == grpc_port


def test_images_name_dockerfile_targets():
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (REPO_ROOT / "Dockerfile").read_text(), re.M))
    assert {"cpu", "gpu"} <= targets
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all(img["newTag"] in targets for img in kustomization["images"])
    for name, spec in _pod_specs():
        for c in spec["containers"]:
            repo, _, tag = c["image"].rpartition(":")
            assert repo == "fraudscore" and tag in targets, (name, c["image"])


def test_env_names_are_settings():
    known = _settings_env_names() | ENV_OUTSIDE_SETTINGS
    (configmap,) = _of_kind("ConfigMap")
    assert set(configmap["data"]) <= known, set(configmap["data"]) - known
    for name, spec in _pod_specs():
        for c in spec["containers"]:
            assert set(_env(c)) <= known, (name, set(_env(c)) - known)
            assert [ref["configMapRef"]["name"] for ref in c.get("envFrom", [])] == [configmap["metadata"]["name"]]


def test_commands_are_cli_commands():
    from typer.main import get_command

    from scoring_service.cli import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name, spec in _pod_specs():
        for c in spec["containers"]:
            assert c["args"][0] in commands, (name, c["args"])


def test_pods_are_non_root_read_only_and_bounded():
    for name, spec in _pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"], name
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, name


def test_services_hpa_and_batch_point_at_the_right_things():
    (deployment,) = _of_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [s for s in _of_kind("Service") if s["spec"]["selector"]["app.kubernetes.io/name"] == "fraudscore"]
    assert {s["metadata"]["name"] for s in services} == {"fraudscore", "fraudscore-headless"}
    for s in services:
        assert s["spec"]["selector"].items() <= labels.items()
    assert any(s["spec"].get("clusterIP") == "None" for s in services)  # for client-side round_robin
    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    crons = {c["metadata"]["name"]: c for c in _of_kind("CronJob")}
    assert set(crons) == {"fraudscore-nightly", "fraudscore-retrain"}
    assert all(c["spec"]["concurrencyPolicy"] == "Forbid" for c in crons.values())
    cron = crons["fraudscore-nightly"]
    retrain = crons["fraudscore-retrain"]["spec"]["jobTemplate"]["spec"]
    assert retrain["template"]["spec"]["containers"][0]["args"][0] == "retrain"
    assert crons["fraudscore-retrain"]["spec"]["schedule"].split()[2:] == ["*", "*", "1"]  # weekly
    assert retrain["backoffLimit"] == 0  # exit 3 (refused by the gate) is an answer, not a fault to retry
    env = {e["name"] for e in retrain["template"]["spec"]["containers"][0]["env"]}
    assert "REDIS_URL" not in env and "FRAUDSCORE_DATABASE_URL" in env  # the registry, never the cache
    (scaled,) = _of_kind("ScaledJob")
    trigger = scaled["spec"]["triggers"][0]["metadata"]
    nightly_args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert trigger["consumerGroup"] == nightly_args[nightly_args.index("--group-id") + 1]
    assert trigger["topic"] == f"{Settings.model_fields['kafka_topic_prefix'].default}.payments"
    policies = _of_kind("NetworkPolicy")
    assert any(p["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in p["spec"] for p in policies)


def test_docs_page_exists():
    assert Path(REPO_ROOT / "docs" / "deploy.md").is_file()


# ---- the cache's Redis (redis.yaml, deploy/redis; docs/security.md "Redis users", docs/deploy.md "Redis memory")
def _redis_pod() -> dict[str, Any]:
    (redis,) = _of_kind("StatefulSet")
    assert redis["metadata"]["name"] == "redis" and redis["spec"]["replicas"] == 1
    return redis["spec"]["template"]["spec"]


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``8Gi``) or a Redis size (``6gb``, ``100mb``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30, "k": 10**3, "m": 10**6,
             "g": 10**9}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit, 1)


def test_redis_runs_the_files_compose_runs():
    generator = yaml.safe_load((REDIS / "kustomization.yaml").read_text())["configMapGenerator"]
    (config,) = [g for g in generator if g["name"] == "fraudscore-redis"]
    assert set(config["files"]) == {"start.sh", "render-acl.sh", "users.acl", "redis.conf"}
    assert all((REDIS / f).is_file() for f in config["files"])
    spec = _redis_pod()
    (container,) = spec["containers"]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["redis"]
    assert container["command"] == compose["command"] and container["image"] == compose["image"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_mount = next(m for m in mounts.values() if volumes[m["name"]].get("configMap"))
    assert volumes[config_mount["name"]]["configMap"]["name"] == "fraudscore-redis"
    assert compose["volumes"] == [f"./deploy/redis:{config_mount['mountPath']}:ro"] and config_mount["readOnly"]
    env = _env(container)
    acl_mount = next(m for m in mounts.values() if m["mountPath"] == env["REDIS_ACL_DIR"])
    assert volumes[acl_mount["name"]]["emptyDir"]["medium"] == "Memory"  # the rendered users never reach a disk


def test_redis_users_passwords_and_urls_come_from_the_secret():
    (container,) = _redis_pod()["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(refs) == {"REDIS_ADMIN_PASSWORD", "REDIS_SCORER_PASSWORD", "REDIS_NIGHTLY_PASSWORD"}
    assert {r["name"] for r in refs.values()} == {"fraudscore-secrets"}
    for name, spec in _pod_specs():  # each client with its own user's URL
        for c in spec["containers"]:
            url = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c.get("env", []) if "valueFrom" in e}
            if c["args"][0] == "serve":
                assert url["REDIS_URL"] == "redis-url", name
            elif c["args"][0] in ("nightly", "replay"):
                assert url["REDIS_URL"] == "redis-url-nightly", name
            else:
                assert "REDIS_URL" not in url, name


def test_redis_memory_is_bounded_below_its_limit_with_a_volatile_policy():
    (container,) = _redis_pod()["containers"]
    maxmemory = _bytes(_env(container)["REDIS_MAXMEMORY"])
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert 0.5 * limit <= maxmemory <= 0.8 * limit  # room for fragmentation and client buffers
    conf = dict(line.split(None, 1) for line in (REDIS / "redis.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    # volatile-*: keys without a TTL (the active-generation pointer) are never evicted
    assert conf["maxmemory-policy"] == "volatile-ttl"
    assert conf["save"] == '""' and conf["appendonly"] == "no"


def test_redis_pod_is_non_root_read_only_and_reachable_only_from_fraudscore():
    spec = _redis_pod()
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    (policy,) = [p for p in _of_kind("NetworkPolicy") if p["spec"]["podSelector"]["matchLabels"].get(
        "app.kubernetes.io/name") == "redis"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and "egress" not in policy["spec"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "fraudscore"}}}]
    (service,) = [s for s in _of_kind("Service") if s["metadata"]["name"] == "redis"]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "redis"}

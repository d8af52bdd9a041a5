"""deploy/k8s validated offline (no cluster here):

- every Kubernetes object against the API's JSON schemas (`kubernetes-validate`, strict: an
  unknown field is an error), for the oldest and newest Kubernetes versions the package ships
  and that the manifests target, with the GPU overlay's patches applied too;
- the KEDA objects against the fields of KEDA's published CRDs (kedacore/keda
  config/crd/bases/keda.sh_scaledobjects.yaml, v1alpha1, and the TriggerAuthentication CRD)
  and the redis-streams scaler's metadata keys;
- consistency with the code: the stream and consumer group of every ScaledObject are what
  spotline.common.keys produces, the settings ConfigMap loads as settings, the Grafana
  ConfigMap holds the dashboard file unchanged, and the workers' readiness probe is run for
  real against a metrics server.
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from spotline.common.embedded import free_port
from spotline.common.keys import Keys
from spotline.common.metrics import Metrics
from spotline.common.settings import STAGES, load_settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
GPU_OVERLAY = K8S / "overlays" / "gpu"
sys.path.insert(0, str(ROOT / "tools"))
from gen_k8s_dashboard import DASHBOARD, render  # noqa: E402

# The manifests use nothing newer than 1.30 (the oldest release still widely run in 2026).
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
GPU_STAGES = ("detect", "upscale", "score", "track")
METRICS_PORT = 9100
KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")

# --- KEDA's CRDs, the fields this project uses or may use -------------------------------------
# From kedacore/keda config/crd/bases/keda.sh_scaledobjects.yaml (apiextensions.k8s.io/v1,
# version v1alpha1). A structural CRD schema prunes unknown fields silently, so here an unknown
# field is an error (additionalProperties: false) rather than a setting that quietly does nothing.
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_HPA_RULES = {"type": "object", "additionalProperties": False, "properties": {
    "policies": {"type": "array", "items": {
        "type": "object", "additionalProperties": False,
        "required": ["periodSeconds", "type", "value"],
        "properties": {"periodSeconds": _INT32, "type": {"type": "string"}, "value": _INT32}}},
    "selectPolicy": {"type": "string"},
    "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600}}}
SCALEDOBJECT_SPEC = {
    "type": "object", "additionalProperties": False,
    "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "advanced": {"type": "object", "additionalProperties": False, "properties": {
            "horizontalPodAutoscalerConfig": {
                "type": "object", "additionalProperties": False, "properties": {
                    "behavior": {"type": "object", "additionalProperties": False,
                                 "properties": {"scaleDown": _HPA_RULES, "scaleUp": _HPA_RULES}},
                    "name": {"type": "string"}}},
            "restoreToOriginalReplicaCount": {"type": "boolean"}}},
        "cooldownPeriod": _INT32,
        "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                     "properties": {"failureThreshold": _INT32, "replicas": _INT32}},
        "idleReplicaCount": _INT32,
        "maxReplicaCount": _INT32,
        "minReplicaCount": _INT32,
        "pollingInterval": _INT32,
        "scaleTargetRef": {"type": "object", "additionalProperties": False,
                           "required": ["name"], "properties": {
                               "apiVersion": {"type": "string"},
                               "envSourceContainerName": {"type": "string"},
                               "kind": {"type": "string"}, "name": {"type": "string"}}},
        "triggers": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["metadata", "type"],
            "properties": {
                "authenticationRef": {"type": "object", "additionalProperties": False,
                                      "required": ["name"], "properties": {
                                          "kind": {"type": "string"},
                                          "name": {"type": "string"}}},
                # metadata: additionalProperties string: every value must be a string
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                "name": {"type": "string"},
                "type": {"type": "string"}}}},
    }}
# keda.sh_triggerauthentications.yaml: secretTargetRef items need parameter, name, key.
TRIGGERAUTH_SPEC = {
    "type": "object", "properties": {
        "secretTargetRef": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["key", "name", "parameter"],
            "properties": {"key": {"type": "string"}, "name": {"type": "string"},
                           "parameter": {"type": "string"}}}}}}
KEDA_OBJECT = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
               "properties": {"apiVersion": {"const": "keda.sh/v1alpha1"},
                              "metadata": {"type": "object", "required": ["name"]}}}
# The redis-streams scaler's trigger metadata (KEDA docs, scalers/redis-streams, 2.12+):
# one of address / host(+port) / their *FromEnv forms; stream required; with consumerGroup,
# lagCount selects the lag metric, else pendingEntriesCount; without a group, streamLength.
REDIS_STREAMS_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "databaseIndex", "enableTLS", "unsafeSsl"}
REDIS_STREAMS_AUTH_PARAMS = {"username", "password", "tls", "ca", "cert", "key", "keyPassword"}


# --- loading ----------------------------------------------------------------------------------
def docs_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def kustomization(path: Path) -> dict[str, Any]:
    return docs_of(path / "kustomization.yaml")[0]


def base_objects() -> list[dict[str, Any]]:
    """Every object `kubectl apply -k deploy/k8s` creates, with the kustomization's namespace
    and image applied as kustomize does."""
    kust = kustomization(K8S)
    images = {image["name"]: image for image in kust["images"]}
    objs = []
    for name in kust["resources"]:
        for doc in docs_of(K8S / name):
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kust["namespace"]
            for c in containers(doc):
                if c["image"] in images:
                    image = images[c["image"]]
                    c["image"] = f"{image['newName']}:{image['newTag']}"
            objs.append(doc)
    return objs + generated_secrets(kust)


def generated_secrets(kust: dict[str, Any]) -> list[dict[str, Any]]:
    """The Secrets the kustomization's secretGenerator makes from env files the operator
    writes (deploy/k8s/secrets/, git-ignored): the keys from each file's committed
    ``.example``, a test value for each."""
    out = []
    for gen in kust.get("secretGenerator", []):
        data = {}
        for env_file in gen["envs"]:
            example = (K8S / f"{env_file}.example").read_text(encoding="utf-8")
            for line in example.splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    assert value == "", f"{env_file}.example holds a value for {key}"
                    data[key] = base64.b64encode(b"test-secret").decode()
        out.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": data,
                    "metadata": {"name": gen["name"], "namespace": kust["namespace"],
                                 "labels": gen["options"]["labels"]}})
    return out


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] not in ("Deployment", "StatefulSet"):
        return []
    return list(obj["spec"]["template"]["spec"]["containers"])


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply the RFC 6902 ops the overlay uses (add, replace), with ~1 / ~0 escapes."""
    out = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].lstrip("/").split("/")]
        node: Any = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "add" and last == "-":
            node.append(copy.deepcopy(op["value"]))
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace":
                assert last in node, f"replace of a missing path {op['path']}"
            node[last] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"op {op['op']} not handled by this test")
    return out


def gpu_objects() -> list[dict[str, Any]]:
    """The base objects with the GPU overlay's patches applied to the targets they name."""
    kust = kustomization(GPU_OVERLAY)
    assert kust["resources"] == ["../.."]
    objs = base_objects()
    for patch in kust["patches"]:
        ops = yaml.safe_load((GPU_OVERLAY / patch["path"]).read_text(encoding="utf-8"))
        target = patch["target"]
        hits = [i for i, o in enumerate(objs) if o["kind"] == target["kind"]
                and re.fullmatch(target["name"], o["metadata"]["name"])]
        assert hits, f"patch {patch['path']} matches nothing"
        for i in hits:
            objs[i] = json_patch(objs[i], ops)
    return objs


# --- Kubernetes schemas -----------------------------------------------------------------------
def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization(K8S)["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"not in kustomization.yaml: {on_disk - listed}; " \
                              f"missing files: {listed - on_disk}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_manifests_validate_against_kubernetes_schemas(version: str, overlay: str) -> None:
    objs = base_objects() if overlay == "base" else gpu_objects()
    checked = 0
    for obj in objs:
        if obj["kind"] in KEDA_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}): {exc.message} "
                        f"at {'.'.join(str(p) for p in exc.path)}")
        checked += 1
    assert checked >= 12  # namespace, secret, 2 services, statefulset, 6 deployments, ...


# --- KEDA -------------------------------------------------------------------------------------
def test_keda_objects_match_the_crds() -> None:
    objs = base_objects()
    keda = [o for o in objs if o["kind"] in KEDA_KINDS]
    assert {o["kind"] for o in keda} == set(KEDA_KINDS)
    auths = by_kind(objs, "TriggerAuthentication")
    secrets = by_kind(objs, "Secret")
    for obj in keda:
        jsonschema.validate(obj, KEDA_OBJECT)
        spec_schema = SCALEDOBJECT_SPEC if obj["kind"] == "ScaledObject" else TRIGGERAUTH_SPEC
        jsonschema.validate(obj["spec"], spec_schema)
    for auth in auths.values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["parameter"] in REDIS_STREAMS_AUTH_PARAMS
            assert ref["key"] in secrets[ref["name"]]["data"]
    for so in by_kind(objs, "ScaledObject").values():
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        for trig in so["spec"]["triggers"]:
            assert trig["type"] == "redis-streams"
            meta = trig["metadata"]
            assert set(meta) <= REDIS_STREAMS_KEYS, set(meta) - REDIS_STREAMS_KEYS
            assert "stream" in meta and ("address" in meta or "host" in meta)
            assert trig["authenticationRef"]["name"] in auths
            for key in ("lagCount", "pendingEntriesCount"):
                if key in meta:
                    assert int(meta[key]) > 0


def test_scaledobjects_follow_each_stage_group_from_keys() -> None:
    objs = base_objects()
    settings = by_kind(objs, "ConfigMap")["spotline-settings"]["data"]
    keys = Keys(settings["SPOTLINE_NAMESPACE"])
    deployments = by_kind(objs, "Deployment")
    redis_svc = by_kind(objs, "Service")["redis"]
    ns = kustomization(K8S)["namespace"]
    scaled = by_kind(objs, "ScaledObject")
    assert set(scaled) == set(STAGES)
    for stage, so in scaled.items():
        target = so["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", stage)
        assert stage in deployments
        metrics = set()
        for trig in so["spec"]["triggers"]:
            meta = trig["metadata"]
            assert meta["stream"] == keys.inbox(stage)
            assert meta["consumerGroup"] == keys.group(stage)
            port = redis_svc["spec"]["ports"][0]["port"]
            assert meta["address"] == f"redis.{ns}.svc.cluster.local:{port}"
            metrics.add("lag" if "lagCount" in meta else "pending")
        assert metrics == {"lag", "pending"}, f"{stage}: wants a lag and a pending trigger"
        pending = next(t["metadata"]["pendingEntriesCount"] for t in so["spec"]["triggers"]
                       if "pendingEntriesCount" in t["metadata"])
        assert int(pending) == load_settings(env={}).batch_for(stage)  # one batch per replica


# --- the workloads ----------------------------------------------------------------------------
def env_of(container: dict[str, Any]) -> list[dict[str, Any]]:
    return list(container.get("env", []))


def test_every_stage_and_the_gateway_run_the_cli_with_probes_and_scrape_annotations() -> None:
    objs = base_objects()
    deployments = by_kind(objs, "Deployment")
    assert set(deployments) == {*STAGES, "track", "gateway", "sources", "sink-webhook"}
    assert deployments["track"]["spec"]["replicas"] == 0  # track mode only (track.yaml)
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        args = c["args"]
        if name in ("sources", "sink-webhook"):  # no HTTP API: /metrics is their liveness
            assert args[:2] == (["sources", "run"] if name == "sources" else
                                ["sink", "webhook"])
            assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        else:
            assert args[:2] == (["worker", name] if name in (*STAGES, "track") else
                                ["serve", "--port"])
            assert "livenessProbe" in c and "readinessProbe" in c
        metrics_port = int(args[args.index("--metrics-port") + 1])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == metrics_port == METRICS_PORT
        ann = pod["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert int(ann["prometheus.io/port"]) == metrics_port
        assert ann["prometheus.io/path"] == "/metrics"
        # SPOTLINE_REDIS_URL expands $(REDIS_PASSWORD): Kubernetes expands only variables
        # defined earlier in the list.
        names = [e["name"] for e in env_of(c)]
        assert names.index("REDIS_PASSWORD") < names.index("SPOTLINE_REDIS_URL")
        url = next(e["value"] for e in env_of(c) if e["name"] == "SPOTLINE_REDIS_URL")
        assert url.startswith("redis://:$(REDIS_PASSWORD)@redis:6379/")
        assert c["envFrom"][0]["configMapRef"]["name"] == "spotline-settings"
    gw_pod = deployments["gateway"]["spec"]["template"]["spec"]
    gw = gw_pod["containers"][0]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/health"
    # API keys from a Secret the operator creates (not in the manifests: never open by mistake)
    keys_file = next(e["value"] for e in env_of(gw) if e["name"] == "SPOTLINE_API_KEYS_FILE")
    assert load_settings(env={"SPOTLINE_API_KEYS_FILE": keys_file}).api_keys_file == keys_file
    (mount,) = [m for m in gw["volumeMounts"] if keys_file.startswith(m["mountPath"] + "/")]
    (vol,) = [v for v in gw_pod["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == "spotline-api-keys"
    assert "spotline-api-keys" not in by_kind(objs, "Secret")


def test_settings_configmap_is_valid_settings() -> None:
    data = by_kind(base_objects(), "ConfigMap")["spotline-settings"]["data"]
    settings = load_settings(env=data)
    assert settings.namespace == data["SPOTLINE_NAMESPACE"]


def test_redis_keeps_an_aof_on_a_claim_and_its_password_in_a_secret() -> None:
    objs = base_objects()
    sts = by_kind(objs, "StatefulSet")["redis"]
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["sh", "-c"]
    (script,) = c["args"]
    # the password: from the environment into a 0600 file in memory, never on argv
    assert "umask 077" in script and '"$REDIS_PASSWORD" > /run/redis/auth.conf' in script
    argv = script.split("exec ", 1)[1].split()
    assert argv[:2] == ["redis-server", "/run/redis/auth.conf"]
    assert "--requirepass" not in argv and "$(REDIS_PASSWORD)" not in script
    assert argv[argv.index("--appendonly") + 1] == "yes"
    data_dir = argv[argv.index("--dir") + 1]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == data_dir
    (run,) = [v for v in pod["volumes"] if mounts.get(v["name"]) == "/run/redis"]
    assert run["emptyDir"]["medium"] == "Memory"
    assert re.fullmatch(r"redis:7\.\d+\.\d+", c["image"])  # a release, not a moving tag
    secret = by_kind(objs, "Secret")["spotline-redis"]
    for e in env_of(c):
        if e["name"] in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "spotline-redis" and ref["key"] in secret["data"]
    for dep in by_kind(objs, "Deployment").values():
        (wc,) = dep["spec"]["template"]["spec"]["containers"]
        ref = next(e for e in env_of(wc) if e["name"] == "REDIS_PASSWORD")["valueFrom"]
        assert ref["secretKeyRef"] == {"name": "spotline-redis", "key": "password"}


def test_no_password_is_committed() -> None:
    """No Secret object and no --requirepass in any manifest: the Redis password comes only
    from the git-ignored deploy/k8s/secrets/redis.env."""
    for path in K8S.rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        assert "--requirepass" not in text and "change-me" not in text, path
        assert all(d["kind"] != "Secret" for d in docs_of(path) if "kind" in d), path
    gen = kustomization(K8S)["secretGenerator"]
    assert [(g["name"], g["envs"]) for g in gen] == [("spotline-redis", ["secrets/redis.env"])]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q",
                              str(K8S / "secrets" / "redis.env")], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, "deploy/k8s/secrets/redis.env must be git-ignored"


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (its kustomize builds)")
def test_kustomize_build_needs_the_secret_file_and_then_validates(tmp_path: Path) -> None:
    """`kubectl kustomize` (kustomize itself) refuses the base without the password file,
    naming it; with the file, every object it builds validates and carries the password only
    in the Secret."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("redis.env"))
    missing = subprocess.run([str(KUBECTL), "kustomize", str(tree)], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "secrets/redis.env" in missing.stderr, missing.stderr
    password = "0123abcd" * 8
    (tree / "secrets" / "redis.env").write_text(f"password={password}\n")
    built = subprocess.run([str(KUBECTL), "kustomize", str(tree)], capture_output=True,
                           text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    objs = [d for d in yaml.safe_load_all(built.stdout) if d]
    (secret,) = [o for o in objs if o["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "spotline-redis"  # no hash suffix: KEDA refers to it
    assert base64.b64decode(secret["data"]["password"]).decode() == password
    assert built.stdout.count(password) == 0  # base64 only, in the Secret
    for obj in objs:
        if obj["kind"] not in KEDA_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    assert {o["kind"] for o in objs} >= {"NetworkPolicy", "StatefulSet", "Deployment"}


def pod_specs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs
            if o["kind"] in ("Deployment", "StatefulSet")}


def test_pods_are_hardened() -> None:
    """Non-root, RuntimeDefault seccomp, no privilege escalation, no capabilities, a read-only
    root filesystem: the writable paths are volumes (spotline's data dir and /tmp, Redis's
    data and the auth config)."""
    for name, pod in pod_specs(gpu_objects()).items():
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if name == "redis":
                assert {"/data", "/run/redis"} <= set(mounts)
                continue
            for path in ("/var/lib/spotline", "/tmp"):  # data_dir (Dockerfile), caches, temp
                assert "emptyDir" in volumes[mounts[path]], f"{name}: {path}"
            assert not any(m.get("readOnly") is False for m in c.get("volumeMounts", []))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions In) selects these labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", "only In is used here"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_network_policies_deny_by_default_and_allow_only_the_pipeline() -> None:
    objs = base_objects()
    policies = by_kind(objs, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in objs
            if o["kind"] in ("Deployment", "StatefulSet")}

    def ingress_ports(pod: str) -> dict[int, list[dict[str, Any]]]:
        """The ports a pod accepts, and from whom ([] = anyone)."""
        out: dict[int, list[dict[str, Any]]] = {}
        for p in policies.values():
            if selects(p["spec"]["podSelector"], pods[pod]):
                for rule in p["spec"].get("ingress", []):
                    for port in rule["ports"]:
                        out.setdefault(port["port"], []).extend(rule.get("from", []))
        return out

    assert ingress_ports("gateway") == {5004: [], METRICS_PORT: [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}
    redis_from = ingress_ports("redis")
    assert set(redis_from) == {6379}
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "spotline"}}} in (
        redis_from[6379])
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in (
        redis_from[6379])  # KEDA reads the consumer groups' lag
    monitoring = [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    for name in (*STAGES, "track", "sources", "sink-webhook"):
        assert ingress_ports(name) == {METRICS_PORT: monitoring}, name
    # every spotline pod may reach Redis; only the feed supervisor reaches beyond the cluster,
    # never link-local (the metadata service)
    to_redis = policies["spotline-to-redis"]["spec"]
    for name, labels in pods.items():
        assert selects(to_redis["podSelector"], labels) == (name != "redis"), name
    feeds = policies["sources-to-feeds"]["spec"]
    assert [n for n, labels in pods.items() if selects(feeds["podSelector"], labels)] == [
        "sources"]
    blocks = [t["ipBlock"] for rule in feeds["egress"] for t in rule["to"]]
    assert {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]} in blocks
    for p in policies.values():
        for rule in p["spec"].get("egress", []):
            for target in rule["to"]:
                if "ipBlock" in target:
                    assert p["metadata"]["name"] in ("sources-to-feeds", "sinks-to-receivers")
    receivers = policies["sinks-to-receivers"]["spec"]
    assert [n for n, labels in pods.items() if selects(receivers["podSelector"], labels)] == [
        "sink-webhook"]
    assert {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]} in [
        t["ipBlock"] for rule in receivers["egress"] for t in rule["to"]]
    # the ports in the policies are the ones the containers listen on
    gw = by_kind(objs, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in gw["ports"]} == {5004, METRICS_PORT}


def test_metrics_and_gateway_listen_on_the_pod_network_explicitly() -> None:
    """Outside a container /metrics binds loopback (the default); here Prometheus scrapes over
    the pod network, so the ConfigMap says 0.0.0.0, and the gateway (keys required) too."""
    objs = base_objects()
    data = by_kind(objs, "ConfigMap")["spotline-settings"]["data"]
    assert load_settings(env={}).metrics_host == "127.0.0.1"
    assert load_settings(env=data).metrics_host == "0.0.0.0"
    (gw,) = by_kind(objs, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in env_of(gw)}
    assert env["SPOTLINE_HTTP_HOST"] == "0.0.0.0" and env["SPOTLINE_API_KEYS_FILE"]


def test_gpu_overlay_requests_a_gpu_for_the_model_stages_only() -> None:
    deployments = by_kind(gpu_objects(), "Deployment")
    for name, dep in deployments.items():
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if name in GPU_STAGES:
            assert gpus == 1 and c["image"].endswith(":cuda")
            assert {"name": "SPOTLINE_DEVICE", "value": "cuda"} in env_of(c)
        else:  # collect, the gateway and the sources: the core image (no model framework)
            assert gpus is None and c["image"].endswith(":core")
    base = by_kind(base_objects(), "Deployment")
    assert all("nvidia.com/gpu" not in str(d) for d in base.values())


def test_grafana_dashboard_configmap_is_the_dashboard_file() -> None:
    path = K8S / "grafana-dashboard.yaml"
    assert path.read_text(encoding="utf-8") == render(), \
        "stale: run python tools/gen_k8s_dashboard.py"
    cm = docs_of(path)[0]
    assert cm["data"]["spotline.json"] == DASHBOARD.read_text(encoding="utf-8")


def test_worker_readiness_probe_reads_model_loaded_from_real_metrics() -> None:
    """The exec probe of the stages, run against a real metrics server: not ready before the
    model is loaded, ready after."""
    dep = by_kind(base_objects(), "Deployment")["score"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    cmd = c["readinessProbe"]["exec"]["command"]
    assert cmd == c["startupProbe"]["exec"]["command"] and cmd[:2] == ["python", "-c"]
    metrics = Metrics()
    port = metrics.serve(free_port(), addr="127.0.0.1")
    code = cmd[2].replace(f":{METRICS_PORT}/", f":{port}/")
    assert code != cmd[2]

    def probe() -> int:
        return subprocess.run([sys.executable, "-c", code], timeout=30).returncode

    assert probe() == 1
    metrics.model_loaded.labels("score", "siglip", "cpu").set(1)
    assert probe() == 0


# --- monitoring (the Prometheus Operator's PodMonitor and PrometheusRule) -----------------------
MONITORING = K8S / "overlays" / "monitoring"
# monitoring.coreos.com/v1 PodMonitor, the fields used here (prometheus-operator's CRD).
PODMONITOR_SPEC = {
    "type": "object", "required": ["selector", "podMetricsEndpoints"],
    "properties": {
        "selector": {"type": "object", "additionalProperties": False, "properties": {
            "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "properties": {
                "port": {"type": "string"}, "path": {"type": "string"},
                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                "relabelings": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "sourceLabels": {"type": "array", "items": {"type": "string"}},
                        "targetLabel": {"type": "string"}}}}}}}}}


def test_the_monitoring_overlay_scrapes_every_pod_that_serves_metrics() -> None:
    kust = kustomization(MONITORING)
    assert kust["resources"] == ["../..", "podmonitor.yaml", "alerts.yaml"]
    assert kust["namespace"] == kustomization(K8S)["namespace"]
    (pm,) = docs_of(MONITORING / "podmonitor.yaml")
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    jsonschema.validate(pm["spec"], PODMONITOR_SPEC)
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    objs = base_objects()
    for name, dep in by_kind(objs, "Deployment").items():
        pod = dep["spec"]["template"]
        assert selects(pm["spec"]["selector"], pod["metadata"]["labels"]), name
        (c,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports[endpoint["port"]] == METRICS_PORT, name
        assert endpoint["path"] == pod["metadata"]["annotations"]["prometheus.io/path"]
    (rule,) = docs_of(MONITORING / "alerts.yaml")
    assert rule["kind"] == "PrometheusRule"  # its rules: tests/test_alerts.py


# --- the new services' commands, run for real outside Kubernetes ---------------------------------
@pytest.mark.parametrize("name,marker", [("track", "spotline_model_loaded{"),
                                         ("sources", "spotline_build_info{"),
                                         ("sink-webhook", "spotline_sink_lag{")])
def test_service_command_runs_outside_kubernetes(name: str, marker: str, redis_server: Any,
                                                 data_dir: Path, tmp_path: Path) -> None:
    """The Deployment's args, as its container runs them (here against a real Redis, tiny
    models standing in for /models): /metrics on the port the PodMonitor scrapes, showing
    ``marker``, then exit 0 on SIGTERM as Kubernetes sends it."""
    import os
    import uuid

    from tests.test_deploy import await_metrics, stop_cleanly

    objs = base_objects()
    (c,) = by_kind(objs, "Deployment")[name]["spec"]["template"]["spec"]["containers"]
    settings_env = by_kind(objs, "ConfigMap")["spotline-settings"]["data"]
    port = str(free_port())
    secrets = tmp_path / "webhook-secrets"
    secrets.write_text("whsec_" + base64.b64encode(b"k" * 32).decode() + "\n")
    local = {"9100": port, "$(WEBHOOK_URL)": "http://127.0.0.1:9/hook",
             "/etc/spotline/webhook/secrets": str(secrets)}
    args = [local.get(a, a) for a in c["args"]]
    assert port in args
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTLINE_")}
    env.update({k: v for k, v in settings_env.items() if not k.endswith(("_WEIGHTS", "_DIR"))})
    env.update(SPOTLINE_REDIS_URL=redis_server.url, SPOTLINE_DATA_DIR=str(data_dir),
               SPOTLINE_NAMESPACE=f"k8s{uuid.uuid4().hex[:8]}", SPOTLINE_METRICS_HOST="127.0.0.1",
               SPOTLINE_IMGSZ="320", SPOTLINE_WARMUP="0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if name == "track":
        env["SPOTLINE_TRACKING"] = "true"  # what track.yaml asks the ConfigMap to say
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "spotline", *args], env=env,
                                cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
    try:
        body = await_metrics(proc, f"http://127.0.0.1:{port}/metrics", marker, log)
        assert "spotline_build_info{" in body and "process_resident_memory_bytes" in body
        stop_cleanly(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

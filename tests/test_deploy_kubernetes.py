"""deploy/kubernetes: every manifest validates offline, and the manifests fit the project and each other.

Three layers, all offline:

1. Kubernetes' own schemas (the ``kubernetes-validate`` package ships them per release, strict variant:
   unknown fields are errors): core objects whole, and every pod template and object metadata inside the
   KubeRay objects (RayCluster head and worker groups, a RayJob's cluster, a RayService's cluster).
2. The KubeRay CRD schemas (``openAPIV3Schema`` of ray.io/v1 RayCluster, RayJob, RayService) of the KubeRay
   release named by ``KUBERAY``, made strict as ``kubectl apply --validate=strict`` is (a field the schema does
   not know is an error). They are not stored in this repository: the test reads them from the directory
   ``$RAYBACKFILL_KUBERAY_CRDS``, else ``../shared/kuberay-crds/<KUBERAY>/`` beside the checkout, and is skipped
   (saying so) when neither holds them. docs/operations.md says how to get them.
3. What KubeRay's controller refuses at admission (from its validation.go at that release) and what this
   project needs: the image, Ray version, entry points that parse with the real CLI, the index pinned to a
   fixed group, /dev/shm sized from each pod's memory, the Serve application's import path and args.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import ray
import referencing
import yaml
from kubernetes_validate import validate as validate_core

import raybackfill
from raybackfill.cli.main import build_parser
from raybackfill.index.router import DEFAULT_NAME

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.33"
# KubeRay v1.7.0 (tag commit 59d663aeec13760646da3db9c1cf8cfe883e30b7): the newest KubeRay release when Ray 2.60
# shipped. Its CRDs take any rayVersion; its controller requires Ray >= 2.52 for token auth (on by default since
# Ray 2.52) and >= 2.56 for worker-group priority, both met by 2.60.
KUBERAY = "v1.7.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
IMAGE = f"registry.example.com/raybackfill:{raybackfill.__version__}"
# jobs/<name>.py takes the arguments of this raybackfill command
JOB_COMMANDS = {
    "prepare_data": ["data"],
    "train": ["train"],
    "embed": ["embed"],
    "serve": ["serve"],
    "backfill": ["backfill"],
    "evaluate": ["eval", "run"],
}
ENTRYPOINT = re.compile(r"^python /home/ray/raybackfill/jobs/(\w+)\.py (.*)$")


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBE.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.relative_to(REPO).as_posix(), doc))
    return docs


DOCS = _documents()
IDS = [f"{path}:{doc['kind']}" for path, doc in DOCS]


def _of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs a KubeRay object carries (a RayJob with a clusterSelector carries none)."""
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec]
    key = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(doc["kind"])
    return [spec[key]] if key in spec else []


def _groups(cluster: dict) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"]), *[(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]]


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    return [(name, group["template"]) for cluster in _cluster_specs(doc) for name, group in _groups(cluster)]


def test_there_is_a_manifest_of_each_kind_and_a_rayjob_per_pipeline_stage():
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"RayCluster", "RayJob", "RayService", "ServiceAccount"} <= kinds
    stages = set()
    for job in _of_kind("RayJob"):
        match = ENTRYPOINT.match(job["spec"]["entrypoint"])
        assert match, job["spec"]["entrypoint"]
        stages.add(match.group(1))
    assert stages == {p.stem for p in (REPO / "jobs").glob("*.py")} == set(JOB_COMMANDS)


# ----------------------------------------------------------------------------- Kubernetes core schemas
@functools.cache
def _core_schemas() -> tuple[Path, referencing.Registry]:
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    directory = Path(str(root))
    definitions = json.loads((directory / "_definitions.json").read_text())
    registry: referencing.Registry = referencing.Registry().with_resource(
        definitions["$id"], referencing.Resource.from_contents(definitions)
    )
    return directory, registry


@functools.cache
def _core_validator(definition: str) -> jsonschema.Validator:
    directory, registry = _core_schemas()
    definitions = json.loads((directory / "_definitions.json").read_text())
    schema = {"$schema": definitions["$schema"], "$ref": f"{definitions['$id']}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _errors(validator: jsonschema.Validator, instance: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


@pytest.mark.parametrize(("path", "doc"), DOCS, ids=IDS)
def test_core_objects_pod_templates_and_metadata_validate_against_kubernetes_schemas(path, doc):
    if doc["apiVersion"].startswith("ray.io/"):
        pods = _core_validator("io.k8s.api.core.v1.PodTemplateSpec")
        meta = _core_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
        templates = _pod_templates(doc)
        assert templates or "clusterSelector" in doc["spec"]
        for name, template in templates:
            assert _errors(pods, template) == [], f"{path}: pod template of group {name}"
        assert _errors(meta, doc["metadata"]) == []
    else:
        validate_core(doc, K8S_VERSION, strict=True)


def test_the_core_validation_used_above_rejects_a_broken_pod_template():
    _, doc = next((p, d) for p, d in DOCS if d["kind"] == "RayCluster")
    template = copy.deepcopy(doc["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["resorces"] = {}  # a typo: strict schemas refuse unknown fields
    template["spec"]["volumes"][0]["emptyDir"]["medium"] = 3
    errors = _errors(_core_validator("io.k8s.api.core.v1.PodTemplateSpec"), template)
    assert any("resorces" in e for e in errors) and any("medium" in e for e in errors)


# ----------------------------------------------------------------------------- KubeRay CRD schemas
def _crd_directory() -> Path | None:
    candidates = [os.environ.get("RAYBACKFILL_KUBERAY_CRDS"), REPO.parent / "shared" / "kuberay-crds" / KUBERAY]
    for candidate in candidates:
        if candidate and all((Path(candidate) / name).is_file() for name in CRD_FILES.values()):
            return Path(candidate)
    return None


def _strict(schema: dict) -> dict:
    """Refuse unknown fields wherever the CRD lists an object's fields (what the API server's strict field
    validation does; a plain JSON Schema check would let a misspelt field through)."""
    schema = dict(schema)
    known = "properties" in schema and "additionalProperties" not in schema
    if known and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            schema[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            schema[key] = _strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            schema[key] = [_strict(sub) for sub in value]
    return schema


def _crd_validator(kind: str) -> jsonschema.Validator:
    directory = _crd_directory()
    if directory is None:
        pytest.skip(
            f"KubeRay {KUBERAY} CRDs not found (set RAYBACKFILL_KUBERAY_CRDS to a directory holding "
            f"{', '.join(CRD_FILES.values())}; see docs/operations.md)"
        )
    return _load_crd_validator(directory, kind)


@functools.cache
def _load_crd_validator(directory: Path, kind: str) -> jsonschema.Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # a CRD is a megabyte of YAML
    crd = yaml.load((directory / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


@pytest.mark.parametrize(
    ("path", "doc"), [(p, d) for p, d in DOCS if d["kind"] in CRD_FILES], ids=[i for i in IDS if "Ray" in i]
)
def test_kuberay_objects_validate_against_the_kuberay_crds(path, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert _errors(_crd_validator(doc["kind"]), doc) == [], path


def test_the_crd_validation_used_above_rejects_unknown_and_mistyped_fields():
    validator = _crd_validator("RayCluster")
    doc = copy.deepcopy(_of_kind("RayCluster")[0])
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # misspelt
    doc["spec"]["autoscalerOptions"]["version"] = "v3"  # not in the enum
    errors = _errors(validator, doc)
    assert any("maxReplica" in e for e in errors) and any("v3" in e for e in errors)


# ----------------------------------------------------------------------------- KubeRay's admission rules
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
GENERATED_SUFFIX = 5  # what the API server appends to a generateName


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3])


@pytest.mark.parametrize(
    ("path", "doc"), [(p, d) for p, d in DOCS if d["kind"] in CRD_FILES], ids=[i for i in IDS if "Ray" in i]
)
def test_kuberay_objects_pass_the_controllers_admission_rules(path, doc):
    meta = doc["metadata"]
    name = meta.get("name") or meta["generateName"] + "x" * GENERATED_SUFFIX
    assert DNS_1035.match(name) and len(name) <= MAX_NAME[doc["kind"]], name
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec)  # exactly one
        if "clusterSelector" in spec:
            assert spec["clusterSelector"].get("ray.io/cluster")
            assert spec.get("backoffLimit", 0) == 0 and not spec.get("shutdownAfterJobFinishes")
        else:
            assert spec["shutdownAfterJobFinishes"] and spec.get("ttlSecondsAfterFinished", 0) >= 0
    if doc["kind"] == "RayService":
        assert spec["upgradeStrategy"]["type"] in ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")
    for cluster in _cluster_specs(doc):
        if cluster.get("authOptions", {}).get("mode") == "token":
            assert _version(cluster["rayVersion"]) >= (2, 52)
        names = [name for name, _ in _groups(cluster)]
        assert len(names) == len(set(names))
        for name, group in _groups(cluster):
            assert group["template"]["spec"]["containers"], name
            start = group.get("rayStartParams", {})
            if group.get("resources"):  # not both ways of declaring a group's resources
                assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(start), name
            if name != "head":
                assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]


# ----------------------------------------------------------------------------- what the project needs
def _containers(doc: dict) -> list[tuple[str, dict, dict]]:
    return [(name, c, template) for name, template in _pod_templates(doc) for c in template["spec"]["containers"]]


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(quantity: str) -> float:
    match = QUANTITY.match(str(quantity))
    assert match, quantity
    return float(match.group(1)) * UNITS[match.group(2)]


@pytest.mark.parametrize(
    ("path", "doc"), [(p, d) for p, d in DOCS if d["kind"] in CRD_FILES], ids=[i for i in IDS if "Ray" in i]
)
def test_every_ray_pod_runs_this_image_and_ray_version_with_shm_sized_from_its_memory(path, doc):
    for cluster in _cluster_specs(doc):
        assert cluster["rayVersion"] == ray.__version__
        assert cluster["authOptions"]["mode"] == "token"  # Ray's token auth stays on in a cluster
    for group, container, template in _containers(doc):
        assert container["image"] == IMAGE, f"{path} {group}"
        assert container["resources"]["requests"] == container["resources"]["limits"]  # a guaranteed pod
        assert {"containerPort": 8080, "name": "metrics"} in container["ports"]  # Prometheus scrapes here
        assert template["spec"]["serviceAccountName"] == "raybackfill"
        # The object store takes 30% of the memory limit by default and lives in /dev/shm (64 MB unless mounted).
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["emptyDir"]["medium"] == "Memory"
        ratio = _bytes(volume["emptyDir"]["sizeLimit"]) / _bytes(container["resources"]["limits"]["memory"])
        assert 0.3 <= ratio <= 0.4, f"{path} {group}: /dev/shm is {ratio:.0%} of the memory limit"
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        if gpus:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in template["spec"].get(
                "tolerations", []
            )


@pytest.mark.parametrize("job", _of_kind("RayJob"), ids=lambda j: j["metadata"]["generateName"])
def test_every_job_entrypoint_parses_with_the_real_command_line(job):
    match = ENTRYPOINT.match(job["spec"]["entrypoint"])
    assert match
    argv = JOB_COMMANDS[match.group(1)] + shlex.split(match.group(2))
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"`{job['spec']['entrypoint']}` does not parse (exit {exit_.code})")


def test_the_index_stages_run_on_the_long_lived_cluster_pinned_to_its_fixed_index_group():
    (cluster,) = _of_kind("RayCluster")
    groups = dict(_groups(cluster["spec"]))
    pinned = {name for name, group in groups.items() if "index_node" in group.get("resources", {})}
    assert pinned == {"index"}
    index = groups["index"]
    assert index["minReplicas"] == index["replicas"] == index["maxReplicas"] > 0  # never scaled down
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0 and cluster["spec"]["enableInTreeAutoscaling"]
    by_stage = {job["metadata"]["labels"]["raybackfill/stage"]: job for job in _of_kind("RayJob")}
    for stage in ("serve", "backfill"):
        assert by_stage[stage]["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    serve = build_parser().parse_args(
        ["serve", *shlex.split(ENTRYPOINT.match(by_stage["serve"]["spec"]["entrypoint"])[2])]
    )
    assert serve.node_resource == "index_node"
    for stage in ("prepare-data", "train", "embed", "evaluate"):
        assert "rayClusterSpec" in by_stage[stage]["spec"]  # batch stages bring their own cluster


def test_the_rayservice_serves_the_http_application_next_to_a_pinned_index():
    (service,) = _of_kind("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "raybackfill.service.app:build_app" and app["route_prefix"] == "/"
    assert app["args"]["index"] == DEFAULT_NAME
    assert service["spec"]["upgradeStrategy"] == {"type": "None"}  # the index lives in this cluster's actors
    groups = dict(_groups(service["spec"]["rayClusterConfig"]))
    assert groups["index"]["minReplicas"] == groups["index"]["maxReplicas"]
    assert groups["index"]["resources"] == {"index_node": "1"}
    # The API key reaches every replica's environment from a Secret, never through the args in clear.
    key_env = app["args"]["api_key_env"]
    for group, container, _ in _containers(service):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env[key_env]["valueFrom"]["secretKeyRef"]["name"] == "raybackfill-api-key", group


def test_the_rayservice_args_are_the_services_own_config_keys():
    service_config = pytest.importorskip("raybackfill.service.config", reason="the HTTP service is not merged yet")
    (service,) = _of_kind("RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    config = service_config.ServiceConfig.from_args(app["args"])  # an unknown key raises
    assert config.index == DEFAULT_NAME

"""Offline schema check of every manifest under infra/ (no cluster, no network).

    python infra/validate.py                 # every YAML under infra/k8s, infra/ray and the nightly RayJob
    python infra/validate.py FILE.yaml ...   # just these

What is checked how:

- Kubernetes built-in kinds (Namespace, Deployment, Service, PVC, CronJob, RBAC, ConfigMap, ...): JSON Schema
  validation against the *strict* Kubernetes OpenAPI schemas shipped by the ``kubernetes-validate`` package
  (unknown fields are errors), for Kubernetes ``K8S_VERSION``.
- KubeRay ``ray.io/v1`` RayCluster / RayJob: JSON Schema validation against ``infra/schemas/kuberay-ray.io-v1.json``
  (a trimmed schema derived from KubeRay's CRDs; see its ``$comment``) whose nested pod templates, resources
  and services ``$ref`` the same strict Kubernetes schemas.
- Ray cluster-launcher YAML (``infra/ray/*.yaml``): Ray's own ``ray/autoscaler/ray-schema.json``, the schema
  ``ray up`` validates against.
- kustomization.yaml: every listed resource and generator file exists and is itself validated.

Exit status 1 with one line per problem if anything fails.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource

INFRA = Path(__file__).resolve().parent
K8S_VERSION = "1.33"
KUBERAY_SCHEMA = INFRA / "schemas" / "kuberay-ray.io-v1.json"
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"


@cache
def _k8s_dir() -> Path:
    import kubernetes_validate.utils as kv

    versions = [v for v in kv.all_versions() if kv.major_minor(v) <= K8S_VERSION]
    if not versions:
        raise RuntimeError(f"kubernetes-validate ships no schemas for Kubernetes <= {K8S_VERSION}")
    return Path(kv.__file__).parent / "kubernetes-json-schema" / f"v{versions[-1]}-local-strict"


@cache
def _k8s_definitions() -> Resource:
    return Resource.from_contents(json.loads((_k8s_dir() / "_definitions.json").read_text()))


def _k8s_schema_file(api_version: str, kind: str) -> Path:
    group, _, version = api_version.rpartition("/")
    prefix = group.split(".")[0] + "-" if group else ""
    return _k8s_dir() / f"{kind.lower()}-{prefix}{version}.json"


def _errors(validator: jsonschema.protocols.Validator, doc: dict, where: str) -> list[str]:
    out = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"{where}: {path}: {err.message[:300]}")
    return out


def validate_k8s(doc: dict, where: str = "<doc>") -> list[str]:
    """Validate one Kubernetes object (built-in kind or KubeRay CR); returns problems (empty = valid)."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return [f"{where}: not a Kubernetes object (needs apiVersion and kind)"]
    api_version, kind = doc["apiVersion"], doc["kind"]
    registry = Registry().with_resource(K8S_DEFS_ID, _k8s_definitions())
    if api_version.startswith("ray.io/"):
        schema = json.loads(KUBERAY_SCHEMA.read_text())
        if kind not in ("RayCluster", "RayJob"):
            return [f"{where}: {api_version} {kind}: the vendored KubeRay schema covers RayCluster and RayJob only"]
        schema = {k: v for k, v in schema.items() if k != "oneOf"} | {"$ref": f"#/$defs/{kind}"}
    else:
        path = _k8s_schema_file(api_version, kind)
        if not path.is_file():
            return [f"{where}: no Kubernetes {K8S_VERSION} schema for {api_version} {kind} (looked for {path.name})"]
        schema = json.loads(path.read_text())
        schema.setdefault("$id", f"https://kubernetes.io/api/{path.name}")
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return _errors(validator, doc, f"{where} ({kind})")


def validate_ray_launcher(config: dict, where: str = "<doc>") -> list[str]:
    """Validate a Ray cluster-launcher config against Ray's own schema."""
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return _errors(jsonschema.Draft7Validator(schema), config, f"{where} (ray cluster launcher)")


def load_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def validate_kustomization(path: Path) -> list[str]:
    data = yaml.safe_load(path.read_text())
    problems = []
    files = list(data.get("resources", []))
    for gen in data.get("configMapGenerator", []):
        files += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    for name in files:
        target = path.parent / name
        if not target.is_file():
            problems.append(f"{path}: lists {name}, which does not exist")
    return problems


def validate_file(path: Path) -> list[str]:
    """Validate every document of one YAML file under infra/ (kind decided by location and content)."""
    path = Path(path)
    if path.name == "kustomization.yaml":
        return validate_kustomization(path)
    problems = []
    for i, doc in enumerate(load_documents(path)):
        where = f"{path.name}[{i}]"
        if "cluster_name" in doc and "provider" in doc:
            problems += validate_ray_launcher(doc, where)
        else:
            problems += validate_k8s(doc, where)
    return problems


def manifest_files() -> list[Path]:
    return sorted((INFRA / "k8s").glob("*.yaml")) + sorted((INFRA / "ray").glob("*.yaml"))


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or manifest_files()
    problems = []
    for path in paths:
        problems += validate_file(path)
    for line in problems:
        print(line)
    print(f"{len(paths)} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

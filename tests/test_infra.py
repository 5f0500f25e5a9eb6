"""Offline checks of infra/ and jobs/specs/: every manifest validates against the Kubernetes / KubeRay / Ray
cluster-launcher schemas (and broken ones do not), and every job spec's entry point exists and accepts its
arguments."""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from jobs.exit_codes import EXIT_BAD_INPUT

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IMAGE_ROOT = "/opt/gen1"  # the Dockerfile's WORKDIR: where the repository lives in the image

sys.path.insert(0, str(INFRA))
import validate  # noqa: E402  (infra/validate.py)

MANIFESTS = validate.manifest_files()
SPECS = sorted((ROOT / "jobs" / "specs").glob("*.yaml"))


def _docs(name: str) -> list[dict]:
    return validate.load_documents(INFRA / "k8s" / name)


def _by_kind(kind: str) -> list[dict]:
    return [d for p in (INFRA / "k8s").glob("*.yaml") if p.name != "kustomization.yaml"
            for d in validate.load_documents(p) if d.get("kind") == kind]


def _containers(doc: dict) -> list[dict]:
    """Every container of a Deployment, CronJob, RayCluster or RayJob."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    out.extend(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return out


# ------------------------------------------------------------------------------------------ schemas


def test_the_expected_manifests_exist():
    names = {p.relative_to(INFRA).as_posix() for p in MANIFESTS}
    assert {"k8s/raycluster.yaml", "k8s/rayjob-eval.yaml", "k8s/cronjob-nightly-eval.yaml", "k8s/mlflow.yaml",
            "k8s/namespace.yaml", "k8s/kustomization.yaml", "ray/cluster-aws.yaml"} <= names
    kinds = {d["kind"] for p in MANIFESTS if p.name != "kustomization.yaml" for d in validate.load_documents(p)
             if "kind" in d}
    assert {"RayCluster", "RayJob", "CronJob", "Deployment", "Service", "PersistentVolumeClaim", "Namespace",
            "ServiceAccount", "Role", "RoleBinding"} <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_manifest_validates(path):
    assert validate.validate_file(path) == []


def test_validate_cli_passes():
    assert validate.main([]) == 0


@pytest.mark.parametrize(
    "name, index, mutate, expected",
    [
        ("raycluster.yaml", 0, lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
         .__setitem__("imagee", "x"), "'imagee' was unexpected"),
        ("raycluster.yaml", 0, lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),
         "'groupName' is a required property"),
        ("raycluster.yaml", 0, lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "8"),
         "is not of type 'integer'"),
        ("raycluster.yaml", 0, lambda d: d["spec"].__setitem__("headGroupSpecs", {}), "'headGroupSpecs' was unexpected"),
        ("rayjob-eval.yaml", 0, lambda d: d["spec"].__setitem__("submissionMode", "Batch"), "is not one of"),
        ("rayjob-eval.yaml", 0, lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
         ["containers"][0]["resources"]["limits"].__setitem__("cpu", [4]), "limits/cpu"),
        ("cronjob-nightly-eval.yaml", 3, lambda d: d["spec"].__setitem__("schedule", 2), "is not of type 'string'"),
        ("cronjob-nightly-eval.yaml", 3, lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
         .__setitem__("restartPolicy", 1), "restartPolicy"),
        ("mlflow.yaml", 1, lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0]
         .__setitem__("containerPort", "http"), "containerPort"),
        ("mlflow.yaml", 1, lambda d: d["spec"].__setitem__("replica", 1), "'replica' was unexpected"),
    ],
)
def test_broken_manifests_are_rejected(name, index, mutate, expected):
    doc = copy.deepcopy(_docs(name)[index])
    mutate(doc)
    problems = validate.validate_k8s(doc, name)
    assert problems and any(expected in p for p in problems), problems


def test_broken_launcher_config_is_rejected():
    config = validate.load_documents(INFRA / "ray" / "cluster-aws.yaml")[0]
    bad = copy.deepcopy(config)
    bad["docker"]["imagee"] = "x"
    assert any("'imagee' was unexpected" in p for p in validate.validate_ray_launcher(bad))
    bad = copy.deepcopy(config)
    del bad["available_node_types"]["gpu_worker"]["resources"]
    assert any("'resources' is a required property" in p for p in validate.validate_ray_launcher(bad))
    assert validate.validate_k8s({"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {}, "spec": {}})


def test_kustomization_lists_files_that_exist_and_feeds_the_cronjob():
    kust = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    (generator,) = kust["configMapGenerator"]
    cron = _by_kind("CronJob")[0]
    volumes = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["configMap"]["name"] == generator["name"]
    key, _, source = generator["files"][0].partition("=")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert f"--filename=/manifests/{key}" in container["args"]
    nightly = validate.load_documents(INFRA / "k8s" / source)[0]
    assert nightly["kind"] == "RayJob" and "generateName" in nightly["metadata"]  # `kubectl create` every night
    assert validate.validate_kustomization(INFRA / "k8s" / "kustomization.yaml") == []
    broken = INFRA / "k8s" / "kustomization.yaml"
    data = yaml.safe_load(broken.read_text())
    data["resources"].append("missing.yaml")
    tmp = broken.parent / "_test_kustomization.yaml"
    try:
        tmp.write_text(yaml.safe_dump(data))
        assert any("missing.yaml" in p for p in validate.validate_kustomization(tmp))
    finally:
        tmp.unlink()


# --------------------------------------------------------------------------------------- consistency


def test_ray_version_and_images_agree_with_the_project():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(re.search(r"==([\w.]+)", p).group(1) for p in pins if p.startswith("ray["))
    for doc in _by_kind("RayCluster"):
        assert doc["spec"]["rayVersion"] == ray_pin
    for doc in _by_kind("RayJob"):
        assert doc["spec"]["rayClusterSpec"]["rayVersion"] == ray_pin
    kust = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    image = f"{kust['images'][0]['name']}:{kust['images'][0]['newTag']}"
    gen1_images = {c["image"] for kind in ("RayCluster", "RayJob", "Deployment") for d in _by_kind(kind)
                   for c in _containers(d)}
    assert gen1_images == {image}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image == f"gen1:{version}"


def test_rayjob_entrypoint_and_config_exist_in_the_image_layout():
    for doc in _by_kind("RayJob"):
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"]
        assert importlib.util.find_spec(argv[2]) is not None
        config = argv[argv.index("--config") + 1]
        assert config.startswith(IMAGE_ROOT + "/")
        assert (ROOT / config[len(IMAGE_ROOT) + 1 :]).is_file()
        _parse_entrypoint(doc["spec"]["entrypoint"].replace(IMAGE_ROOT + "/", ""))


def test_mlflow_server_arguments_are_options_of_this_mlflow():
    from mlflow.cli import server

    options = {opt for param in server.params for opt in param.opts}
    (deploy,) = _by_kind("Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    for arg in container["args"]:
        assert arg.split("=", 1)[0] in options, arg
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] == container["ports"][0]["name"]
    (service,) = _by_kind("Service")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    for doc in _by_kind("RayCluster"):
        env = {e["name"]: e.get("value") for c in _containers(doc) for e in c.get("env", [])}
        assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}.gen1.svc:{service['spec']['ports'][0]['port']}"


def test_dockerfile_builds_the_package_as_the_manifests_expect():
    text = (INFRA / "Dockerfile").read_text()
    instructions = [ln.split(None, 1) for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
                    and not ln.startswith((" ", "\t"))]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert len(froms) == 1 and ":" in froms[0] and not froms[0].endswith(":latest")
    for op, rest in instructions:
        if op == "COPY":
            *sources, _ = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert any(op == "RUN" and "pip install ." in rest for op, rest in instructions)
    assert ("WORKDIR", IMAGE_ROOT) in [(op, rest.strip()) for op, rest in instructions]
    assert ("USER", "ray") in [(op, rest.strip()) for op, rest in instructions]
    assert "--uid 1000" in text and "wget" in text  # KubeRay's user and its probes' tool


# ----------------------------------------------------------------------------------------- job specs


def _parse_entrypoint(entrypoint: str) -> argparse.Namespace:
    """Parse a ``python -m jobs.entrypoints.X ARGS`` entrypoint's ARGS with `gen1 X`'s own parser."""
    from jobs.cli import add_models_argument

    argv = shlex.split(entrypoint)
    module = argv[2]
    assert module.startswith("jobs.entrypoints."), module
    command = importlib.import_module("jobs.commands." + module.rsplit(".", 1)[1])
    parser = argparse.ArgumentParser(exit_on_error=False)
    command._add_arguments(parser)
    add_models_argument(parser)
    args, unknown = parser.parse_known_args(argv[3:])
    if unknown:
        raise ValueError(f"{module}: unrecognized arguments {unknown}")
    return args


def test_there_are_job_specs_for_every_pipeline():
    modules = {shlex.split(yaml.safe_load(p.read_text())["entrypoint"])[2] for p in SPECS}
    assert {"jobs.entrypoints.eval", "jobs.entrypoints.preprocess", "jobs.entrypoints.edit"} <= modules


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_job_spec_entrypoint_exists_and_accepts_its_arguments(path):
    from jobs.entrypoints.submit import entrypoint_module, load_spec
    from pipelines.evaluate import EvalConfig

    spec = load_spec(path)
    module = entrypoint_module(spec["entrypoint"])
    assert module is not None, f"{path.name}: entrypoint must be `python -m MODULE ...`"
    found = importlib.util.find_spec(module)
    assert found is not None and Path(found.origin).is_file(), f"{path.name}: {module} does not exist"
    assert Path(found.origin).parent == ROOT / "jobs" / "entrypoints"
    assert importlib.util.find_spec("jobs.commands." + module.rsplit(".", 1)[1]) is not None
    args = _parse_entrypoint(spec["entrypoint"])
    if getattr(args, "config", None):
        config = ROOT / args.config
        assert config.is_file(), f"{path.name}: --config {args.config} does not exist"
        if module == "jobs.entrypoints.eval":
            cfg = EvalConfig.from_yaml(config)
            assert cfg.dataset and cfg.dataset.split(":")[0] in ("davis", "tgve")
    runtime_env = spec.get("runtime_env") or {}
    assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "py_modules", "excludes"}
    assert all(isinstance(v, str) for v in (runtime_env.get("env_vars") or {}).values())


def test_bad_job_specs_are_refused(tmp_path):
    from jobs.entrypoints.submit import SpecError, entrypoint_module, load_spec, main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nentrypoint: python -m jobs.entrypoints.eval\nentry_point_cpus: 1\n")
    with pytest.raises(SpecError, match="unknown keys \\['entry_point_cpus'\\]"):
        load_spec(bad)
    bad.write_text("name: x\n")
    with pytest.raises(SpecError, match="'entrypoint' must be a non-empty string"):
        load_spec(bad)
    assert main([str(bad)]) == EXIT_BAD_INPUT
    assert entrypoint_module("python -m jobs.entrypoints.eval --limit 1") == "jobs.entrypoints.eval"
    assert entrypoint_module("bash run.sh") is None
    with pytest.raises(ValueError, match="--no-such-flag"):
        _parse_entrypoint("python -m jobs.entrypoints.eval --no-such-flag")

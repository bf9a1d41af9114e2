"""infra/: the manifests for real clusters parse and name entry points, options and resources
that exist, and agree with the code and with each other.

No cluster starts. Every job command (the RayJobs' entrypoints and the commands of
infra/README.md) runs through its script's own parser in a subprocess: ``--print_config``
for the stages (which resolves and validates the whole stage config), ``--help`` for
preprocessing. The RayService's application is imported and built with its arguments.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "mdm-aws.yaml"
SERVE_CONFIG = INFRA / "serve" / "mdm-serve.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
README = INFRA / "README.md"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


# ---------------------------------------------------------------------------- reading
def load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_all(p) if d.get("kind") == kind]


def only(kind: str) -> dict:
    docs = kuberay(kind)
    assert len(docs) == 1, f"expected one {kind} under infra/kuberay, found {[p.name for p, _ in docs]}"
    return docs[0][1]


def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def ray_containers(spec: dict) -> list[tuple[str, dict]]:
    """(group, container) of the head and every worker group."""
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity: 8, "8", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gpu_groups(spec: dict) -> list[dict]:
    """Worker groups whose pods request GPUs: {max_pods, gpus, cpus} per group."""
    out = []
    for g in spec.get("workerGroupSpecs", []):
        (c,) = g["template"]["spec"]["containers"]
        limits = c["resources"].get("limits", {})
        if "nvidia.com/gpu" in limits:
            out.append(
                {
                    "max_pods": g["maxReplicas"],
                    "gpus": quantity(limits["nvidia.com/gpu"]),
                    "cpus": quantity(limits["cpu"]),
                }
            )
    return out


def python_job(tokens: list[str]) -> tuple[str, tuple[str, ...]]:
    """(script, args) of the ``python jobs/<script> ...`` inside a command line."""
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("python", "python3") and tokens[i + 1].startswith("jobs/"):
            return tokens[i + 1], tuple(tokens[i + 2 :])
    raise AssertionError(f"no `python jobs/<script>` in {shlex.join(tokens)}")


def readme_commands() -> list[tuple[str, tuple[str, ...]]]:
    """Every ``python jobs/...`` command of infra/README.md's code blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if "python jobs/" in line:
                out.append(python_job(shlex.split(line, comments=True)))
    return out


def rayjob_commands() -> dict[Path, tuple[str, tuple[str, ...]]]:
    return {p: python_job(shlex.split(d["spec"]["entrypoint"])) for p, d in kuberay("RayJob")}


def options(args: tuple[str, ...]) -> dict[str, str | None]:
    """``--flag value`` / ``--flag=value`` / ``--switch`` -> {flag: value}."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        assert flag.startswith("--"), f"unexpected argument {args[i]!r} in {args}"
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        out[flag] = value if (eq or value) else None
        i += 1
    return out


def pinned(requirement_prefix: str, requirements: list[str]) -> str:
    """The version a requirement pins with ==: torch==2.13.0 -> 2.13.0; ray[...]==2.60.* -> 2.60.*."""
    (req,) = [r for r in requirements if re.match(rf"{re.escape(requirement_prefix)}(\[|==)", r)]
    return req.split("==", 1)[1]


def image_ray_version(image: str) -> str:
    """rayproject/ray:2.60.0-py311-cu128 -> 2.60.0."""
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-cu\d+", image)
    assert m, f"{image}: expected rayproject/ray:<ray version>-py311-cu<cuda> (Python 3.11 with CUDA)"
    return m.group(1)


def dockerfile_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), flags=re.M)
    return value


# ---------------------------------------------------------------------------- subprocesses
SERVE_CHECK = r"""
import importlib, json, sys
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

built = []
for text in sys.argv[1:]:
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)  # Serve's own schema of a config file
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        target = getattr(importlib.import_module(module), attr)
        if isinstance(target, Application):
            assert not app.get("args"), "args given to an Application that is not a builder"
        else:
            args = dict(app.get("args") or {})
            if str(args.get("model", "")).startswith("models:/"):
                args["model"] = "/a/model/folder"  # the builder pins a registry alias: no registry here
            target = target(args)  # raises on arguments the builder refuses
        assert isinstance(target, Application), f"{app['import_path']} built {type(target).__name__}"
        built.append(app["import_path"])
print(json.dumps(built))
"""


def _key(script: str, args: tuple[str, ...]) -> tuple:
    return ("help", script) if script == "jobs/preprocess.py" else ("print_config", script, args)


def _run(key: tuple) -> subprocess.CompletedProcess:
    if key[0] == "help":
        cmd = [sys.executable, key[1], "--help"]
    elif key[0] == "print_config":
        cmd = [sys.executable, key[1], *key[2], "--print_config"]
    else:
        cmd = [sys.executable, "-c", SERVE_CHECK, *key[1]]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def runs() -> dict[tuple, subprocess.CompletedProcess]:
    """Every job command's parser run, and the Serve check, side by side (each imports torch)."""
    keys = {_key(s, a) for s, a in [*rayjob_commands().values(), *readme_commands()]}
    if (REPO / "serve" / "app.py").exists():
        service = only("RayService")
        keys.add(("serve", (SERVE_CONFIG.read_text(), service["spec"]["serveConfigV2"])))
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(keys, pool.map(_run, keys)))


def stage_config(runs, script: str, args: tuple[str, ...]) -> dict:
    r = runs[_key(script, args)]
    assert r.returncode == 0, f"{script} {shlex.join(args)} --print_config failed:\n{r.stderr[-2000:]}"
    return json.loads(r.stdout)


def check_job_command(runs, script: str, args: tuple[str, ...]) -> dict | None:
    """The script exists and accepts the options; a stage's resolved config (None: preprocess)."""
    assert (REPO / script).is_file(), f"{script} does not exist"
    assert not any("$" in a for a in args), f"{script}: shell variables in the job's options {args}"
    if script != "jobs/preprocess.py":
        return stage_config(runs, script, args)
    r = runs[_key(script, args)]
    assert r.returncode == 0, r.stderr
    accepted = set(re.findall(r"(--[a-z_]+)", r.stdout))
    given = options(args)
    unknown = set(given) - accepted
    assert not unknown, f"{script} has no option {sorted(unknown)} (its --help lists {sorted(accepted)})"
    assert {"--source", "--out"} <= set(given), f"{script} needs --source and --out: {args}"
    return None


def check_chain(runs, commands: list[tuple[str, tuple[str, ...]]]) -> None:
    """Each stage reads shards that a preprocessing command writes with every resolution it
    needs, and (unless innermost) grows the alias another stage of the same chain registers."""
    shards = {}
    for script, args in commands:
        if script == "jobs/preprocess.py":
            opts = options(args)
            shards[opts["--out"]] = {int(r) for r in (opts.get("--resolutions") or "64,128,256").split(",")}
    stages = [stage_config(runs, s, a) for s, a in commands if s != "jobs/preprocess.py"]
    registers = {
        (c["mlflow"]["registered_model"], c["model"]["model"]["resolutions"][-1]): c["model"]["model"]["resolutions"]
        for c in stages
        if c["mlflow"]["register"]
    }
    for c in stages:
        res, name = c["model"]["model"]["resolutions"], c["mlflow"]["registered_model"]
        uri = c["data"]["shards"]
        assert uri in shards, f"stage {res}: no preprocessing command writes {uri} (written: {sorted(shards)})"
        assert set(res) <= shards[uri], f"stage {res} reads {uri}, which holds only {sorted(shards[uri])}"
        if len(res) > 1 and c["init_from"] == "auto":
            parent = registers.get((name, res[-2]))
            assert parent is not None, f"stage {res}: nothing in the chain registers models:/{name}@stage-{res[-2]}"
            assert parent == res[:-1], f"stage {res} would grow a {parent} model"


# ---------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_under_infra_parses(path):
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected one or more mappings"
    for doc in docs:  # YAML embedded as strings (KubeRay fields) must parse too
        spec = doc.get("spec") or {}
        for field in ("serveConfigV2", "runtimeEnvYAML"):
            if field in spec:
                assert isinstance(yaml.safe_load(spec[field]), dict), f"{path}: {field} is not a mapping"


def test_kuberay_manifests_cover_every_step():
    cluster = only("RayCluster")
    only("RayService")
    scripts = sorted(script for script, _ in rayjob_commands().values())
    assert scripts == ["jobs/preprocess.py", "jobs/stage_128.py", "jobs/stage_256.py", "jobs/stage_64.py"]
    for path, job in kuberay("RayJob"):
        selector = job["spec"].get("clusterSelector", {}).get("ray.io/cluster")
        assert selector == cluster["metadata"]["name"], f"{path.name} runs on {selector!r}, not the RayCluster"
        assert "rayClusterSpec" not in job["spec"]


# ---------------------------------------------------------------------------- the jobs
@pytest.mark.parametrize("path", sorted(KUBERAY.glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_entrypoint_names_a_script_and_options_it_accepts(runs, path):
    (job,) = load_all(path)
    script, args = python_job(shlex.split(job["spec"]["entrypoint"]))
    cfg = check_job_command(runs, script, args)
    if cfg is not None:
        assert cfg["run"]["name"], f"{path.name}: give --name so that submitting again resumes the run"
        for field in (cfg["data"]["shards"], cfg["run"]["storage_path"]):
            assert field.startswith("s3://"), f"{path.name}: {field} is not in object storage (pods are ephemeral)"


def test_rayjobs_form_a_chain(runs):
    check_chain(runs, list(rayjob_commands().values()))


def test_stage_jobs_fit_the_gpu_workers_of_their_cluster(runs):
    cluster = only("RayCluster")
    groups = gpu_groups(cluster["spec"])
    assert groups, "the RayCluster has no worker group requesting nvidia.com/gpu"
    for path, (script, args) in rayjob_commands().items():
        if script == "jobs/preprocess.py":
            continue
        s = stage_config(runs, script, args)["scaling"]
        assert s["use_gpu"], f"{path.name}: trains on CPU (set scaling.use_gpu=true)"
        per_pod = [min(g["gpus"], g["cpus"] // s["cpus_per_worker"]) for g in groups]
        capacity = sum(g["max_pods"] * n for g, n in zip(groups, per_pod))
        assert s["num_workers"] <= capacity, (
            f"{path.name}: {s['num_workers']} workers of 1 GPU + {s['cpus_per_worker']} CPUs, "
            f"the GPU groups hold at most {capacity}"
        )


def test_gpu_pods_request_gpus_as_limits():
    for _, doc in [*kuberay("RayCluster"), *kuberay("RayService")]:
        for group, c in ray_containers(ray_cluster_spec(doc)):
            res = c["resources"]
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None:
                assert int(gpus) >= 1
                assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, f"{group}: requests != limits"
            else:
                assert "nvidia.com/gpu" not in res.get("requests", {}), f"{group}: GPU request without a limit"


# ---------------------------------------------------------------------------- environment
SERVE_KEY_SECRET = "mdm-serve"


def test_tracking_uri_and_object_store_credentials_reach_every_ray_container():
    """Every Ray container gets the tracking URI and one object-store Secret: the training
    cluster's, or (the sampler) a read-only one of its own, so a sampler pod cannot rewrite
    the checkpoints training resumes from."""
    config_map = only("ConfigMap")
    assert config_map["data"].get("MLFLOW_TRACKING_URI", "").startswith("http")
    secrets: dict[str, set[str]] = {"RayCluster": set(), "RayService": set()}
    for kind in secrets:
        for path, doc in kuberay(kind):
            for group, c in ray_containers(ray_cluster_spec(doc)):
                where = f"{path.name} {group}"
                sources = c.get("envFrom", [])
                maps = [s["configMapRef"]["name"] for s in sources if "configMapRef" in s]
                assert config_map["metadata"]["name"] in maps, f"{where}: no envFrom of the ConfigMap"
                # the sampler's API key Secret (RayService only) is checked in test_serve.py
                required = [
                    s["secretRef"]["name"]
                    for s in sources
                    if "secretRef" in s
                    and not s["secretRef"].get("optional")
                    and s["secretRef"]["name"] != SERVE_KEY_SECRET
                ]
                assert len(required) == 1, f"{where}: expected one required credentials Secret, got {required}"
                secrets[kind].update(required)
                for env in c.get("env", []):  # never a credential as a literal in a manifest
                    assert not (env["name"].startswith("AWS_") and "value" in env), f"{where}: literal {env['name']}"
    (training,), (serving,) = secrets["RayCluster"], secrets["RayService"]
    assert training != serving, "the sampler must not hold the training cluster's object-store keys"
    readme = README.read_text().replace("\\\n", " ")
    for secret in (training, serving):
        create = re.search(rf"kubectl create secret generic {secret} [^\n]*", readme)
        assert create, f"infra/README.md does not show how to create the Secret {secret}"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert f"--from-literal={key}=" in create.group(0), secret


# ---------------------------------------------------------------------------- image and versions
def test_one_image_and_one_ray_version_everywhere():
    ray_pin = pinned("ray", PYPROJECT["project"]["optional-dependencies"]["ray"])
    base = image_ray_version(dockerfile_arg("RAY_IMAGE"))
    assert re.fullmatch(ray_pin.replace(".", r"\.").replace("*", r"\d+"), base), f"base Ray {base} vs pin {ray_pin}"
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert image_ray_version(launcher["docker"]["image"]) == base

    images = set()
    for path, doc in [*kuberay("RayCluster"), *kuberay("RayService")]:
        spec = ray_cluster_spec(doc)
        assert spec["rayVersion"] == base, f"{path.name}: rayVersion {spec['rayVersion']}, the image has Ray {base}"
        images.update(c["image"] for _, c in ray_containers(spec))
    (image,) = images
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"], f"{image}: tag is not the project version"

    workdir = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), flags=re.M)[-1]
    for path, job in kuberay("RayJob"):
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] == workdir, f"{path.name}: working_dir is not the image's project folder"


def test_gpu_images_install_the_pinned_torch_from_a_cuda_index():
    torch_pin = pinned("torch", PYPROJECT["project"]["dependencies"])
    dockerfile = DOCKERFILE.read_text()
    assert "/whl/cu" in dockerfile_arg("TORCH_INDEX_URL")
    assert f"torch=={torch_pin}" in dockerfile
    assert 'pip install --no-cache-dir -e ".[ray]"' in dockerfile
    setup = yaml.safe_load(LAUNCHER.read_text())["setup_commands"]
    assert any("/whl/cu" in cmd and f"torch=={torch_pin}" in cmd for cmd in setup), setup


# ---------------------------------------------------------------------------- serving
def test_rayservice_serves_the_application_of_mdm_serve_yaml():
    service = only("RayService")
    ours = {a["name"]: a for a in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]}
    theirs = {a["name"]: a for a in yaml.safe_load(SERVE_CONFIG.read_text())["applications"]}
    assert ours.keys() == theirs.keys()
    for name, app in ours.items():
        for field in ("import_path", "args", "route_prefix"):
            assert app.get(field) == theirs[name].get(field), f"{name}.{field} differs from {SERVE_CONFIG.name}"
        opts = {d["name"]: d.get("ray_actor_options") for d in app["deployments"]}
        assert opts == {d["name"]: d.get("ray_actor_options") for d in theirs[name]["deployments"]}


def test_rayservice_cluster_can_place_every_replica():
    service = only("RayService")
    groups = gpu_groups(service["spec"]["rayClusterConfig"])
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        for d in app["deployments"]:
            need = d.get("ray_actor_options", {})
            gpus, cpus = need.get("num_gpus", 0), need.get("num_cpus", 1)
            if not gpus:
                continue
            replicas = d.get("autoscaling_config", {}).get("max_replicas") or d.get("num_replicas", 1)
            fits = [g for g in groups if g["gpus"] >= gpus and g["cpus"] >= cpus]
            assert fits, f"{d['name']}: no worker pod has {gpus} GPU and {cpus} CPUs"
            assert sum(g["max_pods"] * (g["gpus"] // gpus) for g in fits) >= replicas, f"{d['name']}: too few GPUs"


def test_rayservice_import_path_resolves_and_accepts_its_args(runs):
    serve_runs = [r for k, r in runs.items() if k[0] == "serve"]
    if not serve_runs:
        pytest.skip("serve/app.py does not exist yet: the import path cannot be checked")
    (r,) = serve_runs
    assert r.returncode == 0, r.stderr[-3000:]
    service = only("RayService")
    configs = [yaml.safe_load(SERVE_CONFIG.read_text()), yaml.safe_load(service["spec"]["serveConfigV2"])]
    expected = [app["import_path"] for c in configs for app in c["applications"]]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == expected


# ---------------------------------------------------------------------------- cluster launcher
def test_cluster_launcher_config_is_valid_and_has_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks first
    types = config["available_node_types"]
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu), "no autoscaled GPU worker type"


def test_cluster_launcher_installs_the_checkout_and_sources_the_env_everywhere():
    config = yaml.safe_load(LAUNCHER.read_text())
    mounts = config["file_mounts"]
    (checkout,) = [remote for remote, local in mounts.items() if local == "."]
    install = checkout.replace("~", "$HOME") + "[ray]"
    assert any(install in cmd and "pip install" in cmd for cmd in config["setup_commands"]), config["setup_commands"]
    (env_file,) = [remote for remote, local in mounts.items() if local != "."]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert f". {env_file} " in start and start.index(env_file) < start.index("ray start"), f"{key}: {start}"


# ---------------------------------------------------------------------------- README
def test_readme_job_commands_are_valid_and_form_chains(runs):
    commands = readme_commands()
    scripts = {s for s, _ in commands}
    assert {"jobs/stage_64.py", "jobs/stage_256.py", "jobs/stage_1024.py"} <= scripts
    for script, args in commands:
        check_job_command(runs, script, args)
    check_chain(runs, commands)
    # The paper's chain is there: a 64-256 model at stage 256 and a 64-256-1024 one at 1024.
    chains = {tuple(stage_config(runs, s, a)["model"]["model"]["resolutions"]) for s, a in commands if "stage" in s}
    assert {(64, 128, 256), (64, 256), (64, 256, 1024)} <= chains
    # "The same commands through ray job submit": the RayJobs' entrypoints appear verbatim.
    for path, command in rayjob_commands().items():
        assert command in commands, f"{path.name}'s entrypoint is not among infra/README.md's commands"


def test_readme_stage_commands_fit_both_clusters(runs):
    cluster = only("RayCluster")
    kube = gpu_groups(cluster["spec"])
    launcher = yaml.safe_load(LAUNCHER.read_text())["available_node_types"]
    ec2 = [
        {"max_pods": t["max_workers"], "gpus": t["resources"]["GPU"], "cpus": t["resources"]["CPU"]}
        for t in launcher.values()
        if t["resources"].get("GPU")
    ]
    for script, args in readme_commands():
        if script == "jobs/preprocess.py":
            continue
        s = stage_config(runs, script, args)["scaling"]
        assert s["use_gpu"], f"{script} {args}: trains on CPU"
        for name, groups in (("RayCluster", kube), ("cluster launcher", ec2)):
            capacity = sum(g["max_pods"] * min(g["gpus"], g["cpus"] // s["cpus_per_worker"]) for g in groups)
            assert s["num_workers"] <= capacity, f"{script}: {s['num_workers']} workers, the {name} holds {capacity}"

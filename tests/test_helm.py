"""The Helm chart helm/expertmesh: lint, render, validate, and run its Serve config.

1. `helm lint` and `helm template` pass for the default values and the value sets in
   helm/expertmesh/ci/ (CPU demo, one 8-GPU node, several GPU nodes with bundled Redis).
2. Every rendered manifest validates against the Kubernetes schemas (kubernetes-validate, strict),
   the RayService against KubeRay's CRD schema (with unknown fields refused, as the API server's
   strict field validation does).
3. Bad values fail with the schema's (or the chart's) message.
4. The rendered serveConfigV2 is the config `expertmesh serve --print-config` writes for the same
   settings, and it starts: Ray Serve runs it on the tiny model and answers HTTP and gRPC.

helm comes from helm/get-helm.sh: `helm` on PATH, else the binary in an npm package.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "expertmesh"
VALUE_SETS = {"default": None, "cpu-demo": "cpu-demo-values.yaml", "one-node-8gpu": "one-node-8gpu-values.yaml",
              "multi-node": "multi-node-values.yaml"}
K8S_VERSION = "1.30"
RELEASE, NAMESPACE = "em", "expertmesh"
FULLNAME = "em-expertmesh"
# KubeRay's RayService CRD (ray-project/kuberay ray-operator/config/crd/bases/, commit feeaf72 of
# 2026-08-19, after v1.7.0; Apache-2.0), kept gzipped beside the tests so a bare checkout has it.
KUBERAY_CRDS = Path(os.environ.get("EXPERTMESH_KUBERAY_CRDS", ROOT / "tests" / "data" / "kuberay"))
CHART_SET_ARGS = {"model", "grpc_port", "grpc_host", "redis_url", "redis_password_env", "api_keys", "api_keys_env",
                  "tool_registry"}
"""AppConfig fields the chart fills from its own values (model.path, grpc, redis, apiKeys, toolRegistry)."""


@pytest.fixture(scope="session")
def helm() -> str:
    if shutil.which("helm") is None and shutil.which("npm") is None:
        pytest.skip("no helm on PATH and no npm to fetch one (helm/get-helm.sh)")
    out = subprocess.run([str(ROOT / "helm" / "get-helm.sh")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


def _values_args(value_set: str | None) -> list[str]:
    name = VALUE_SETS.get(value_set, value_set)
    return ["-f", str(CHART / "ci" / name)] if name else []


def render(helm: str, value_set: str | None, *extra: str) -> list[dict]:
    out = _helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_values_args(value_set), *extra)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def serve_config(docs: list[dict]) -> dict:
    (rs,) = by_kind(docs, "RayService")
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


# ---- lint and template --------------------------------------------------------------------------

@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint(helm, value_set):
    out = _helm(helm, "lint", str(CHART), "--strict", *_values_args(value_set))
    assert out.returncode == 0, out.stdout + out.stderr


def _strict(schema):
    """The CRD schema with unknown fields refused wherever the CRD lists the fields (the API server
    prunes them, or refuses them under strict field validation: a typo must not pass)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="session")
def rayservice_validator():
    import jsonschema

    path = KUBERAY_CRDS / "ray.io_rayservices.yaml"
    if path.is_file():
        text = path.read_text()
    else:
        with gzip.open(path.with_name(path.name + ".gz"), "rt", encoding="utf-8") as f:
            text = f.read()
    crd = yaml.safe_load(text)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


VARIANTS = {  # the value sets, and a few switches flipped
    **{name: (name, []) for name in VALUE_SETS},
    "no-grpc-no-policy": ("cpu-demo", ["grpc.enabled=false", "networkPolicy.enabled=false"]),
    "gateways-on-head": ("multi-node", ["gateway.onHead=true", "app.gateway_replicas=8"]),
    "gateways-spread": ("multi-node", ["gateway.onHead=false", "app.gateway_replicas=2"]),
    "redis-without-auth": ("multi-node", ["redis.auth.enabled=false", "rayService.upgradeStrategy=None"]),
    "keys-in-values": (None, ["apiKeys.keys={key-aaaaaaaa,key-bbbbbbbb}", "service.type=LoadBalancer",
                              "autoscaler.enabled=false", "worker.gpus=0", "model.storage.type=pvc",
                              "model.storage.pvc.claimName=models", "model.path=/models/m"]),
    "tool-registry": ("multi-node", ["toolRegistry.mcp_servers[0].server_label=calc",
                                     "toolRegistry.mcp_servers[0].url=http://calc.tools.svc:9001/mcp",
                                     "toolRegistry.mcp_servers[0].headers_env.Authorization=CALC_AUTH",
                                     "toolRegistry.secretEnv[0].name=CALC_AUTH",
                                     "toolRegistry.secretEnv[0].secretName=tool-secrets",
                                     "toolRegistry.secretEnv[0].key=calc-auth", "head.annotations.team=ml"]),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate(helm, variant, rayservice_validator):
    import kubernetes_validate

    value_set, sets = VARIANTS[variant]
    docs = render(helm, value_set, *[a for s in sets for a in ("--set", s)])
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("RayService") == 1 and "Service" in kinds, kinds
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayService":
            errors = sorted(rayservice_validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            assert not errors, where + ": " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}")


# ---- bad values ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("values", "patterns"), [
    # the schema (helm v4 says "at '/worker/replicas': minimum: got -1, want 0"; helm v3 words it otherwise)
    ("bad-negative-replicas-values.yaml", [r"worker[./]replicas", r"minimum|greater than or equal to 0"]),
    ("bad-missing-model-path-values.yaml", [r"model", r"missing property 'path'|path is required"]),
])
def test_bad_values_files_fail_with_the_schema_message(helm, values, patterns):
    for cmd in (["template", RELEASE], ["lint"]):
        out = _helm(helm, *cmd, str(CHART), "-f", str(CHART / "ci" / values))
        assert out.returncode != 0, f"helm {cmd[0]} accepted {values}"
        for pattern in patterns:
            assert re.search(pattern, out.stdout + out.stderr), (pattern, out.stdout + out.stderr)


@pytest.mark.parametrize(("value_set", "sets", "message"), [
    (None, ["app.ep_sise=8"], "ep_sise"),  # unknown keys are refused, as AppConfig refuses them
    (None, ["app.dtype=fp8"], "dtype"),
    (None, ["model.path=models/x"], "model/path|model.path"),
    (None, ["worker.replicas=3"], "worker.replicas (3) must lie between worker.minReplicas (1) and "
                                  "worker.maxReplicas (1)"),
    ("one-node-8gpu", ["app.ep_size=16"], "needs 16 GPUs, but the worker group has at most 8"),
    ("one-node-8gpu", ["gateway.onHead=false", "app.gateway_replicas=3"],
     "app.gateway_replicas (3) needs as many Ray pods (one gateway replica a pod), but the head and "
     "worker.maxReplicas (1) make 2"),
    (None, ["app.gateway_replicas=0"], "gateway_replicas"),
    (None, ["app.gateway_replicas=-2"], "gateway_replicas"),
    (None, ["app.gateway_replicas=1.5"], "gateway_replicas"),
    (None, ["app.gateway_replicas=two"], "gateway_replicas"),
    (None, ["app.gateway_replicas=null"], "gateway_replicas"),
    (None, ["app.gateway_replicas=100000000000"], "gateway_replicas"),
    (None, ["gateway.onHead=yes"], "onHead"),
    (None, ["gateway.onHead=1"], "onHead"),
    ("one-node-8gpu", ["model.path=/data/Qwen3"], "model.path (/data/Qwen3) must lie under "
                                                  "model.storage.mountPath (/models)"),
    ("one-node-8gpu", ["model.storage.pvc.claimName="], "claimName"),
    ("one-node-8gpu", ["redis.auth.existingSecret="], "needs redis.auth.existingSecret"),
    ("one-node-8gpu", ["redis.external.host="], "host"),
    (None, ["redis.mode=sentinel"], "mode"),
    (None, ["toolRegistry.mcp_servers[0].server_label=calc", "toolRegistry.mcp_servers[0].tiemout_s=3"],
     "tiemout_s"),  # the registry's keys, as the gateway will check them
    (None, ["toolRegistry.webhooks[0].name=w", "toolRegistry.webhooks[0].url=file:///etc/passwd"], "url"),
    (None, ["toolRegistry.mcp_servers[0].server_label=a b"], "server_label"),
    (None, ["toolRegistry.mcp_servers[0].server_label=calc", "toolRegistry.mcp_servers[0].max_concurrency=0"],
     "max_concurrency"),
    (None, ["toolRegistry.secretEnv[0].name=CALC_AUTH"], "secretName|key"),
    (None, ["toolRegistry.mcpServers[0].server_label=calc"], "mcpServers"),
])
def test_bad_values_fail_clearly(helm, value_set, sets, message):
    args = [a for s in sets for a in ("--set", s)]
    out = _helm(helm, "template", RELEASE, str(CHART), *_values_args(value_set), *args)
    assert out.returncode != 0
    assert re.search(message if "|" in message else re.escape(message), out.stderr), out.stderr


def test_schema_app_fields_are_appconfig_fields():
    """The chart's `app` schema holds every AppConfig field it does not set itself, with the field's
    type, choices and bounds (engine/config_fields.py): a new setting is a deliberate change here too."""
    from expertmesh.gateway.app_config import AppConfig, app_settings

    schema = json.loads((CHART / "values.schema.json").read_text())
    app_fields = schema["properties"]["app"]["properties"]
    assert set(app_fields) == set(AppConfig.model_fields) - CHART_SET_ARGS
    assert set(AppConfig.model_fields) >= CHART_SET_ARGS
    json_type = {int: "integer", float: "number", str: "string", bool: "boolean"}
    for s in app_settings():
        if s.name in CHART_SET_ARGS:
            continue
        prop = app_fields[s.name]
        want_type = json_type[s.type]
        assert prop["type"] == ([want_type, "null"] if s.optional else want_type), s.name
        assert prop.get("enum") == (list(s.choices) if s.choices else None), s.name
        assert (prop.get("minimum"), prop.get("exclusiveMinimum"), prop.get("maximum")) == (s.ge, s.gt, s.le), s.name


def test_chart_image_and_dockerfile_agree():
    from expertmesh.model.default import DEFAULT_MODEL_NAME

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert chart["appVersion"] == version  # the image tag the chart names by default
    assert f"ARG RAY_VERSION={values['rayVersion']}\n" in dockerfile  # KubeRay's rayVersion is the image's Ray
    # the default model is the demo model the Dockerfile bakes in at /opt/expertmesh/models/<name>
    assert values["model"]["path"] == f"/opt/expertmesh/models/{DEFAULT_MODEL_NAME}"
    assert "default_model_path('/opt/expertmesh/models/' + name)" in dockerfile


def test_secret_env_fields_resolve(monkeypatch):
    """api_keys_env and redis_password_env: how the Secrets' environment variables reach the gateway."""
    from expertmesh.gateway.app_config import AppConfig

    monkeypatch.setenv("EXPERTMESH_API_KEYS", " key-one,key-two ,")
    monkeypatch.setenv("EXPERTMESH_REDIS_PASSWORD", "p@ss/word")
    cfg = AppConfig(api_keys=["raw"], api_keys_env="EXPERTMESH_API_KEYS", redis_url="redis://redis.ns.svc:6379/1",
                    redis_password_env="EXPERTMESH_REDIS_PASSWORD")
    assert cfg.resolved_api_keys() == ["raw", "key-one", "key-two"]
    assert cfg.resolved_redis_url() == "redis://:p%40ss%2Fword@redis.ns.svc:6379/1"
    assert AppConfig(redis_url="redis://h:6379/0").resolved_redis_url() == "redis://h:6379/0"
    monkeypatch.setenv("EXPERTMESH_API_KEYS", " , ")
    with pytest.raises(ValueError, match="EXPERTMESH_API_KEYS is unset or holds no key"):
        cfg.resolved_api_keys()  # a missing Secret never opens the API
    monkeypatch.delenv("EXPERTMESH_REDIS_PASSWORD")
    with pytest.raises(ValueError, match="EXPERTMESH_REDIS_PASSWORD is unset"):
        cfg.resolved_redis_url()


# ---- what the manifests say ---------------------------------------------------------------------

def test_multi_node_layout(helm):
    from expertmesh.gateway.app_config import AppConfig

    docs = render(helm, "multi-node")
    (rs,) = by_kind(docs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["dashboard"] == 8265 and head_ports["grpc"] == 50051 and head_ports["serve"] == 8000
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 2, 4)
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert worker["tolerations"] and worker["nodeSelector"] and worker["affinity"]
    assert {v["name"] for v in worker["volumes"]} == {"dshm", "model"}

    # Redis: bundled StatefulSet with a claim, used by Ray's GCS and by the state store
    (sts,) = by_kind(docs, "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    redis_host = f"{FULLNAME}-redis.{NAMESPACE}.svc"
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == f"{redis_host}:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-redis", "key": "redis-password"}
    args = serve_config(docs)["applications"][0]["args"]
    assert args["redis_url"] == f"redis://{redis_host}:6379/1"
    assert (args["ep_size"], args["engine_replicas"], args["device"]) == (8, 2, "cuda")
    # elastic: Serve scales the EP groups between 2 and 4, the Ray autoscaler adds a node per group
    assert (args["min_replicas"], args["max_replicas"]) == (2, 4) and group["maxReplicas"] >= args["max_replicas"]
    auto = AppConfig.model_validate({**args, "model": None, "device": "cpu"}).autoscaling()
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (2, 2, 4)
    assert (auto["upscale_delay_s"], auto["downscale_delay_s"]) == (60, 900)

    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    http, grpc = services[f"{FULLNAME}-http"], services[f"{FULLNAME}-grpc"]
    assert http["spec"]["ports"][0]["port"] == 8000 and http["spec"]["selector"]["ray.io/serve"] == "true"
    # gRPC: the gateway replicas run on the head by default (gateway.onHead), so its Service selects the head
    assert grpc["spec"]["ports"][0]["port"] == 50051 and grpc["spec"]["selector"]["ray.io/node-type"] == "head"
    assert {p["metadata"]["name"] for p in by_kind(docs, "NetworkPolicy")} == {f"{FULLNAME}-ray", f"{FULLNAME}-redis"}


@pytest.mark.parametrize("on_head", [False, True], ids=["spread", "on-head"])
def test_grpc_is_served_where_the_gateway_replicas_run(helm, rayservice_validator, on_head):
    """Every gateway replica serves gRPC on its pod (gateway/serve_app.py Gateway). Spread
    (gateway.onHead false): one replica a Ray pod at most, every Ray container exposes the grpc port, and the gRPC
    Service selects the pods whose Serve proxy is up, as the HTTP Service does. gateway.onHead: all
    replicas on the head (the default), sharing its port, and the Service selects the head."""
    from expertmesh.gateway.serve_app import GATEWAY_DEPLOYMENT

    docs = render(helm, "multi-node", "--set", f"gateway.onHead={str(on_head).lower()}")
    (rs,) = by_kind(docs, "RayService")
    assert not list(rayservice_validator.iter_errors(rs))
    cluster = rs["spec"]["rayClusterConfig"]
    head, (group,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]

    def grpc_ports(pod):
        return [p["containerPort"] for p in pod["template"]["spec"]["containers"][0]["ports"] if p["name"] == "grpc"]

    assert grpc_ports(head) == [50051]
    assert grpc_ports(group) == ([] if on_head else [50051])
    (app,) = serve_config(docs)["applications"]
    (gateway,) = app["deployments"]
    assert gateway["name"] == GATEWAY_DEPLOYMENT and app["args"]["gateway_replicas"] == 2
    assert (app["args"]["grpc_port"], app["args"]["grpc_host"]) == (50051, "0.0.0.0")
    if on_head:
        assert gateway["ray_actor_options"]["resources"] == {"expertmesh_gateway": 0.01}
        assert "max_replicas_per_node" not in gateway and head["rayStartParams"]["resources"]
    else:
        assert gateway == {"name": GATEWAY_DEPLOYMENT, "max_replicas_per_node": 1}
        assert "resources" not in head["rayStartParams"]
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    selector = services[f"{FULLNAME}-grpc"]["spec"]["selector"]
    if on_head:
        assert selector["ray.io/node-type"] == "head" and "ray.io/serve" not in selector
    else:
        assert selector == services[f"{FULLNAME}-http"]["spec"]["selector"]

    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate({**serve_config(docs), "applications": [
        {**app, "args": {**app["args"], "model": None}}]})


def test_secrets_reach_the_pods_as_references_only(helm):
    docs = render(helm, "multi-node", "--set", "redis.auth.password=s3cret-redis-pw")
    (rs,) = by_kind(docs, "RayService")
    assert "s3cret-redis-pw" not in yaml.safe_dump(rs)
    args = serve_config(docs)["applications"][0]["args"]
    assert args["api_keys_env"] == "EXPERTMESH_API_KEYS" and args["redis_password_env"] == "EXPERTMESH_REDIS_PASSWORD"
    assert "api_keys" not in args
    cluster = rs["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["spec"]["containers"][0]["env"]
               if "valueFrom" in e}
        assert env["EXPERTMESH_API_KEYS"] == {"name": "expertmesh-api-keys", "key": "api-keys"}
        assert env["EXPERTMESH_REDIS_PASSWORD"]["name"] == f"{FULLNAME}-redis"
    (secret,) = by_kind(docs, "Secret")  # the bundled Redis's password; the API keys' Secret exists already
    assert secret["data"]["redis-password"] and "s3cret" not in json.dumps(secret)


def test_every_proxy_gets_the_connection_timeouts(helm):
    """Serve's own http_options carry the keep-alive and request timeouts; the header timeout, which
    Serve does not expose, reaches every Ray container (each runs a proxy) through the environment."""
    docs = render(helm, "multi-node", "--set", "app.http_header_timeout_s=12", "--set",
                  "app.http_keep_alive_timeout_s=75", "--set", "app.http_request_timeout_s=600")
    options = serve_config(docs)["http_options"]
    assert (options["keep_alive_timeout_s"], options["request_timeout_s"]) == (75, 600)
    (rs,) = by_kind(docs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "expertmesh.gateway.proxy_callback:install"
        assert env["EXPERTMESH_HTTP_HEADER_TIMEOUT_S"] == "12"
    default = serve_config(render(helm, None))["http_options"]
    assert default["keep_alive_timeout_s"] == 90 and "request_timeout_s" not in default


def test_every_ray_pod_gives_serve_proxy_the_openai_error_middleware(helm):
    """Serve's proxy reads its callback from the node's environment (gateway/proxy_callback.py)."""
    from expertmesh.gateway.proxy_callback import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    for value_set in (None, "multi-node"):
        (rs,) = by_kind(render(helm, value_set), "RayService")
        cluster = rs["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for pod in pods:
            env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
            assert env[PROXY_CALLBACK_ENV] == PROXY_CALLBACK


def test_network_policy_keeps_ray_ports_inside(helm):
    docs = render(helm, "one-node-8gpu")
    (policy,) = by_kind(docs, "NetworkPolicy")
    rules = policy["spec"]["ingress"]
    unrestricted_ports = {p["port"] for rule in rules if "from" not in rule for p in rule["ports"]}
    assert unrestricted_ports == {8000, 50051}  # only the API answers any source
    (same_release,) = [r for r in rules if "ports" not in r]  # all ports: Ray among its own pods
    assert same_release["from"] == [{"podSelector": policy["spec"]["podSelector"]}]


def test_notes_tell_how_to_reach_the_api(helm):
    out = _helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                *_values_args("one-node-8gpu"))
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{FULLNAME}-http" in notes and f"svc/{FULLNAME}-grpc" in notes
    assert "/v1/chat/completions" in notes and "Authorization: Bearer" in notes
    assert f"svc/{FULLNAME}-head-svc 8265" in notes


# ---- the serve config is `expertmesh serve`'s -----------------------------------------------------

def _cli_flags(args: dict) -> list[str]:
    """`expertmesh serve` flags for AppConfig args: each field's flag is derived from the field."""
    from expertmesh.gateway.app_config import app_settings

    settings = {s.name: s for s in app_settings()}
    flags = ["--host", "0.0.0.0", "--port", "8000"]
    for key, value in args.items():
        flag = settings[key].flag
        if isinstance(value, bool):
            flags += [flag if value else "--no-" + flag[2:]]
        elif isinstance(value, list):
            flags += [part for item in value for part in (flag, str(item))]
        elif value is not None:
            flags += [flag, str(value)]
        elif key == "grpc_port":
            flags += [flag, "0"]
    return flags


def test_serve_config_is_the_cli_config(helm, tmp_path):
    from expertmesh.gateway.app_config import AppConfig
    from expertmesh.gateway.cli import main
    from expertmesh.gateway.serve_app import GATEWAY_DEPLOYMENT
    from expertmesh.model.default import default_model_path

    rendered = serve_config(render(helm, "cpu-demo"))
    (app,) = rendered["applications"]
    assert app["import_path"] == "expertmesh.gateway.serve_app:build_app"
    args = {**app["args"], "model": str(default_model_path())}
    # the generated API key's Secret reaches the gateway through the environment: no CLI flag for that
    assert args.pop("api_keys_env") == "EXPERTMESH_API_KEYS"
    cfg = AppConfig.model_validate(args)

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["serve", "--print-config", *_cli_flags(args)]) == 0
    printed = yaml.safe_load(stdout.getvalue())
    (cli_app,) = printed["applications"]

    assert rendered.keys() == printed.keys()
    assert {k: v for k, v in rendered.items() if k != "applications"} == \
           {k: v for k, v in printed.items() if k != "applications"}
    # the chart adds one deployment override: the gateway replicas one a pod (or all on the head: gateway.onHead)
    assert {k: v for k, v in app.items() if k not in ("args", "deployments")} == \
           {k: v for k, v in cli_app.items() if k != "args"}
    assert [d["name"] for d in app["deployments"]] == [GATEWAY_DEPLOYMENT]
    assert AppConfig.model_validate(cli_app["args"]).model_dump() == cfg.model_dump()

    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate({**rendered, "applications": [{**app, "args": args}]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rendered_serve_config_starts(helm):
    """The cpu-demo serveConfigV2, with its API keys from a Secret, runs on Ray Serve. In a process
    of its own: a Serve session leaves driver-side state (its handles' routers) that a later Serve
    session of the same driver (tests/test_serve_resilience.py) would inherit and hang on."""
    import multiprocessing

    from expertmesh.gateway.app_config import AppConfig
    from expertmesh.model.default import default_model_path

    docs = render(helm, "cpu-demo", "--set", "apiKeys.existingSecret=demo-keys")
    (app,) = serve_config(docs)["applications"]
    args = {**app["args"], "model": str(default_model_path()), "grpc_port": _free_port()}
    assert args["api_keys_env"] == "EXPERTMESH_API_KEYS" and "api_keys" not in args
    AppConfig.model_validate(args)
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    child = ctx.Process(target=_serve_rendered_app, args=(app, args, errors))
    child.start()
    child.join(timeout=600)
    assert child.exitcode == 0, errors.get(timeout=5) if not errors.empty() else f"exit code {child.exitcode}"


def _serve_rendered_app(app: dict, args: dict, errors) -> None:
    """The child of test_rendered_serve_config_starts: start the app on a local Ray, then ask it."""
    import os
    import traceback

    import grpc
    import httpx
    import ray
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray import serve

    from expertmesh.gateway.serve_app import build_app

    os.environ["EXPERTMESH_API_KEYS"] = "demo-key-one,demo-key-two"  # as the Secret's env entry does
    http_port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # replicas inherit the environment
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(args), name=app["name"], route_prefix=app["route_prefix"])
        url = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        body = {"model": args["served_model_name"], "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Hello!"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": "Bearer demo-key-two"})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
        with grpc.insecure_channel(f"127.0.0.1:{args['grpc_port']}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    except BaseException:
        errors.put(traceback.format_exc())
        raise
    finally:
        serve.shutdown()
        ray.shutdown()



# ---- server-side tools --------------------------------------------------------------------------

TOOL_VALUES = """
toolRegistry:
  mcp_servers:
    - server_label: calc
      url: http://calc.tools.svc:9001/mcp
      headers_env: {Authorization: CALC_AUTH}
      allowed_tools: [add]
    - server_label: files
      command: [python, -m, files_server]
      env_from: {FILES_TOKEN: FILES_TOKEN}
  webhooks:
    - name: get_weather
      description: Current weather of a city.
      parameters: {type: object, properties: {city: {type: string}}, required: [city]}
      url: https://hooks.example.com/weather
      secret_env: WEATHER_HOOK_SECRET
  secretEnv:
    - {name: CALC_AUTH, secretName: tool-secrets, key: calc-auth}
    - {name: FILES_TOKEN, secretName: tool-secrets, key: files}
    - {name: WEATHER_HOOK_SECRET, secretName: tool-secrets, key: weather-hook}
"""


def test_the_tool_registry_reaches_every_ray_container(helm, tmp_path):
    """toolRegistry becomes a ConfigMap that every Ray container mounts, app.tool_registry names the file,
    the Secrets of secretEnv reach the containers as references, and the file is a registry the gateway
    loads with those variables set; the pods carry its checksum."""
    import hashlib

    from expertmesh.gateway.tools.registry import load_registry

    values = tmp_path / "tools.yaml"
    values.write_text(TOOL_VALUES)
    docs = render(helm, "multi-node", "-f", str(values))
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == f"{FULLNAME}-tools"]
    text = cm["data"]["registry.yaml"]
    (tmp_path / "registry.yaml").write_text(text)
    env = {"CALC_AUTH": "Bearer x", "FILES_TOKEN": "t", "WEATHER_HOOK_SECRET": "s"}
    registry = load_registry(tmp_path / "registry.yaml", env)
    assert registry.model_dump(exclude_defaults=True) == \
        {k: v for k, v in yaml.safe_load(TOOL_VALUES)["toolRegistry"].items() if k != "secretEnv"}
    (app,) = serve_config(docs)["applications"]
    assert app["args"]["tool_registry"] == "/etc/expertmesh/tools/registry.yaml"
    (rs,) = by_kind(docs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        container = pod["spec"]["containers"][0]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["tool-registry"] == {"name": "tool-registry", "mountPath": "/etc/expertmesh/tools",
                                           "readOnly": True}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["tool-registry"]["configMap"]["name"] == f"{FULLNAME}-tools"
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert refs["CALC_AUTH"] == {"name": "tool-secrets", "key": "calc-auth"}
        assert refs["WEATHER_HOOK_SECRET"] == {"name": "tool-secrets", "key": "weather-hook"}
        checksum = pod["metadata"]["annotations"]["expertmesh.io/tool-registry-sha256"]
        assert checksum == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
    # no registry: no ConfigMap, no mount, no tool_registry, no annotation
    plain = render(helm, "multi-node")
    assert not [d for d in by_kind(plain, "ConfigMap") if d["metadata"]["name"].endswith("-tools")]
    assert "tool_registry" not in serve_config(plain)["applications"][0]["args"]
    assert "tool-registry" not in yaml.safe_dump(by_kind(plain, "RayService"))


def test_schema_tool_registry_keys_are_the_registry_fields():
    """The chart's toolRegistry schema knows exactly the registry's keys (gateway/tools/registry.py), so a
    typo fails `helm install` as it would fail the gateway."""
    from expertmesh.gateway.tools.registry import McpServerEntry, ToolRegistry, WebhookEntry

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["toolRegistry"]["properties"]
    assert set(schema) == set(ToolRegistry.model_fields) | {"secretEnv"}
    assert set(schema["mcp_servers"]["items"]["properties"]) == set(McpServerEntry.model_fields)
    assert set(schema["webhooks"]["items"]["properties"]) == set(WebhookEntry.model_fields)

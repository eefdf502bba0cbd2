"""The Helm chart's security (issue 10, items 1 and 11): what the default values serve and allow.

- No API key given: the chart generates a key Secret (never an open API), or refuses to render.
- The NetworkPolicy selects the KubeRay operator by namespace and label together; metrics (8080)
  answer this namespace only.
- Every container runs restricted (non-root, no privilege escalation, no capabilities, seccomp).
- The head pod's probes use the gateway's routes (files/probe.py, run here against a fake node).
- The bundled Redis's password is on no command line (the rendered script runs a real redis-server).
- API keys and Ray's GCS fault-tolerance data live in separate Redis databases.
"""
from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_helm import (
    CHART,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    _free_port,
    _helm,
    _values_args,
    by_kind,
    helm,
    render,
    serve_config,
)

__all__ = ["helm"]  # the session fixture, shared with test_helm.py


def _ray_containers(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    containers = {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in cluster["workerGroupSpecs"]:
        containers[f"worker {group['groupName']}"] = group["template"]["spec"]["containers"][0]
    if "autoscalerOptions" in cluster:
        containers["autoscaler"] = cluster["autoscalerOptions"]
    return containers


def test_default_values_never_serve_an_open_api(helm):
    """No key Secret given: the chart generates one (a random key, referenced by every Ray container);
    told not to, it renders only with a Redis key store (which admits nobody until a key is created)."""
    keys = []
    for _ in range(2):
        docs = render(helm, None)
        (secret,) = [s for s in by_kind(docs, "Secret") if s["metadata"]["name"] == f"{FULLNAME}-api-keys"]
        key = base64.b64decode(secret["data"]["api-keys"]).decode()
        assert re.fullmatch(r"em-[A-Za-z0-9]{32}", key), key
        keys.append(key)
    assert keys[0] != keys[1], "a random key (an installed release keeps its own through `lookup`)"
    assert serve_config(docs)["applications"][0]["args"]["api_keys_env"] == "EXPERTMESH_API_KEYS"
    (rs,) = by_kind(docs, "RayService")
    for where, container in _ray_containers(rs).items():
        if where != "autoscaler":
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
            assert refs["EXPERTMESH_API_KEYS"] == {"name": f"{FULLNAME}-api-keys", "key": "api-keys"}, where

    for value_set, sets in ((None, ["--set", "redis.mode=bundled"]), ("one-node-8gpu", [])):
        args = serve_config(render(helm, value_set, *sets))["applications"][0]["args"]
        assert args["api_keys_env"] == "EXPERTMESH_API_KEYS" and args["redis_url"]
    docs = render(helm, None, "--set", "apiKeys.generate=false", "--set", "redis.mode=bundled")
    assert not [s for s in by_kind(docs, "Secret") if "api-keys" in s["metadata"]["name"]]
    assert "api_keys_env" not in serve_config(docs)["applications"][0]["args"]  # the key store only
    out = _helm(helm, "template", RELEASE, str(CHART), "--set", "apiKeys.generate=false")
    assert out.returncode != 0 and "would serve an open API" in out.stderr, out.stderr

    out = _helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    notes = out.stdout.split("NOTES:", 1)[1]
    assert f"get secret {FULLNAME}-api-keys" in notes and "generated one" in notes and "open" not in notes


def test_network_policy_selects_the_operator_by_namespace_and_label(helm):
    for sets, namespace in (([], "default"), (["networkPolicy.kuberayOperator.namespace=ray-system"], "ray-system")):
        docs = render(helm, None, *[a for s in sets for a in ("--set", s)])
        (policy,) = by_kind(docs, "NetworkPolicy")
        rules = policy["spec"]["ingress"]
        (operator,) = [r for r in rules if {p["port"] for p in r.get("ports", [])} == {8265, 52365, 8000}]
        (peer,) = operator["from"]  # one peer: namespace AND labels, never either alone
        assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
        (metrics,) = [r for r in rules if [p["port"] for p in r.get("ports", [])] == [8080]]
        assert metrics["from"] == [{"podSelector": {}}], "metrics answer this namespace's pods only"
    out = _helm(helm, "template", RELEASE, str(CHART), "--set", "networkPolicy.kuberayOperator.namespace=")
    assert out.returncode != 0 and "namespace" in out.stderr


RESTRICTED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}}


def test_containers_run_restricted(helm):
    """Every Ray container (and the autoscaler, and the bundled Redis) meets the Pod Security
    Standard "restricted"; the Ray containers' securityContext is a value."""
    docs = render(helm, "multi-node")
    (rs,) = by_kind(docs, "RayService")
    containers = _ray_containers(rs)
    assert set(containers) == {"head", "worker gpu-8x", "autoscaler"}
    (sts,) = by_kind(docs, "StatefulSet")
    containers["redis"] = sts["spec"]["template"]["spec"]["containers"][0]
    for where, container in containers.items():
        context = container["securityContext"]
        assert {k: context.get(k) for k in RESTRICTED} == RESTRICTED, where
    assert containers["head"]["securityContext"]["runAsUser"] == 1000  # the image's user ray: checkable

    changed = 'securityContext={"capabilities": {"add": ["IPC_LOCK"]}, "runAsUser": 2000}'
    docs = render(helm, None, "--set-json", changed)
    (rs,) = by_kind(docs, "RayService")
    for container in _ray_containers(rs).values():
        context = container["securityContext"]
        assert context["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]} and context["runAsUser"] == 2000


def test_head_probes_use_the_gateway_routes(helm):
    docs = render(helm, "multi-node", "--set", "head.rayStartParams.dashboard-agent-listen-port=52366")
    (rs,) = by_kind(docs, "RayService")
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    for probe, kind in ((container["readinessProbe"], "ready"), (container["livenessProbe"], "live")):
        command = probe["exec"]["command"]
        assert command[:4] == ["python", "-S", "/etc/expertmesh/probe/probe.py", kind]
        assert command[command.index("--serve-port") + 1] == "8000"  # the Serve HTTP port (http_options)
        assert command[command.index("--agent-port") + 1] == "52366"
        assert 2 * float(command[command.index("--timeout") + 1]) < probe["timeoutSeconds"]
    assert container["livenessProbe"]["failureThreshold"] * container["livenessProbe"]["periodSeconds"] >= 300
    (volume,) = [v for v in head["volumes"] if v["name"] == "probe"]
    (configmap,) = by_kind(docs, "ConfigMap")
    assert configmap["metadata"]["name"] == volume["configMap"]["name"]
    assert configmap["data"]["probe.py"].strip() == (CHART / "files" / "probe.py").read_text().strip()
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:  # KubeRay's own worker probes stay
        worker = group["template"]["spec"]["containers"][0]
        assert "readinessProbe" not in worker and "livenessProbe" not in worker

    docs = render(helm, None, "--set", "probes.enabled=false")
    (rs,) = by_kind(docs, "RayService")
    assert "readinessProbe" not in rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not by_kind(docs, "ConfigMap")


class _FakeNode:
    """The dashboard agent and the Serve proxy of a head pod, on two free ports: each path answers
    the status in `answers` ("hang": no answer for 3 s); a port in `down` refuses connections."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.answers: dict[str, int | str] = {}
        node = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                answer = node.answers.get(self.path, 404)
                if answer == "hang":
                    time.sleep(3)
                    answer = 200
                self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        self.agent_port, self.serve_port = (s.server_address[1] for s in self.servers)
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def probe(self, kind: str, serve_port: int | None = None) -> subprocess.CompletedProcess:
        command = ["python", "-S", str(CHART / "files" / "probe.py"), kind, "--serve-port",
                   str(serve_port or self.serve_port), "--agent-port", str(self.agent_port), "--timeout", "0.5"]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def test_probe_script():
    """files/probe.py: the Ray node's health, then the gateway's route; an application not deployed
    yet (no proxy, 404) is not judged, so KubeRay can deploy it once the head is ready."""
    node = _FakeNode()
    try:
        cases = [  # (agent, /health, /livez, ready?, live?)
            (200, 200, 200, True, True),
            (200, 503, 200, False, True),  # the engine makes no progress: out of the Service, not restarted
            (200, 404, 404, True, True),  # the application is not deployed yet
            (200, "hang", "hang", False, False),  # a gateway whose event loop is stuck
            (200, 500, 500, False, False),
            (503, 200, 200, False, False),  # the Ray node itself (KubeRay's own check, kept)
        ]
        for agent, health, livez, ready, live in cases:
            node.answers = {"/api/healthz": agent, "/health": health, "/livez": livez}
            for kind, expected in (("ready", ready), ("live", live)):
                out = node.probe(kind)
                assert (out.returncode == 0) == expected, (kind, agent, health, livez, out.stdout, out.stderr)
                assert expected or out.stdout.strip(), "a failure says why"
        node.answers = {"/api/healthz": 200}
        assert node.probe("ready", serve_port=_free_port()).returncode == 0, "no Serve proxy yet: not judged"
    finally:
        node.close()


def test_redis_password_is_never_on_a_command_line(helm, tmp_path):
    """The bundled Redis reads its password from a redis.conf the container writes in memory: run the
    rendered script with a real redis-server; no process's command line holds the password."""
    from conftest import REDIS

    if REDIS is None:
        pytest.skip("redis-server is not installed")
    import redis

    docs = render(helm, "multi-node")
    (sts,) = by_kind(docs, "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["sh", "-c"] and "$(" not in " ".join(container["command"])
    assert not any("requirepass" in a and "$(" + "REDIS" in a for a in container["args"])
    (env,) = container["env"]
    assert env["name"] == "REDISCLI_AUTH" and env["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-redis"
    (conf,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/run/redis"]
    (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == conf["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"

    port, password = _free_port(), "p@ss \"w\\ord' $(x) `y`"
    script = container["args"][0].replace("/run/redis", str(tmp_path)).replace(
        "--dir /data", f"--dir {tmp_path} --port {port} --bind 127.0.0.1 --save ''")
    proc = subprocess.Popen(["sh", "-c", script], env={**os.environ, "REDISCLI_AUTH": password},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, password=password, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                assert client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert proc.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()  # NOAUTH
        assert oct((tmp_path / "auth.conf").stat().st_mode & 0o777) == "0o600"
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in os.listdir("/proc") if pid.isdigit()
                    and Path(f"/proc/{pid}/cmdline").exists()]
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"redis-server"), "exec'd in place"
        assert not any(password.encode() in c or b"p@ss" in c for c in cmdlines)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_api_keys_and_gcs_data_live_apart(helm):
    """Ray's GCS fault-tolerance data in Redis database 0, expertmesh's keys in redis.stateDb (1)."""
    docs = render(helm, "multi-node")
    (rs,) = by_kind(docs, "RayService")
    gcs = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"]
    url = serve_config(docs)["applications"][0]["args"]["redis_url"]
    assert "/" not in gcs and url == f"redis://{gcs}/1"
    out = _helm(helm, "template", RELEASE, str(CHART), *_values_args("multi-node"), "--set", "redis.stateDb=0")
    assert out.returncode != 0 and re.search(r"stateDb", out.stderr) and re.search(r"minimum", out.stderr), out.stderr

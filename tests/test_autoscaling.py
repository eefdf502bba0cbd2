"""Autoscaling of the engine deployment (gateway/autoscaling.py): the policy's rule, the settings
and their checks, the deployment Serve gets, and a real run: Ray Serve on two logical CPUs, the
tiny model, min 1 and max 2 engine replicas; sustained load from the official client grows the
engine deployment to 2 replicas and, once idle, back to 1, with no request failing in either
transition."""
from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError
from serve_app_helper import APP, running_app, wait_for

from expertmesh.gateway.app_config import AppConfig
from expertmesh.gateway.autoscaling import EnginePolicy, decide


def _metrics(running, waiting, kv):
    return {"num_running": running, "num_waiting": waiting, "kv_usage": kv}


@pytest.mark.parametrize("current, metrics, want", [
    (1, _metrics([1.0], [0.0], [0.1]), 1),            # within target: as it is
    (1, _metrics([2.0], [1.5], [0.1]), 2),            # requests wait: one more group
    (1, _metrics([1.0], [0.0], [0.95]), 2),           # KV nearly full: one more
    (1, _metrics([5.0], [0.0], [0.2]), 2),            # more sequences than the target
    (2, _metrics([9.0, 9.0], [0.0, 0.0], [0.2, 0.2]), 3),
    (2, _metrics([0.5, 0.0], [0.0, 0.0], [0.05, 0.0]), 1),  # idle enough for one group fewer
    (2, _metrics([3.0, 2.0], [0.0, 0.0], [0.3, 0.3]), 2),   # 5 sequences do not fit one group of 4
    (3, _metrics([1.0, 1.0, 1.0], [0.0] * 3, [0.5, 0.5, 0.5]), 2),
    (2, _metrics([], [], []), 2),                     # nothing reported yet: hold
    (2, _metrics([0.0, 0.0], [0.0, 0.0], [0.95, 0.95]), 3),  # KV nearly full: up, even with no sequence
])
def test_the_policy_adds_or_removes_one_group_from_the_engines_load(current, metrics, want):
    assert decide(current, metrics, target_seqs=4, kv_high=0.9) == want


def test_the_policy_reads_serves_context():
    from types import SimpleNamespace

    ctx = SimpleNamespace(current_num_replicas=1, policy_state={"kept": True},
                          aggregated_metrics={"num_running": {"r1": 7.0}, "num_waiting": {"r1": 0.0},
                                              "kv_usage": {"r1": 0.1}})
    assert EnginePolicy(target_seqs=4)(ctx) == (2, {"kept": True})
    with pytest.raises(ValueError, match="target_seqs"):
        EnginePolicy(target_seqs=0)


def test_replica_bounds_are_checked(qwen3_moe_path):
    base = {"model": str(qwen3_moe_path)}
    with pytest.raises(ValidationError, match="min_replicas needs max_replicas"):
        AppConfig.model_validate({**base, "min_replicas": 2})
    with pytest.raises(ValidationError, match=r"min_replicas \(3\) must be at most max_replicas \(2\)"):
        AppConfig.model_validate({**base, "min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="max_replicas"):
        AppConfig.model_validate({**base, "max_replicas": 0})
    with pytest.raises(ValidationError, match="autoscale_look_back_s"):
        AppConfig.model_validate({**base, "max_replicas": 2, "autoscale_look_back_s": 5})
    assert AppConfig.model_validate(base).autoscaling() is None  # fixed engine_replicas


def test_build_app_gives_serve_the_autoscaling_config(qwen3_moe_path):
    from expertmesh.gateway.serve_app import app_bundles, build_app

    args = {"model": str(qwen3_moe_path), "device": "cpu", "min_replicas": 2, "max_replicas": 4,
            "engine_replicas": 1, "max_num_seqs": 10, "upscale_delay_s": 5, "downscale_delay_s": 50,
            "drain_timeout_s": 90}
    engine = build_app(args)._bound_deployment.init_args[0]._bound_deployment
    config = engine._deployment_config
    auto = config.autoscaling_config
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas) == (2, 2, 4)  # engine_replicas clamped
    assert (auto.upscale_delay_s, auto.downscale_delay_s, auto.look_back_period_s) == (5, 50, 30)
    assert auto.policy.policy_function == "expertmesh.gateway.autoscaling:EnginePolicy"
    assert auto.policy.policy_kwargs == {"target_seqs": 5.0}  # half of max_num_seqs
    assert config.graceful_shutdown_timeout_s == 90  # the drain
    cfg = AppConfig.model_validate(args)
    assert len(app_bundles(cfg)) == 2 + cfg.gateway_replicas  # the start needs the minimum placed
    fixed = build_app({"model": str(qwen3_moe_path), "device": "cpu", "engine_replicas": 3})
    fixed_config = fixed._bound_deployment.init_args[0]._bound_deployment._deployment_config
    assert fixed_config.autoscaling_config is None and fixed_config.num_replicas == 3


# ---- real Ray Serve -------------------------------------------------------------------------

ENGINE = "ExpertMeshEngine"


def _engine_replicas() -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    status = serve.status().applications[APP].deployments[ENGINE]
    return status.replica_states.get(ReplicaState.RUNNING, 0)


@pytest.mark.slow
def test_engine_replicas_follow_the_load_up_and_back_down_without_a_failed_request(qwen3_moe_path):
    import openai

    args = {"model": str(qwen3_moe_path), "device": "cpu", "grpc_port": 0, "min_replicas": 1, "max_replicas": 2,
            "autoscale_target_seqs": 2, "upscale_delay_s": 1, "downscale_delay_s": 2, "autoscale_look_back_s": 11,
            "max_num_seqs": 16, "num_kv_blocks": 1024}
    stop, done, failures = threading.Event(), [0], []
    with running_app(args, num_cpus=2) as base:  # a 2-core laptop's worth of logical CPUs
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        assert _engine_replicas() == 1

        def load():
            while not stop.is_set():
                try:
                    text = "".join(c.choices[0].text for c in client.completions.create(
                        model=model, prompt="count with me: one two three", max_tokens=48, temperature=0, stream=True))
                    assert text
                    done[0] += 1
                except Exception as exc:  # every failure is counted and reported
                    failures.append(repr(exc))

        threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
        try:
            for t in threads:
                t.start()
            wait_for(lambda: _engine_replicas() == 2, 120, "a second engine replica runs under load")
            served_before = done[0]
            wait_for(lambda: done[0] > served_before + 16, 60, "requests complete with two replicas")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        wait_for(lambda: _engine_replicas() == 1, 120, "the idle deployment is back to one replica")
        assert not failures, failures[:3]
        assert done[0] > 16
        reply = client.completions.create(model=model, prompt="after", max_tokens=4)  # still serving
        assert reply.choices[0].text


@pytest.mark.slow
def test_a_replica_scaled_down_under_streams_drains_them_all(qwen3_moe_path):
    """Two engine replicas, 10 long greedy streams spread over them, then the deployment is scaled
    to one (a lightweight update: the kept replica is not restarted). The removed replica stops
    taking requests and finishes its streams: all 10 complete, every token there."""
    import openai
    from ray import serve
    from ray.serve._private.common import ReplicaState

    from expertmesh.gateway.serve_app import build_app

    args = {"model": str(qwen3_moe_path), "device": "cpu", "grpc_port": 0, "engine_replicas": 2, "drain_timeout_s": 300,
            "num_kv_blocks": 4096}
    results, failures = [], []
    with running_app(args, num_cpus=2) as base:
        wait_for(lambda: _engine_replicas() == 2, 120, "two engine replicas run")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        started = threading.Barrier(11)

        def stream(i):
            try:
                chunks = client.completions.create(model=model, prompt=f"stream {i}:", max_tokens=1500, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})
                count, finish = 0, None
                for chunk in chunks:
                    if count == 0:
                        started.wait(timeout=120)
                    count += 1
                    finish = chunk.choices[0].finish_reason or finish
                results.append((count, finish))
            except Exception as exc:  # every failure is counted and reported
                failures.append(repr(exc))

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(10)]
        for t in threads:
            t.start()
        started.wait(timeout=120)  # every stream has its first token
        scale_down = threading.Thread(target=serve.run, args=(build_app({**args, "engine_replicas": 1}),),
                                      kwargs={"name": APP, "route_prefix": "/"}, daemon=True)
        scale_down.start()
        wait_for(lambda: serve.status().applications[APP].deployments[ENGINE].replica_states.get(ReplicaState.STOPPING),
                 60, "a replica drains")
        assert sum(t.is_alive() for t in threads) >= 5  # it drains while the streams run
        scale_down.join(timeout=600)
        for t in threads:
            t.join(timeout=600)
        assert not failures, (len(failures), failures[:3])
        assert len(results) == 10 and all(finish == "length" for _, finish in results), results
        wait_for(lambda: _engine_replicas() == 1 and not serve.status().applications[APP].deployments[ENGINE]
                 .replica_states.get(ReplicaState.STOPPING), 120, "one replica is left")

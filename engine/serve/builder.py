"""Compose the Serve application: the OpenAI ingress bound to an autoscaling engine deployment."""
from __future__ import annotations

import re
from typing import Any, Dict, Optional

from ray import serve
from ray.serve import Application

from .config import AppConfig, parse_app_args
from .engine_replica import EngineReplica
from .ingress import OpenAIIngress, app as fastapi_app

IngressDeployment = serve.ingress(fastapi_app)(OpenAIIngress)


# An engine stepping in the replica's own thread shares the GIL with Ray: its OpenMP threads sleep at
# barriers, leaving the CPU to the proxy and ingress between steps (measured on 2 cores: 29 -> 25 ms per
# streamed token at concurrency 1). An engine in its own process keeps OpenMP's default (spin briefly,
# then sleep): passive waits cost it 20% of its offline rate.
IN_REPLICA_ENGINE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def hub_name_for(cfg: AppConfig) -> str:
    return "raylm-metrics-" + re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.model_name)


def build(cfg: AppConfig) -> Application:
    gpu = cfg.engine.device == "cuda"
    bundles = cfg.placement_bundles()
    engine = serve.deployment(EngineReplica).options(
        name="LLMEngine",
        autoscaling_config=cfg.autoscaling.to_serve(),
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        # the replica actor sits in the first bundle; with tp > 1 the others hold its worker actors
        ray_actor_options={"num_cpus": bundles[0]["CPU"], **({"num_gpus": 1} if gpu and cfg.engine.tp == 1 else {}),
                           "runtime_env": {"env_vars": {} if cfg.engine_in_process_child else IN_REPLICA_ENGINE_ENV},
                           **({"resources": dict(cfg.replica_resources)} if cfg.replica_resources else {})},
        placement_group_bundles=bundles,
        placement_group_strategy="STRICT_PACK",
        health_check_period_s=cfg.health_check_period_s,
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
    )
    ingress = serve.deployment(IngressDeployment).options(
        name="OpenAIIngress", num_replicas=cfg.ingress_replicas, max_ongoing_requests=4096,
        ray_actor_options={"num_cpus": 0},
    )
    hub = hub_name_for(cfg)
    return ingress.bind(engine.bind(cfg.engine.model_dump(), hub, cfg.metrics_report_s, cfg.stream_settings(),
                                    cfg.engine_in_process_child),
                        cfg.model_dump(mode="json"), hub)


def build_app(args: Optional[Dict[str, Any]] = None) -> Application:
    """Serve builder: ``serve run serve_app:build_app model=... tp=... min_replicas=...``; raises ValueError
    naming a bad field."""
    return build(parse_app_args(args))

"""The serving application's configuration: one typed object, built from builder args or a Serve config file."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import EngineConfig


class AutoscalingSettings(BaseModel):
    """Replica autoscaling of the engine deployment (Ray Serve's autoscaling_config)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Fewest engine replicas")
    max_replicas: int = Field(2, ge=1, description="Most engine replicas")
    initial_replicas: Optional[int] = Field(None, ge=0, description="Replicas at start; default min_replicas")
    target_ongoing_requests: float = Field(
        32, gt=0, description="Requests in flight per replica the autoscaler aims at (requests)")
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before adding a replica (s)")
    downscale_delay_s: float = Field(300.0, ge=0, description="Load must stay low this long before removing one (s)")
    metrics_interval_s: float = Field(2.0, gt=0, description="How often replicas report their load (s)")
    look_back_period_s: float = Field(10.0, gt=0, description="Window the autoscaler averages load over (s)")

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas: must not exceed max_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("autoscaling.initial_replicas: must lie between min_replicas and max_replicas")
        return self

    def to_serve(self) -> Dict[str, Any]:
        return {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "initial_replicas": self.initial_replicas, "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s, "look_back_period_s": self.look_back_period_s,
        }


class AppConfig(BaseModel):
    """Everything ``build_app`` needs. Engine fields may also be given flat (``model=... tp=...``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    engine: EngineConfig = Field(default_factory=EngineConfig, description="The engine each replica runs")
    served_model_name: Optional[str] = Field(
        None, description="Model id clients send and /v1/models lists; default the model folder's name")
    api_keys: List[str] = Field(
        default_factory=list,
        description="Bearer tokens accepted on /v1 routes; empty = no auth (also read from RAYLM_API_KEYS, comma-separated)")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    max_ongoing_requests: int = Field(128, ge=1, description="Requests one engine replica holds at once")
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests waiting for a replica before new ones are refused; -1 = no limit")
    overload_status: Literal[503, 429] = Field(503, description="HTTP status for a refused (overload) request")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header sent with an overload refusal (s)")
    cpus_per_device: float = Field(1.0, gt=0, description="Logical CPUs reserved per device bundle (per tp worker)")
    replica_cpus: float = Field(1.0, gt=0, description="Logical CPUs of a tp > 1 replica's own bundle (it drives "
                                                      "the workers and holds no device)")
    replica_resources: Dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica's first bundle needs (pins replicas to node types)")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress deployment")
    health_check_period_s: float = Field(10.0, gt=0, description="How often Serve calls check_health (s)")
    graceful_shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On shutdown, how long a replica waits for running requests to finish (s)")
    metrics_report_s: float = Field(0.5, gt=0, description="How often engine replicas publish their stats (s)")
    engine_process: bool = Field(
        True, description="Step the engine in a child process of each replica (its own GIL, away from Ray's "
                          "threads); tp > 1 always steps in the replica, which drives the worker actors")
    stream_interval_s: float = Field(
        0.0, ge=0, le=5, description="Each stream sends at most one message per interval after its first token, "
                                     "carrying every token since the last; 0 = one per engine step (s)")
    stream_messages_per_s: float = Field(
        20.0, ge=0, description="Stream messages per second one replica aims at in all: with N open streams each "
                                "waits at least N / this between messages (bounds the per-token cost of the "
                                "HTTP path under load; at concurrency 1 a message every 50 ms); 0 = no bound")

    @property
    def engine_in_process_child(self) -> bool:
        return self.engine_process and self.engine.tp == 1

    def stream_settings(self) -> Dict[str, float]:
        return {"interval_s": self.stream_interval_s, "messages_per_s": self.stream_messages_per_s}

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v):
        if isinstance(v, str):
            v = [k for k in v.split(",") if k]
        return v

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.engine.model is None:
            return "SmolLM2-135M-Instruct"
        return os.path.basename(os.path.normpath(self.engine.model)) or self.engine.model

    def effective_api_keys(self) -> List[str]:
        env = [k for k in os.environ.get("RAYLM_API_KEYS", "").split(",") if k]
        return list(self.api_keys) + env

    def placement_bundles(self) -> List[Dict[str, float]]:
        """tp = 1: one bundle, the replica and its device. tp > 1: bundle 0 for the replica (scheduler,
        tokenizer, HTTP streams; no device), then one bundle per device for its tp worker actors."""
        gpu = self.engine.device == "cuda"
        device = {"CPU": self.cpus_per_device, **({"GPU": 1.0} if gpu else {})}
        if self.engine.tp == 1:
            bundles = [device]
        else:
            bundles = [{"CPU": self.replica_cpus}] + [dict(device) for _ in range(self.engine.tp)]
        bundles[0].update(self.replica_resources)
        return bundles


_ENGINE_FIELDS = set(EngineConfig.model_fields)
_AUTOSCALING_FIELDS = set(AutoscalingSettings.model_fields)


def parse_app_args(args: Optional[Dict[str, Any]]) -> AppConfig:
    """Builder args (flat strings from ``serve run ... key=value`` or nested YAML) -> AppConfig.

    Flat engine fields (``model``, ``tp``, ``quant_policy``, ...) go into ``engine``; flat autoscaling fields
    (``min_replicas``, ...) into ``autoscaling``. Raises ValueError naming the bad field.
    """
    args = dict(args or {})
    engine = dict(args.pop("engine", None) or {})
    autoscaling = dict(args.pop("autoscaling", None) or {})
    for key in list(args):
        if key in _ENGINE_FIELDS:
            engine[key] = args.pop(key)
        elif key in _AUTOSCALING_FIELDS:
            autoscaling[key] = args.pop(key)
    for k, v in list(engine.items()):
        if v in ("None", "none", "null"):
            engine[k] = None
    try:
        return AppConfig(engine=EngineConfig(**engine), autoscaling=AutoscalingSettings(**autoscaling), **args)
    except ValidationError as e:
        raise ValueError(_describe(e)) from None


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid serving config: " + "; ".join(parts)

"""configs/ and cluster/ files pass Ray's own validation and our typed serving config."""
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from engine.config import EngineConfig
from engine.serve.builder import build
from engine.serve.config import AppConfig, parse_app_args

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIGS = sorted((ROOT / "configs").glob("serve_*.yaml"))
CLUSTER_CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in SERVE_CONFIGS} >= {"serve_default.yaml", "serve_gpu_awq.yaml"}
    assert {p.name for p in CLUSTER_CONFIGS} >= {"aws.yaml", "local.yaml"}


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_validates_with_ray_and_ours(path):
    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)
    for app in raw["applications"]:
        assert app["import_path"] == "serve_app:build_app"
        cfg = parse_app_args(app["args"])
        assert isinstance(cfg, AppConfig)
        build(cfg)  # composes the deployments without starting them


def test_gpu_example_is_tp2_awq_with_int8_kv_and_up_to_4_replicas():
    app = yaml.safe_load((ROOT / "configs" / "serve_gpu_awq.yaml").read_text())["applications"][0]
    cfg = parse_app_args(app["args"])
    assert (cfg.engine.tp, cfg.engine.quant_policy, cfg.engine.device) == (2, 8, "cuda")
    assert (cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas) == (1, 4)
    # the replica's own bundle, then one bundle per GPU for its two worker actors
    assert cfg.placement_bundles() == [{"CPU": 1.0}] + [{"CPU": 4.0, "GPU": 1.0}] * 2


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_launcher_config_passes_ray_validation(path):
    validate_config(prepare_config(yaml.safe_load(path.read_text())))


def test_ray_validation_catches_a_broken_cluster_config():
    bad = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    bad["available_node_types"]["head_cpu"]["resourcez"] = bad["available_node_types"]["head_cpu"].pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(copy.deepcopy(bad)))


@pytest.mark.parametrize("args,field", [
    ({"tp": "0"}, "tp"), ({"bogus": 1}, "bogus"), ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"overload_status": 500}, "overload_status"), ({"max_batch_size": "many"}, "max_batch_size"),
    ({"quant_policy": 3}, "quant_policy"),
])
def test_bad_builder_args_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        parse_app_args(args)


def test_flat_builder_args_are_typed():
    cfg = parse_app_args({"model": "/m", "max_batch_size": "8", "max_replicas": "3", "api_keys": "a,b"})
    assert cfg.engine == EngineConfig(model="/m", max_batch_size=8)
    assert cfg.autoscaling.max_replicas == 3 and cfg.api_keys == ["a", "b"] and cfg.model_name == "m"


def test_valid_config_the_model_cannot_take_fails_at_engine_start():
    from engine.llm_engine import LLMEngine
    with pytest.raises(ValueError, match=r"tp: 4 cannot split 9 attention heads"):
        LLMEngine(EngineConfig(tp=4))  # SmolLM2: 9 heads in 3 KV groups; before any worker starts


def test_quant_job_preset_validates_and_flags_override_it():
    from quant_jobs.cli import options, parser
    ns = parser().parse_args(["auto_awq", "--config", str(ROOT / "configs" / "quant_awq_smollm2.yaml"),
                              "--calib-samples", "8"])
    o = options(ns)
    assert (o.w_group_size, o.calib_samples, o.calib_seqlen, o.model) == (64, 8, 512, None)
    with pytest.raises(ValueError, match="preset for step 'auto_awq', not 'calibrate'"):
        options(parser().parse_args(["calibrate", "--config", str(ROOT / "configs" / "quant_awq_smollm2.yaml")]))

"""KilnConfig: validated once, frozen, KILN_* environment overrides on top of serve args."""

import pytest
from pydantic import ValidationError

from kiln_ray.config import KilnConfig


def test_serve_config_yaml_validates():
    import yaml

    args = yaml.safe_load(open("serve_config.yaml"))["applications"][0]["args"]
    cfg = KilnConfig.from_args(args, env={})
    assert cfg.model == "default" and cfg.engine.max_num_seqs == 64 and cfg.deploy.engine_cpus == 1.0


def test_serve_config_yaml_spells_out_serve_limits_and_health_checks():
    import yaml

    deploy = yaml.safe_load(open("serve_config.yaml"))["applications"][0]["args"]["deploy"]
    shown = ("ingress_max_ongoing_requests", "engine_max_ongoing_requests", "health_check_period_s",
             "health_check_timeout_s")
    assert [k for k in shown if k not in deploy] == []
    # The values shown are the defaults, the ones the README's configuration table gives.
    from kiln_ray.config import DeployConfig

    readme = open("README.md").read()
    for key in shown:
        default = DeployConfig.model_fields[key].default
        assert deploy[key] == default, key
        assert f"| `deploy.{key}` | `KILN_DEPLOY__{key.upper()}` | `{default:g}` |" in readme, key


def test_environment_overrides_file_values_at_any_depth():
    cfg = KilnConfig.from_args(
        {"model": "default", "engine": {"max_num_seqs": 64}},
        env={"KILN_MODEL": "/models/qwen", "KILN_ENGINE__MAX_NUM_SEQS": "8", "KILN_DTYPE": "float32",
             "KILN_UNRELATED_THING": "x", "OTHER": "y"},
    )
    assert cfg.model == "/models/qwen" and cfg.engine.max_num_seqs == 8 and cfg.dtype == "float32"


def test_config_is_frozen_and_strict():
    cfg = KilnConfig.from_args({}, env={})
    with pytest.raises(ValidationError):
        cfg.model = "x"
    with pytest.raises(ValidationError):
        KilnConfig.from_args({"engine": {"max_num_seqz": 3}}, env={})
    with pytest.raises(ValidationError):
        KilnConfig.from_args({}, env={"KILN_ENGINE__BLOCK_SIZE": "zero"})


def test_asking_for_a_gpu_on_a_cluster_without_one_fails_clearly():
    from kiln_ray.app import _wants_gpu

    with pytest.raises(ValueError, match="no GPU"):
        _wants_gpu(KilnConfig.from_args({"device": "cuda"}, env={}))
    assert _wants_gpu(KilnConfig.from_args({"device": "auto"}, env={})) is False
    assert _wants_gpu(KilnConfig.from_args({"device": "cpu"}, env={})) is False


@pytest.mark.parametrize("fraction", [0.7, 0.5, 0.29, 0.9999])
def test_engine_and_trainer_split_one_gpu_and_take_none_without_one(fraction):
    deploy = KilnConfig.from_args({"deploy": {"engine_gpu_fraction": fraction}}, env={}).deploy
    engine, trainer = deploy.gpu_shares(use_gpu=True)
    assert engine == fraction and trainer == pytest.approx(1 - fraction, abs=1e-12)
    assert engine + trainer <= 1 + 1e-12
    assert deploy.gpu_shares(use_gpu=False) == (0.0, 0.0)


def test_readme_documents_every_config_field():
    from kiln_ray.config import DeployConfig, EngineConfig, TrainingConfig

    readme = open("README.md").read()
    sections = {"engine": EngineConfig, "deploy": DeployConfig, "training": TrainingConfig}
    fields = [f"`{n}`" for n in KilnConfig.model_fields if n not in sections]
    fields += [f"`{s}.{n}`" for s, model in sections.items() for n in model.model_fields]
    missing = [f for f in fields if f not in readme]
    assert not missing, f"README configuration table misses {missing}"


def test_a_default_rank_the_engine_cannot_serve_is_refused():
    with pytest.raises(ValueError, match="max_lora_rank"):
        KilnConfig.from_args({"training": {"lora_rank": 64}, "engine": {"max_lora_rank": 32}})
    assert KilnConfig.from_args({"training": {"lora_rank": 64}, "engine": {"max_lora_rank": 64}}).training.lora_rank == 64

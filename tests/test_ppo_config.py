"""`PPOConfig` in sections: sectioned and flat (deprecated) YAML, errors naming section and field,
checkpoints of either layout, and the estimator registry."""

from __future__ import annotations

import typing

import pytest
import yaml

from rlaif.policy_training.config import FLAT_KEYS, SECTIONS, ConfigError, EstimatorConfig, PPOConfig, flatten_saved
from rlaif.policy_training.estimators import ESTIMATORS


def test_sectioned_and_flat_yaml_load_the_same_config(tmp_path):
    sectioned = tmp_path / "s.yaml"
    sectioned.write_text(yaml.safe_dump({"policy": {"model": "default", "max_new_tokens": 32},
                                         "ppo": {"estimator": "grpo", "group_size": 4, "clip_range": 0.1},
                                         "optimizer": {"learning_rate": 2e-6}, "logging": {"output_dir": "runs/x"}}))
    flat = tmp_path / "f.yaml"
    flat.write_text(yaml.safe_dump({"policy": "default", "max_new_tokens": 32, "estimator": "grpo", "group_size": 4,
                                    "clip_range": 0.1, "learning_rate": 2e-6, "output_dir": "runs/x"}))
    with pytest.warns(DeprecationWarning, match="clip_range -> ppo.clip_range"):
        old = PPOConfig.from_yaml(flat)
    assert PPOConfig.from_yaml(sectioned) == old
    assert old.ppo.clip_range == 0.1 and old.policy.model == "default" and old.clip_range == 0.1  # flat reads still work


def test_every_field_has_one_flat_key():
    fields = [(s, f) for s, model in SECTIONS.items() for f in model.model_fields]
    assert sorted(FLAT_KEYS.values()) == sorted(fields), "flat keys must cover every field exactly once"
    assert FLAT_KEYS["policy"] == ("policy", "model")


CONFIG_ERRORS = [
    # out-of-range value inside a section: section.field in the message
    ({"ppo": {"clip_range": 0}}, "ppo.clip_range"),
    # unknown field inside a section: suggestion within the section
    ({"ppo": {"clip_rang": 0.1}}, "did you mean `ppo.clip_range`"),
    # a field in the wrong section: where it belongs
    ({"optimizer": {"clip_range": 0.1}}, "`clip_range` belongs in `ppo`"),
    # the same setting flat and sectioned with different values
    ({"steps": 3, "ppo": {"steps": 4}}, "given twice"),
    # a section that is not a mapping
    ({"reward": "judge"}, "section `reward` must be a mapping"),
    # a check inside one section names it
    ({"reward": {"engine": "default", "judge_url": "http://x"}}, "reward: give one reward source"),
]


@pytest.mark.parametrize("data,message", CONFIG_ERRORS)
def test_config_errors_name_section_and_field(data, message):
    with pytest.raises(ConfigError, match=message):
        PPOConfig.validated(data)


def test_updated_validates_and_checkpoints_of_either_layout_flatten_alike():
    config = PPOConfig(steps=5, estimator="rloo", group_size=2)
    assert config.updated(steps=7).ppo.steps == 7
    with pytest.raises(ConfigError, match="group_size >= 2"):
        config.updated(group_size=1)
    assert flatten_saved(config.model_dump(mode="json")) == config.flat()
    assert flatten_saved(config.flat()) == config.flat()  # a checkpoint written before the sections


def test_every_estimator_choice_is_registered():
    choices = typing.get_args(EstimatorConfig.model_fields["estimator"].annotation)
    assert sorted(choices) == sorted(ESTIMATORS)

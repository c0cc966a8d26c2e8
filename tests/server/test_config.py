"""ServerConfig: defaults < environment < flags, with clear errors."""

import pytest

from facetwin.server.config import ServerConfig


def test_env_then_flags_override_defaults():
    env = {"FACETWIN_MAX_BATCH": "32", "FACETWIN_MODEL_DIR": "/srv/models", "FACETWIN_REFLECTION": "false"}
    config = ServerConfig.from_env(env, max_batch=8)
    assert config.max_batch == 8  # flag wins
    assert config.model_dir == "/srv/models"  # env beats default
    assert config.reflection is False
    assert config.max_delay_ms == ServerConfig().max_delay_ms


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="FACETWIN_MAX_BATCH='lots'"):
        ServerConfig.from_env({"FACETWIN_MAX_BATCH": "lots"})


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match="max_batch"):
        ServerConfig.from_env({}, max_batch=0)

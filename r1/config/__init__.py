"""The one typed config schema (dataclasses registered in Hydra's ConfigStore) and its validation."""

from r1.config.schema import R1Config, register_configs

__all__ = ["R1Config", "register_configs"]

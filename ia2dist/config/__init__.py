"""Typed run configuration: one dataclass per stage, loaded from YAML plus ``key=value`` overrides.

The YAML file is data for these dataclasses; nothing else defines options. ``load_config`` collects
every problem (unknown keys, wrong types, bad values) and raises one ``ConfigError`` listing them all,
each naming the dotted field and the fix.

- ``sections``: the dataclasses (their field docstrings are docs/config.md), the fixed vocabularies
  and the protocol-dependent defaults;
- ``load``: YAML, overrides, protocol defaults, coercion, where each value came from;
- ``sweep``: the hyperparameter grid of a method (``GridPoint``, ``expand_grid``) and label types;
- ``validate``: the semantic checks, one function per section.
"""

from ia2dist.config.load import (apply_overrides, apply_protocol, config_hash, differences,
                                 dump_yaml, load_config, to_dict)
from ia2dist.config.sections import (ADAPTERS, BASELINES, DTYPES, LABEL_METHODS, LABEL_TYPES,
                                     METHODS, PROTOCOL_DEFAULTS, PROTOCOLS, AdapterConfig, CustomTaskConfig,
                                     DataConfig, DistConfig, EvalConfig, ExtractConfig, ModelConfig,
                                     RunConfig, TrainConfig, WandbConfig, protocol_default,
                                     resolve_dtype)
from ia2dist.config.sweep import GridPoint, expand_grid, is_sweep, label_type_for, label_types_for
from ia2dist.config.validate import did_you_mean, unknown_method, validate

__all__ = [
    "ADAPTERS", "BASELINES", "DTYPES", "LABEL_METHODS", "LABEL_TYPES", "METHODS", "PROTOCOLS",
    "PROTOCOL_DEFAULTS", "AdapterConfig", "CustomTaskConfig", "DataConfig", "DistConfig",
    "EvalConfig", "ExtractConfig", "GridPoint", "ModelConfig", "RunConfig", "TrainConfig",
    "WandbConfig", "apply_overrides", "apply_protocol", "config_hash", "did_you_mean",
    "differences", "dump_yaml", "expand_grid", "is_sweep", "label_type_for", "label_types_for",
    "load_config", "protocol_default", "resolve_dtype", "to_dict", "unknown_method", "validate",
]

"""The experiment runner behind `kvjax run CONFIG.yaml`.

  schema.py      YAML -> typed frozen dataclasses; errors name key, value and what is allowed
  config.py      the experiment file layout (top-level keys + one section per kind)
  kinds/         one module per experiment kind (quickstart, cache_vs_nocache, ...)
  experiment.py  runs a validated config into a results folder
  results.py     the results folder: atomic files, metrics JSONL/CSV, summary, COMPLETE marker
  env.py         device selection and the environment record
  models.py      preset shapes with random weights for cost experiments
  plots.py       matplotlib (Agg) helpers
  cli.py         the `kvjax run` subcommand
"""
from .config import RunConfig, load_config, parse_config
from .experiment import RunResult, run_experiment
from .results import is_complete
from .schema import ConfigError

__all__ = ["RunConfig", "load_config", "parse_config", "RunResult", "run_experiment",
           "is_complete", "ConfigError"]

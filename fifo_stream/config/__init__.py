"""Run configuration: a typed schema (:mod:`.schema`), YAML files and ``key=value`` overrides (:mod:`.loading`).

The schema is the one home of every option: its type, its default, what it means and its
constraint. :func:`load_config` checks everything once and fails with one line; the code that
uses an option does not check it again. A YAML config sets a subset of the keys and may name a
parent config with ``defaults:``; the shipped ones live in ``fifo_stream/configs/``
(``configs/`` in the repository).
"""

from .loading import CONFIG_DIR, CONFIG_ENV, DEFAULT_CONFIG, ConfigError, default_config, load_config
from .schema import Config

__all__ = ["CONFIG_DIR", "CONFIG_ENV", "DEFAULT_CONFIG", "Config", "ConfigError", "default_config", "load_config"]

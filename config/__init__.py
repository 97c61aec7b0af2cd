"""Typed settings: TOML file, then ``UNDERSTUDY_*`` environment, then CLI overrides."""

from config.loader import ConfigError, load_settings, resolve_config_path
from config.secrets import MissingSecret, read_secret, register_secret
from config.settings import (
    AccountSettings,
    PriceTable,
    RouterSettings,
    SchedulerSettings,
    Settings,
    StudentSettings,
    TaxonomySettings,
    TeacherSettings,
)

__all__ = [
    "AccountSettings", "ConfigError", "MissingSecret", "PriceTable", "RouterSettings",
    "SchedulerSettings", "Settings", "StudentSettings", "TaxonomySettings", "TeacherSettings",
    "load_settings", "read_secret", "register_secret", "resolve_config_path",
]

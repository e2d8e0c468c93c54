"""Project settings. https://docs.kedro.org/en/stable/kedro_project_setup/settings.html"""

import warnings

from kedro.config import OmegaConfigLoader

from rare_cxr.hooks import ProjectHooks, RunSafetyHooks

HOOKS = (ProjectHooks(), RunSafetyHooks())

# Kedro 1.7's own OmegaConfigLoader calls omegaconf 2.4's deprecated `register_new_resolver`,
# which printed two UserWarnings on every `kedro run` that no user of this project can act on.
# Only that message, and only when Kedro's config loader triggers it, is silenced.
warnings.filterwarnings(
    "ignore",
    message=r"register_new_resolver\(\) is deprecated",
    category=UserWarning,
    module=r"kedro\.config\.omegaconf_config",
)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/nih repeats only the keys that differ from conf/base; "soft" merges them into the
    # base blocks instead of replacing whole top-level keys.
    "merge_strategy": {"parameters": "soft"},
    # every pipeline owns its own catalog_<pipeline>.yml / parameters_<pipeline>.yml
    "config_patterns": {
        "catalog": ["catalog*", "catalog*/**", "**/catalog*"],
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
        "globals": ["globals.yml"],
    },
}

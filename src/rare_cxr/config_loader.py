"""How the project reads its configuration (Kedro's OmegaConfigLoader and its arguments).

In a module of its own so that code which must read the configuration outside a Kedro session
(`rare_cxr.pipeline_registry.project_parameters`, `rare_cxr.runs.run_config`) uses the
project's exact settings without importing `rare_cxr.settings`, which imports the hooks.
"""

from __future__ import annotations

from kedro.config import OmegaConfigLoader

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

"""Project settings. https://docs.kedro.org/en/stable/kedro_project_setup/settings.html"""

import warnings

# CONFIG_LOADER_CLASS and CONFIG_LOADER_ARGS: rare_cxr.config_loader (one place, read by Kedro
# from here and by the code that reads the configuration outside a session)
from rare_cxr.config_loader import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS  # noqa: F401
from rare_cxr.hooks import ProjectHooks, RunSafetyHooks
from rare_cxr.tracking import TrackingHooks
from rare_cxr.tracking.node_stats import NodeStatsHooks

# NodeStatsHooks is inert unless RARE_CXR_NODE_STATS names a file (bench/nih_scale.py sets it).
HOOKS = (ProjectHooks(), RunSafetyHooks(), TrackingHooks(), NodeStatsHooks())

# Experiment tracking is the project's own hook (rare_cxr.tracking says why not kedro-mlflow). If
# kedro-mlflow is installed anyway, its entry-point hook would open a second MLflow store on
# every context and log every run twice: it stays off (its distribution is named kedro_mlflow).
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow", "kedro-mlflow")

# Kedro 1.7's own OmegaConfigLoader calls omegaconf 2.4's deprecated `register_new_resolver`,
# which printed two UserWarnings on every `kedro run` that no user of this project can act on.
# Only that message, and only when Kedro's config loader triggers it, is silenced.
warnings.filterwarnings(
    "ignore",
    message=r"register_new_resolver\(\) is deprecated",
    category=UserWarning,
    module=r"kedro\.config\.omegaconf_config",
)

# Kedro 1.7 reads the fields of the typed parameters it built (rare_cxr.parameters) through the
# instance attribute `model_fields`, which pydantic >= 2.11 deprecates (a warning per parameter
# per run, about Kedro's code). Only that message, only from that Kedro module, is silenced.
warnings.filterwarnings(
    "ignore",
    message=r"Accessing the 'model_fields' attribute on the instance is deprecated",
    module=r"kedro\.validation\.utils",
)

"""The whole configuration, checked at once when a run starts: every parameter block of the
environment, all model namespaces included, whatever pipeline is run.

Kedro validates only the blocks that typed nodes of the selected pipelines read;
`validate_parameters` (called by the project hook `after_context_created`) checks them all, so a
typo anywhere fails in seconds with its full key. This is the one module that knows every
block: the blocks' models live next to the code that reads them, `rare_cxr.parameters` holds
only the shared machinery (so it imports no model or training code), and the roster of models
comes from `rare_cxr.models.roster`.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from rare_cxr.models.roster import is_model_block, roster_from_parameters
from rare_cxr.parameters import ParameterError, check

logger = logging.getLogger(__name__)

# Top-level parameter block -> its model ("module:Class", imported when needed). A pipeline
# that adds a parameter block adds it here; model namespaces (blocks whose `model:` is a spec) are
# recognised by their shape (rare_cxr.models.roster).
BLOCKS: dict[str, str] = {
    "phantom": "rare_cxr.phantom.params:PhantomConfig",
    "data_processing": "rare_cxr.pipelines.data_processing.validation:DataProcessingParams",
    "image_cache": "rare_cxr.image_cache:ImageCacheParams",
    "augmentation": "rare_cxr.augment:AugmentationPolicy",
    "augmentation_preview": "rare_cxr.pipelines.augmentation.nodes:PreviewParams",
    "training": "rare_cxr.training.config:TrainingParams",
    "reporting": "rare_cxr.pipelines.reporting.params:ReportingParams",
    "inference": "rare_cxr.inference.predict:InferenceParams",
}
# Top-level blocks read (and checked) outside the nodes, e.g. by a project hook.
EXTERNAL_BLOCKS: set[str] = {"tracking"}
# Top-level keys given on the command line as shortcuts for a key inside a block (resolved by
# `${runtime_params:...}` in that block): `--params input_dir=...` is `inference.input_dir`.
SHORTCUT_KEYS: dict[str, str] = {"input_dir": "inference.input_dir", "bundle": "inference.bundle"}


def block_model(name: str) -> type[BaseModel]:
    module, _, attribute = BLOCKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def validate_parameters(
    params: Mapping[str, Any], *, allowed: set[str] | frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Check every block of a run's parameters; raise one ParameterError listing every problem.

    Returns `{block: validated model}` plus `"models"`: the validated model roster. `allowed`
    names further top-level keys that are not blocks (e.g. the `globals` keys that
    `--params data_root=...` overrides). A top-level key that is none of these is reported in
    the log (not an error: another pipeline or plugin may read it), naming the closest block.
    """
    problems: list[str] = []
    checked: dict[str, Any] = {}
    for name, value in params.items():
        if name in BLOCKS:
            try:
                checked[name] = check(block_model(name), value, name)
            except ParameterError as error:
                problems.append(str(error))
        elif (
            is_model_block(value)
            or name in allowed
            or name in EXTERNAL_BLOCKS
            or name in SHORTCUT_KEYS
        ):
            continue
        else:
            near = difflib.get_close_matches(name, [*BLOCKS, *params], n=2, cutoff=0.75)
            near = [n for n in near if n != name]
            logger.warning(
                "parameters: top-level key %r is read by no rare-cxr pipeline%s",
                name,
                f" (did you mean {near[0]!r}?)" if near else "",
            )
    try:
        checked["models"] = roster_from_parameters(params)
    except ParameterError as error:
        problems.append(str(error))
    if problems:
        raise ParameterError("invalid parameters:\n" + "\n".join(problems))
    return checked

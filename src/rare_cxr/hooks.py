"""Project hooks: keep torch polite on small machines and the logs readable."""

from __future__ import annotations

import logging
import os

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)


class ProjectHooks:
    @hook_impl
    def after_context_created(self, context) -> None:
        # torch spawns one thread per core by default; RARE_CXR_THREADS lets a shared
        # machine (CI, a laptop) cap it without editing configuration.
        threads = os.environ.get("RARE_CXR_THREADS")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        logger.debug("rare-cxr context created for env %r", context.env)

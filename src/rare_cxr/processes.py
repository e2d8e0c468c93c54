"""Worker processes that never outlive the run that started them."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(poll_s: float = 0.5) -> None:
    """End this worker process soon after its parent dies (`kill -9`, OOM killer).

    Why: the workers of a process pool wait on a queue whose other end their siblings keep
    open, so a pool whose parent was killed lives on as orphans, decoding into a staging folder
    nobody will use. A daemon thread polls the parent's pid (Linux's PR_SET_PDEATHSIG would fire
    when the *thread* that forked the worker ends, which under Kedro's async saving is a pool
    thread, not the process).
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(70)  # EX_SOFTWARE: nothing to flush, the work is abandoned

    threading.Thread(target=watch, name="rare-cxr-exit-with-parent", daemon=True).start()

"""A trainer process for daemon tests: saves through its node's ckptd, then waits to be killed.

Run as ``python daemon_trainer.py RANK WORLD PORT ROOT STEP STAGE``, with ``CKPTD_SOCKET``
(and ``CKPTD_JOB_TOKEN``) in the environment. Joins a gloo group through
``tcp://127.0.0.1:PORT``, saves the ZeRO state of tests/test_multiproc_layouts.py with
``blocking=False``, waits until the daemon holds it (``daemon_wait="staged"``), prints
``SAVED <step>`` and sleeps: the test SIGKILLs it, as a crash would.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    rank, world, port, root, step, stage = sys.argv[1:7]
    import torch.distributed as dist
    from test_multiproc_layouts import _zero_state

    import ckpt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank),
                            world_size=int(world), timeout=datetime.timedelta(seconds=60))
    ckpt.configure(daemon_wait=os.environ.get("CKPT_DAEMON_WAIT", "staged"))
    state, layout, _ = _zero_state(int(stage), int(rank), int(world), load=False)
    h = ckpt.save(state, int(step), root, blocking=False, layout=layout)
    h.wait(timeout=60)
    print(f"SAVED {step} stall={h.stall_s:.4f}", flush=True)
    time.sleep(600)  # killed by the test long before


if __name__ == "__main__":
    main()

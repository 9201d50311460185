"""A step only the main process runs (a Laplace fit, a TFB search) may outlast the process
group's timeout without ending the launch: ``on_main(..., patient=True)``.

Two processes on gloo, the default group's timeout cut to 2 s, the main one's step taking 5 s.
Waited for patiently, both get the step's result, and an error of the step reaches both;
waited for on the default group (as the composite's barrier did), the other process times out.
One launch runs the three cases in that order (the last breaks the group): spawning costs
several seconds a launch.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch.multiprocessing as mp

GROUP_TIMEOUT_S = 2
STEP_S = 5
#: (patient, the step fails)
CASES = ((True, False), (True, True), (False, False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    from accelerate import PartialState

    from blob_lora.training.distributed import on_main
    from blob_lora.utils.errors import ConfigError

    state = PartialState(cpu=True, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    outcomes = []
    for patient, fail in CASES:

        def step(fail: bool = fail) -> dict[str, int]:
            time.sleep(STEP_S)
            if fail:
                raise ConfigError("the fit found no curvature")
            return {"fitted": 7}

        try:
            outcomes.append(["ok", on_main(state, step, patient=patient)])
        except Exception as exc:  # the outcome is what the test reads
            outcomes.append(["error", type(exc).__name__, str(exc)[:300]])
    Path(out, f"{rank}.json").write_text(json.dumps(outcomes))
    os._exit(0)  # no teardown: the last case left the default group timed out


def test_a_long_main_step_outlasts_the_group_timeout_only_when_waited_for_patiently(
    tmp_path,
) -> None:
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    main, other = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    # patient: the result reaches both, and so does the step's error
    assert main[0] == other[0] == ["ok", {"fitted": 7}]
    assert main[1] == other[1] == ["error", "ConfigError", "the fit found no curvature"]
    # on the default group: the group's timeout ends the other's wait (the main process then
    # finds its peer gone)
    assert other[2][0] == "error" and "timed out" in other[2][2].lower()

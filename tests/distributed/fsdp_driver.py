"""Run ``blob-lora`` commands in a process launched by ``accelerate launch``, under FSDP2 on CPU.

Why this driver: Accelerate turns on FSDP only for GPU-class launches. In
``accelerate/state.py`` the ``ACCELERATE_USE_FSDP`` switch sits inside the branch for
``MULTI_GPU``/``MULTI_NPU``/... distributed types, so on a CPU machine
``ACCELERATE_USE_CPU=1 accelerate launch --use_fsdp --fsdp_version 2`` starts
``DistributedType.MULTI_CPU`` (plain data parallelism, the FSDP request silently dropped;
``blob-lora train`` refuses that launch) and without ``ACCELERATE_USE_CPU`` every process
runs alone (``DistributedType.NO``). PyTorch's FSDP2 itself (``fully_shard``, DTensor,
all-gather and reduce-scatter over gloo) runs on CPU, so this driver initialises Accelerate's
shared state once, as ``--multi_gpu`` under ``ACCELERATE_USE_CPU=1`` does, and switches it to
FSDP2 before the CLI runs. Every ``Accelerator`` the trainer then creates shares that state, and
the model is prepared by Accelerate's own FSDP2 path (``fsdp2_prepare_model``: ``fully_shard``
per decoder block, the embedding, the head and the root). Nothing of blob-lora is patched.

``python -m accelerate.commands.launch --multi_gpu ... fsdp_driver.py ARGS.json`` runs every
argument list in ARGS.json with ``blob_lora.cli.main.main`` in turn (as ``launch_driver.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def force_fsdp2_on_cpu() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    Accelerator()  # initialises the shared state: MULTI_CPU over gloo
    assert PartialState().distributed_type == DistributedType.MULTI_CPU
    # every AcceleratorState() re-reads the distributed type from PartialState's shared state
    PartialState().distributed_type = DistributedType.FSDP
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    if AcceleratorState().mixed_precision != "no":  # as Accelerate's own FSDP set-up does
        plugin.set_mixed_precision(AcceleratorState().mixed_precision)
    AcceleratorState().fsdp_plugin = plugin
    assert Accelerator().is_fsdp2


if __name__ == "__main__":
    force_fsdp2_on_cpu()
    from blob_lora.cli.main import main

    for argv in json.loads(Path(sys.argv[1]).read_text()):
        rc = main(argv)
        if rc:
            sys.exit(rc)

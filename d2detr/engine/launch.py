"""Multi-process launch for CUDA (Detectron2's ``launch``) and for CPU (gloo).

Detectron2's :func:`detectron2.engine.launch` picks NCCL whenever CUDA is visible
and binds every worker to a GPU, so it cannot run several CPU workers on a machine
that has (fewer) GPUs. :func:`launch` here takes the device explicitly: with
``device="cpu"`` it starts ``num_gpus_per_machine`` CPU processes joined by gloo,
otherwise it defers to Detectron2.
"""
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as _d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm

__all__ = ["launch", "DEFAULT_TIMEOUT"]


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "cuda",
):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each machine.

    Args:
        main_func: picklable function, called as ``main_func(*args)`` in every worker.
        num_gpus_per_machine: worker processes per machine (GPUs on CUDA, processes on CPU).
        num_machines, machine_rank, dist_url, timeout: as in Detectron2's ``launch``;
            ``dist_url="auto"`` picks a free local port (single machine only).
        device: ``"cpu"`` starts CPU workers that talk over gloo; anything else
            (``"cuda"``, ``"cuda:0"``) uses :func:`detectron2.engine.launch` (NCCL).
    """
    if not str(device).startswith("cpu"):
        return _d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto is not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if dist_url is None:
        raise ValueError("launch: dist_url is required for multi-process training")
    mp.start_processes(
        _distributed_cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _distributed_cpu_worker(
    local_rank, main_func, world_size, num_procs_per_machine, machine_rank, dist_url, args, timeout
):
    global_rank = machine_rank * num_procs_per_machine + local_rank
    # Share the machine's cores among the workers instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_procs_per_machine))
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logging.getLogger(__name__).error("Process group URL: {}".format(dist_url))
        raise
    comm.create_local_process_group(num_procs_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()

"""Start one training process per device with torch.distributed: NCCL on GPUs (gloo where torch has
no NCCL, as on Windows), gloo on CPU-only machines.

detectron2 0.6's ``launch`` hard-codes the NCCL backend and asserts CUDA, so multi-process training
could not run on a CPU machine at all. This keeps its interface (``num_gpus_per_machine`` is "processes
per machine" on CPU) and its conventions (``dist_url="auto"``, a per-machine local process group that
``detectron2.utils.comm.get_local_rank`` uses).

An exception in a worker process reaches the launching process as the exception itself (when it can
be pickled), chained to torch's ``ProcessRaisedException`` that carries the worker's traceback text,
so the command line reports a worker's bad input or divergence the same way as in a one-process run.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm

logger = logging.getLogger(__name__)


class LaunchError(ValueError):
    """A process layout that cannot start (too few GPUs, "auto" URL across machines...)."""


def choose_backend(device: str, processes_per_machine: int) -> str:
    """ "nccl" for a CUDA ``MODEL.DEVICE`` (one GPU per process), "gloo" for the CPU.

    torch builds without NCCL (all Windows builds) use gloo for the GPUs too: it all-reduces CUDA
    tensors, which is what DDP needs. Too few GPUs for a CUDA run is an error, not a silent CPU run.
    """
    if not device.startswith("cuda"):
        return "gloo"
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if processes_per_machine > available:
        raise LaunchError(
            f"--num-gpus {processes_per_machine} but only {available} GPU(s) are visible on this machine; "
            "set MODEL.DEVICE cpu to run that many gloo processes on the CPU"
        )
    return "nccl" if dist.is_nccl_available() else "gloo"


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "cuda",
) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines`` machines.

    With a world size of 1 it is a plain call in this process. ``dist_url`` is a torch.distributed init
    URL (``tcp://host:port``); "auto" picks a free local port (single machine only). ``device`` is the
    config's ``MODEL.DEVICE``: it decides between NCCL (cuda) and gloo (cpu).
    """
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise LaunchError(
            f"--num-gpus ({num_gpus_per_machine}) and --num-machines ({num_machines}) must be >= 1"
        )
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise LaunchError(
                "--dist-url auto only works on one machine; give tcp://<machine 0 address>:<port>"
            )
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    backend = choose_backend(device, num_gpus_per_machine)
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(
            _distributed_worker,
            nprocs=num_gpus_per_machine,
            args=(
                main_func,
                backend,
                device.startswith("cuda"),
                world_size,
                num_gpus_per_machine,
                machine_rank,
                dist_url,
                tuple(args),
                timeout,
                errors,
            ),
            daemon=False,
        )
    except mp.ProcessRaisedException as failure:
        # The first worker to fail is the cause; the others failed or were stopped because of it.
        first = _first_forwarded(errors)
        if first is None:
            raise
        raise first from failure


def _first_forwarded(errors: Any) -> BaseException | None:
    """The first exception a worker put on ``errors``; None if none was sent or it is unreadable."""
    try:
        return None if errors.empty() else errors.get()
    except Exception:
        return None


def _distributed_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    backend: str,
    cuda: bool,
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: Sequence[Any],
    timeout: timedelta,
    errors: Any,
) -> None:
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    if cuda:
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Processes on one machine share its cores; without this each would start a thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_gpus_per_machine))
    try:
        dist.init_process_group(
            backend=backend,
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error(
            f"Process group URL: {dist_url} (backend {backend}, rank {global_rank}/{world_size})"
        )
        raise
    num_machines = world_size // num_gpus_per_machine
    for i in range(num_machines):
        ranks = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    # A barrier right after init avoids a timeout on the first real collective (maskrcnn-benchmark#172).
    comm.synchronize()
    try:
        main_func(*args)
        # Tear down together: a process that destroys its group while another still runs its last
        # collectives or main-process-only work can abort the other's gloo threads (seen as
        # "terminate called without an active exception" on detectron2 main).
        comm.synchronize()
    except Exception as error:
        try:
            errors.put(error)
        except Exception:
            pass  # not picklable: the launching process reports torch's ProcessRaisedException
        raise
    finally:
        dist.destroy_process_group()

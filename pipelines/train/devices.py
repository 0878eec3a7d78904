"""Where a Horovod worker computes: its share of the machine's cores (or its GPU), and the dtype policy."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass


def cores_per_worker(cores: int, workers_here: int, bound: bool) -> int:
    """The cores one worker has to itself: all of its own group when bound, else an equal split of the machine's."""
    return max(1, cores if bound else cores // max(1, workers_here))


def reader_threads(configured: int, own_cores: int) -> int:
    """petastorm reader threads for one worker: as configured, or (0) the cores the worker has to itself."""
    return configured if configured > 0 else own_cores


def core_group(allowed: list[int], local_rank: int, local_size: int) -> list[int]:
    """This worker's share of the cores it may run on: near-equal contiguous groups by local rank, or one core
    shared round-robin when the workers on this machine outnumber its cores."""
    cores = sorted(allowed)
    if local_size <= 1:
        return cores
    if local_size > len(cores):
        return [cores[local_rank % len(cores)]]
    n = len(cores)
    return cores[local_rank * n // local_size:(local_rank + 1) * n // local_size]


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def precision_policy(setting: str, has_gpu: bool, cpu_amx: bool) -> str:
    """The Keras dtype policy for `train.mixed_precision`. `auto`: float16 compute on a GPU, bfloat16 on a CPU with
    AMX (the only CPUs where it is faster than float32), float32 elsewhere; `on`: float16 on a GPU, bfloat16 on any
    CPU (float16 is emulated on CPUs); `float16`/`bfloat16` as named; `off`: float32."""
    if setting in ("float16", "bfloat16"):
        return f"mixed_{setting}"
    if setting == "off" or (setting == "auto" and not has_gpu and not cpu_amx):
        return "float32"
    return "mixed_float16" if has_gpu else "mixed_bfloat16"


def policy_setting(policy: str) -> str:
    """The `train.mixed_precision` value that names one resolved policy on any machine."""
    return {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16", "float32": "off"}[policy]


def _thread_ids() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]


def bind_to_cores(cores: list[int]) -> None:
    """Restrict every thread of this process (and so every thread it starts later) to `cores`."""
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # a thread that ended meanwhile
            pass


def process_cores() -> list[int]:
    """Every core some thread of this process may run on."""
    cores: set[int] = set()
    for tid in _thread_ids():
        try:
            cores |= os.sched_getaffinity(tid)
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(cores)


@dataclass(frozen=True)
class Devices:
    """What a worker computes with: the resolved dtype policy and the cores it has to itself."""
    policy: str
    own_cores: int


def setup_devices(hvd, mixed_precision: str, bind_cores: bool) -> Devices:
    """GPU pinning or CPU core split, then the global Keras dtype policy."""
    import tensorflow as tf
    import tf_keras as keras

    cores = sorted(os.sched_getaffinity(0))
    if bind_cores:
        # Horovod: like `mpirun --bind-to core`, each worker on this machine keeps to its own cores, so workers do
        # not migrate between cores and evict each other's caches.
        cores = core_group(cores, hvd.local_rank(), hvd.local_size())
        bind_to_cores(cores)
    # Horovod: workers sharing one machine split its cores instead of each grabbing all of them.
    own_cores = cores_per_worker(len(cores), hvd.local_size(), bind_cores)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        # Horovod: pin one GPU per worker, chosen by the worker's rank on this machine.
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        tf.config.experimental.set_memory_growth(gpus[hvd.local_rank() % len(gpus)], True)
    else:
        tf.config.threading.set_intra_op_parallelism_threads(own_cores)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    flags = cpu_flags()
    policy = precision_policy(mixed_precision, bool(gpus), "amx_bf16" in flags)
    if policy == "mixed_bfloat16" and not gpus and not {"amx_bf16", "avx512_bf16"} & flags:
        print("train.mixed_precision: this CPU has no bfloat16 instructions (AMX, AVX512-BF16); bfloat16 will be "
              "emulated and slower than float32", file=sys.stderr)
    keras.mixed_precision.set_global_policy(policy)
    return Devices(policy, own_cores)

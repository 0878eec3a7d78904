"""A worker's share of the cores and its dtype policy."""
import os

from pipelines.train.devices import (bind_to_cores, core_group, cores_per_worker, policy_setting, precision_policy,
                                     process_cores, reader_threads)


def test_reader_threads_split_the_cores_between_workers_on_one_machine():
    assert reader_threads(0, cores_per_worker(2, workers_here=2, bound=False)) == 1
    assert reader_threads(0, cores_per_worker(16, workers_here=4, bound=False)) == 4
    assert reader_threads(0, cores_per_worker(2, workers_here=4, bound=False)) == 1
    assert reader_threads(3, cores_per_worker(2, workers_here=2, bound=False)) == 3
    # bound: the worker's own core group (already its share) is all its own
    assert reader_threads(0, cores_per_worker(3, workers_here=2, bound=True)) == 3


def test_precision_policy_follows_the_device():
    assert precision_policy("auto", has_gpu=True, cpu_amx=True) == "mixed_float16"
    assert precision_policy("auto", has_gpu=False, cpu_amx=True) == "mixed_bfloat16"  # AMX: bfloat16 matrix units
    assert precision_policy("auto", has_gpu=False, cpu_amx=False) == "float32"
    assert precision_policy("on", has_gpu=True, cpu_amx=False) == "mixed_float16"
    assert precision_policy("on", has_gpu=False, cpu_amx=False) == "mixed_bfloat16"  # float16 is emulated on CPUs
    assert precision_policy("bfloat16", has_gpu=True, cpu_amx=False) == "mixed_bfloat16"
    assert precision_policy("float16", has_gpu=False, cpu_amx=True) == "mixed_float16"
    assert precision_policy("off", has_gpu=True, cpu_amx=True) == "float32"


def test_a_resolved_policy_resolves_to_itself_on_any_hardware():
    """What a resume relies on to keep a checkpoint's precision wherever it runs."""
    for policy in ("mixed_float16", "mixed_bfloat16", "float32"):
        for gpu, amx in ((True, True), (True, False), (False, True), (False, False)):
            assert precision_policy(policy_setting(policy), has_gpu=gpu, cpu_amx=amx) == policy


def test_core_groups_split_the_allowed_cores_without_overlap():
    assert core_group([0, 1], 0, 2) == [0] and core_group([0, 1], 1, 2) == [1]
    groups = [core_group([4, 5, 6, 7, 8], r, 2) for r in range(2)]
    assert groups == [[4, 5], [6, 7, 8]]  # every allowed core used, none twice
    assert core_group([3, 1, 2, 0], 0, 1) == [0, 1, 2, 3]
    # more workers than cores: one core each, shared round-robin
    assert [core_group([0, 1], r, 4) for r in range(4)] == [[0], [1], [0], [1]]




def test_binding_keeps_every_thread_of_the_process_to_its_cores():
    import threading

    allowed = sorted(os.sched_getaffinity(0))
    started, stop = threading.Event(), threading.Event()

    def idle():
        started.set()
        stop.wait(10)

    thread = threading.Thread(target=idle, daemon=True)
    thread.start()
    started.wait(5)
    try:
        bind_to_cores(allowed[:1])
        assert process_cores() == allowed[:1]  # the thread started before binding too
    finally:
        stop.set()
        bind_to_cores(allowed)
    assert process_cores() == allowed

"""Feature workers follow the CPUs a pod may use (its cgroup quota), not the node's core count."""

import os

from cosyvoice.features.extract import default_workers


def test_a_cgroup_cpu_limit_bounds_the_default_worker_count(tmp_path):
    cores = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a 1.5-CPU limit
    assert default_workers(str(quota)) == 1
    quota.write_text(f"{(cores + 8) * 100000} 100000\n")  # a limit above the cores this process has
    assert default_workers(str(quota)) == cores
    quota.write_text("max 100000\n")  # no limit
    assert default_workers(str(quota)) == cores
    assert default_workers(str(tmp_path / "absent")) == cores  # cgroup v1 or no /sys: the affinity

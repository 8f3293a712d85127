"""The training queue's order: fair across tenants."""

from loraplex.train.jobs import TrainingJobs


def test_a_tenants_second_job_waits_behind_other_tenants_first(tmp_path):
    jobs = TrainingJobs(tmp_path, "unused", max_running=0)  # no worker: the order alone
    for tenant, n in [("acme", 1), ("acme", 2), ("acme", 3), ("beta", 1), ("gamma", 1),
                      ("beta", 2)]:
        jobs.start(tenant, dataset="d", adapter="a", actor="t", job_id=f"{tenant}-{n}")
    with jobs._lock:
        order = [jobs._next_job().id for _ in range(6)]
    assert order == ["acme-1", "beta-1", "gamma-1", "acme-2", "beta-2", "acme-3"]
    # A tenant that arrives later still goes before one served already.
    jobs.start("acme", dataset="d", adapter="a", actor="t", job_id="acme-4")
    jobs.start("delta", dataset="d", adapter="a", actor="t", job_id="delta-1")
    with jobs._lock:
        assert [jobs._next_job().id for _ in range(2)] == ["delta-1", "acme-4"]

"""The soak's short version (python -m loraplex.faults soak runs the long one): a real server,
mixed requests, hang-ups and deployment changes under load; nothing lost or mis-attributed."""

from loraplex.faults.client import Answer
from loraplex.faults.soak import MAX_TOKENS, Deployments, SoakReport, _check, run_soak


def test_a_short_soak_loses_nothing(fault_model, tmp_path):
    report = run_soak(tmp_path, num_requests=160, num_tenants=8, concurrency=16,
                      change_every_s=0.3, model_dir=fault_model)
    print({k: v for k, v in report.as_dict().items() if k != "engine_end"})
    assert report.failures == [] and report.lost == 0 and report.misattributed == 0
    assert report.checked + report.hung_up == report.requests
    assert report.promotions + report.rollbacks > 0 and report.hung_up > 0
    assert report.distinguishable >= 0.5  # else a wrong version could pass unseen
    assert report.engine_idle, report.engine_end
    assert report.rss_end_mib - report.rss_warm_mib <= report.rss_bound_mib
    assert report.ok


def test_the_checker_catches_a_wrong_version_and_a_short_answer():
    """The soak's check can fail: a v2 answer when only v1 was live, and a cut answer."""
    refs = {("t00", v, "chat", "Hi!"): [f"{v}-{i}" for i in range(MAX_TOKENS)]
            for v in ("v1", "v2")}
    deployments = Deployments({"t00": [(10.0, 11.0, "v2")]})
    assert deployments.allowed("t00", 0.0, 5.0) == {"v1"}
    assert deployments.allowed("t00", 9.0, 10.5) == {"v1", "v2"}
    assert deployments.allowed("t00", 12.0, 13.0) == {"v2"}
    spec = {"tenant": "t00", "endpoint": "chat", "prompt": "Hi!", "max_tokens": 4,
            "stream": True, "hang_up_after": None}
    report = SoakReport(1, 3, 0)
    _check(Answer(200, "v1", refs[("t00", "v1", "chat", "Hi!")][:4], True), spec, 0, 5,
           refs, deployments, report)
    _check(Answer(200, "v2", refs[("t00", "v2", "chat", "Hi!")][:4], True), spec, 0, 5,
           refs, deployments, report)
    _check(Answer(200, "v1", refs[("t00", "v1", "chat", "Hi!")][:3], True), spec, 0, 5,
           refs, deployments, report)
    assert (report.checked, report.misattributed, report.lost) == (2, 1, 1)

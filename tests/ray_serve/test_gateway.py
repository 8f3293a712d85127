"""The gateway's merge of its replicas' engine stats (no Ray instance needed)."""

import pytest

from loraplex.ray_serve.gateway import _combine

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")


def test_a_tenants_fair_share_standing_adds_up_over_the_replicas():
    one = {"running": 3, "waiting": 1, "fairness": {
        "acme": {"counter": 100.0, "weight": 2.0, "sequences": 3, "running": 2},
        "globex": {"counter": 40.0, "weight": 1.0, "sequences": 1, "running": 1}}}
    two = {"running": 1, "waiting": 0, "fairness": {
        "acme": {"counter": 10.0, "weight": 2.0, "sequences": 1, "running": 1}}}
    combined = _combine([one, two])
    assert combined["running"] == 4 and combined["waiting"] == 1
    assert combined["fairness"] == {
        "acme": {"counter": 110.0, "weight": 2.0, "sequences": 4, "running": 3},
        "globex": {"counter": 40.0, "weight": 1.0, "sequences": 1, "running": 1}}
    assert combined["replicas"] == [one, two]

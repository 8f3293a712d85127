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


def test_a_tenants_prefix_cache_lookups_add_up_over_the_replicas():
    one = {"prefix_cache_blocks": 5, "prefix_cache": {
        "acme": {"queried_tokens": 100, "hit_tokens": 60, "hit_rate": 0.6}}}
    two = {"prefix_cache_blocks": 2, "prefix_cache": {
        "acme": {"queried_tokens": 100, "hit_tokens": 0, "hit_rate": 0.0},
        "globex": {"queried_tokens": 10, "hit_tokens": 8, "hit_rate": 0.8}}}
    combined = _combine([one, two])
    assert combined["prefix_cache_blocks"] == 7
    assert combined["prefix_cache"] == {
        "acme": {"queried_tokens": 200, "hit_tokens": 60, "hit_rate": 0.3},
        "globex": {"queried_tokens": 10, "hit_tokens": 8, "hit_rate": 0.8}}

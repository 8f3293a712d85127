"""Quotas and tiers in the registry: defaults, partial changes, refusals, audit."""

import pytest

from loraplex.registry import InvalidInput, NotFound
from loraplex.registry.quotas import Quota


def test_a_new_tenant_has_tier_1_and_no_limits(registry, acme):
    assert registry.get_quota("acme") == Quota()


def test_changes_merge_and_none_lifts_a_limit(registry, acme):
    registry.set_quota("acme", actor="op", requests_per_minute=60, tier=2)
    quota = registry.set_quota("acme", actor="op", tokens_per_minute=1000)
    assert quota == Quota(tier=2.0, requests_per_minute=60, tokens_per_minute=1000)
    assert registry.set_quota("acme", actor="op", requests_per_minute=None).requests_per_minute \
        is None
    assert registry.quota_of(acme.id) == registry.get_quota("acme")
    actions = [e.action for e in registry.audit_log(tenant="acme")]
    assert actions.count("tenant.quota") == 3


@pytest.mark.parametrize("changes, field", [
    ({"tier": 0}, "tier"), ({"tier": -1}, "tier"), ({"tier": float("nan")}, "tier"),
    ({"tier": None}, "tier"), ({"tier": True}, "tier"), ({"tier": 1e9}, "tier"),
    ({"requests_per_minute": 0}, "requests_per_minute"),
    ({"tokens_per_minute": 1.5}, "tokens_per_minute"),
    ({"monthly_tokens": "lots"}, "monthly_tokens"),
    ({"max_concurrent": False}, "max_concurrent"),
    ({"colour": 3}, "colour"),
])
def test_bad_values_are_refused_by_name_and_change_nothing(registry, acme, changes, field):
    registry.set_quota("acme", actor="op", requests_per_minute=5)
    with pytest.raises(InvalidInput, match=field):
        registry.set_quota("acme", actor="op", **changes)
    assert registry.get_quota("acme") == Quota(requests_per_minute=5)


def test_unknown_tenant(registry):
    with pytest.raises(NotFound):
        registry.set_quota("nobody", actor="op", tier=2)
    with pytest.raises(NotFound):
        registry.get_quota("nobody")

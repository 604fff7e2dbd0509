"""Weighted sticky A/B assignment."""
from __future__ import annotations

import pytest

from serve.decisions.router_config import RouterSettings
from serve.decisions.routing import Router, RoutingConfig


def test_sticky_users_keep_their_variant_and_split_follows_weights():
    router = Router(RoutingConfig({"dense": 1.0, "pruned": 1.0}))
    first = {f"user-{i}": router.choose(f"user-{i}")[0] for i in range(2000)}
    again = {f"user-{i}": Router(RoutingConfig({"pruned": 1, "dense": 1})).choose(f"user-{i}")[0] for i in range(2000)}
    assert first == again  # stable across processes and dict order
    share = sum(v == "pruned" for v in first.values()) / 2000
    assert abs(share - 0.5) < 3 * (0.25 / 2000) ** 0.5 + 0.01
    skewed = Router(RoutingConfig({"dense": 9.0, "pruned": 1.0}))
    share = sum(skewed.choose(f"user-{i}")[0] == "pruned" for i in range(4000)) / 4000
    assert abs(share - 0.1) < 0.02


def test_zero_weight_variant_gets_nothing_unless_the_other_is_down():
    router = Router(RoutingConfig({"dense": 1.0, "pruned": 0.0}))
    assert {router.choose(f"u{i}")[0] for i in range(200)} == {"dense"}
    variant, fallback = router.choose("u1", down=frozenset({"dense"}))
    assert (variant, fallback) == ("pruned", True)


def test_fallback_when_a_variant_is_down():
    router = Router(RoutingConfig({"dense": 1.0, "pruned": 1.0}))
    users = [f"user-{i}" for i in range(100)]
    assigned = {u: router.choose(u)[0] for u in users}
    for user in users:
        variant, fallback = router.choose(user, down=frozenset({"pruned"}))
        assert variant == "dense"
        assert fallback == (assigned[user] == "pruned")


def test_changing_the_salt_reshuffles_users():
    a = Router(RoutingConfig({"dense": 1, "pruned": 1}, salt="a"))
    b = Router(RoutingConfig({"dense": 1, "pruned": 1}, salt="b"))
    assert sum(a.choose(f"u{i}")[0] != b.choose(f"u{i}")[0] for i in range(400)) > 100


def test_bad_weights_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown variants"):
        RouterSettings.model_validate({"weights": {"dense": 1, "sparse": 1}}).check_variants(["dense", "pruned"])
    with pytest.raises(ValueError, match=">= 0"):
        RoutingConfig({"dense": -1.0})
    with pytest.raises(ValueError, match="must be > 0"):
        RoutingConfig({"dense": 0.0, "pruned": 0.0})


def test_router_settings_refuse_typos_and_contradictions():
    with pytest.raises(ValueError, match="sample_rte"):
        RouterSettings.model_validate({"quality": {"sample_rte": 0.5}})
    with pytest.raises(ValueError, match="canary sets the weights"):
        RouterSettings.model_validate({"weights": {"dense": 1}, "canary": {}})
    with pytest.raises(ValueError, match="rise strictly"):
        RouterSettings.model_validate({"canary": {"steps": [0.5, 0.25]}})
    with pytest.raises(ValueError, match="unknown variants"):
        RouterSettings.model_validate({"canary": {"variant": "sparse"}}).check_variants(["dense", "pruned"])
    with pytest.raises(ValueError, match="quality reference"):
        RouterSettings.model_validate({"canary": {"variant": "dense", "baseline": "pruned"}})
    assert RouterSettings.model_validate({"shadow": True}).quality_rate() == 1.0


@pytest.mark.parametrize("settings, message", [
    ({"weights": {"dense": -1, "pruned": 1}}, "weights must be >= 0"),
    ({"weights": {"dense": 0, "pruned": 0}}, "all 0"),
    ({"weights": {"dense": float("nan")}}, "finite number"),
    ({"canary": {"gates": {"max_quality_gap": float("nan")}}}, "finite number"),
    ({"tick_s": float("inf")}, "finite number"),
])
def test_router_settings_refuse_negative_zero_and_non_finite_numbers(settings, message):
    """What `serve deploy` reads from deploy/serve.yaml: the same rules serve.local's CLI applies."""
    with pytest.raises(ValueError, match=message):
        RouterSettings.model_validate(settings)

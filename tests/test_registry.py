"""A name is registered once (as verl's ``register_adv_est``): another object under a taken name raises
``ValueError`` naming the registry and the name; the same definition again (the same object, an equal value,
a function re-created by reloading its module) replaces the entry."""

from __future__ import annotations

import importlib
import sys

import pytest

from grpo_lab.advantages import ADVANTAGES, register_advantage
from grpo_lab.rewards.scoring import REWARDS, exact_match, register_reward
from grpo_lab.system.registry import register, registrar


def test_a_second_object_under_a_taken_name_raises_and_the_first_stays():
    registry: dict = {}
    register_thing = registrar(registry, "thing")

    @register_thing("a")
    def first(x):
        return x

    def second(x):
        return -x

    with pytest.raises(ValueError, match=r"^thing 'a' is already registered by "
                                         r"tests\.test_registry\.[\w.<>]*first: register the new thing under "
                                         r"another name$"):
        register_thing("a")(second)
    assert registry == {"a": first}
    assert register_thing("b")(second) is second and registry == {"a": first, "b": second}


def test_the_same_object_or_an_equal_value_again_is_no_clash():
    registry: dict = {}

    def f(x):
        return x

    assert register(registry, "f", f, "thing") is f
    assert register(registry, "f", f, "thing") is f
    register(registry, "v", (1, 2), "thing")
    register(registry, "v", (1, 2), "thing")  # equal: a reloaded module's frozen dataclass compares equal
    with pytest.raises(ValueError, match="thing 'v' is already registered: "):
        register(registry, "v", (1, 3), "thing")
    assert registry == {"f": f, "v": (1, 2)}


def test_two_lambdas_are_two_definitions():
    registry: dict = {}
    register(registry, "l", lambda x: x, "thing")
    with pytest.raises(ValueError, match="thing 'l' is already registered"):
        register(registry, "l", lambda x: x, "thing")


def test_reloading_the_module_that_registers_replaces_its_entries(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_reload.py").write_text(
        "from grpo_lab.rewards.scoring import register_reward\n"
        "@register_reward('_test_reloaded')\n"
        "def score(completions, **_):\n"
        "    return [1.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("my_rewards_reload")
        before = REWARDS["_test_reloaded"]
        (tmp_path / "my_rewards_reload.py").write_text(
            "from grpo_lab.rewards.scoring import register_reward\n"
            "@register_reward('_test_reloaded')\n"
            "def score(completions, **_):\n"
            "    return [2.0] * len(completions)\n"
        )
        importlib.invalidate_caches()
        reloaded = importlib.reload(module)
        assert REWARDS["_test_reloaded"] is reloaded.score is not before
        assert REWARDS["_test_reloaded"](["x"]) == [2.0]
    finally:
        REWARDS.pop("_test_reloaded", None)
        sys.modules.pop("my_rewards_reload", None)


def test_a_user_reward_cannot_take_a_builtin_name():
    def my_exact_match(completions, answer, **_):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"^reward 'exact_match' is already registered by "
                                         r"grpo_lab\.rewards\.scoring\.exact_match: "):
        register_reward("exact_match")(my_exact_match)
    assert REWARDS["exact_match"] is exact_match


def test_an_estimator_name_is_taken_once():
    """``register_advantage`` wraps the function in an ``Estimator``: the clash is judged on the function."""
    name = "_test_taken_once"

    def mine(r, eps):
        return r

    def other(r, eps):
        return -r

    try:
        register_advantage(name)(mine)
        register_advantage(name, needs_group=False)(mine)  # the same function: its settings are replaced
        assert ADVANTAGES[name].fn is mine and not ADVANTAGES[name].needs_group
        with pytest.raises(ValueError, match=f"advantage estimator '{name}' is already registered by "
                                             r"tests\.test_registry\.[\w.<>]*mine"):
            register_advantage(name)(other)
        assert ADVANTAGES[name].fn is mine
        with pytest.raises(ValueError, match="advantage estimator 'rloo' is already registered"):
            register_advantage("rloo")(other)
    finally:
        ADVANTAGES.pop(name, None)

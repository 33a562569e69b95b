"""The warm-model cache: models stay loaded, the least recently used leave when memory runs out."""

from __future__ import annotations

import shutil

import pytest

from aigc.schemas.enums import Kind
from aigc.schemas.settings import Settings
from aigc.workers import registry


@pytest.fixture()
def three_models(tiny_model, tmp_path):
    paths = [tmp_path / name for name in "abc"]
    for path in paths:
        shutil.copytree(tiny_model, path)
    yield [str(p) for p in paths]
    registry._warm.clear()


def warm(settings_budget_mb: int, *models: str) -> list[str]:
    settings = Settings(model_cache_mb=settings_budget_mb)
    for model in models:
        registry.get_generator(Kind.article, model, settings)
    return [model for _, model, _ in registry.warm_models()]


def test_least_recently_used_model_leaves_when_the_budget_is_full(three_models):
    a, b, c = three_models
    registry._warm.clear()
    size = registry.get_generator(Kind.article, a, Settings()).memory_bytes
    assert size > 1 << 20  # the weights, counted
    budget_mb = (size * 5 // 2) >> 20  # room for two

    assert warm(budget_mb, b) == [a, b]
    assert warm(budget_mb, c) == [b, c]  # a was the least recently used
    assert warm(budget_mb, b, a) == [b, a]  # b used again, so c left
    first = registry.get_generator(Kind.article, b, Settings(model_cache_mb=budget_mb))
    assert registry.get_generator(Kind.article, b, Settings(model_cache_mb=budget_mb)) is first


def test_a_model_larger_than_the_budget_still_runs_alone(three_models):
    a, b, _ = three_models
    registry._warm.clear()
    assert warm(1, a) == [a]
    assert warm(1, b) == [b]
    assert [size for *_, size in registry.warm_models()][0] > 1 << 20

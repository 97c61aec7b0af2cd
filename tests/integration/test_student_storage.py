"""The student's SQL paths on PostgreSQL: training examples and the model registry."""

from __future__ import annotations

import pytest

from distill import registry
from storage import Database
from tests.unit.test_student_pipeline import check_training_examples

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_db(pg_url):
    d = Database(pg_url)
    d.upgrade()
    yield d
    d.dispose()


def test_training_examples_on_postgresql(pg_db):
    check_training_examples(pg_db)


def test_registry_promotes_one_active_version_on_postgresql(pg_db, tmp_path):
    assert registry.active_version(pg_db) is None
    for v in ("clf-a", "clf-b"):
        registry.register(pg_db, v, tmp_path / v, metrics={"holdout": {"accuracy": 0.9}},
                          thresholds={"category": {"threshold": 0.9, "epsilon": 0.02}})
    registry.promote(pg_db, "clf-a")
    registry.promote(pg_db, "clf-b")
    assert registry.active_version(pg_db).version == "clf-b"
    assert registry.get_version(pg_db, "clf-a").status == "retired"
    assert registry.get_version(pg_db, "clf-b").thresholds["category"]["epsilon"] == 0.02

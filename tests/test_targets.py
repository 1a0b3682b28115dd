"""hdcli.method.targets: a Target's validation, its loss terms and their keys, the table of kinds."""

from __future__ import annotations

import pytest

from hdcli.errors import HDError
from hdcli.method.targets import KINDS, TARGET_KEYS, Pair, Target


def test_a_target_is_named_by_its_teacher_and_kind_and_its_terms_pair_blocks():
    t = Target("mae", "relations", (9, 10), 0.5, student_blocks=(10, 11))
    assert t.name == "mae/relations" and not t.feature_like
    assert t.pairs == (Pair("mae/relations", 9, 10, "mae_relations_9"), Pair("mae/relations", 10, 11, "mae_relations_10"))
    f = Target("vit_base.mae", "features")
    assert f.feature_like and f.pairs == (Pair("vit_base.mae/features", None, None, "vit_base_mae_features"),)


@pytest.mark.parametrize("kw, match", [
    ({"kind": "featurs"}, "unknown target kind 'featurs'.*features"),
    ({"kind": "features", "norm": "batchnorm"}, "unknown target norm"),
    ({"kind": "features", "head": "mlp9"}, "unknown head kind 'mlp9'"),
    ({"kind": "features", "loss": "l3"}, "unknown loss kind 'l3'"),
    ({"kind": "features", "summary_weight": 1.5}, r"summary_weight must lie in \[0, 1\]"),
    ({"kind": "relations", "blocks": (9,), "norm": "phis"}, "applies to feature-like targets"),
    ({"kind": "block", "blocks": (-1,)}, "0-based"),
])
def test_a_bad_target_is_one_line_naming_the_fix(kw, match):
    with pytest.raises(HDError, match=match):
        Target("t", **kw)


def test_a_ladder_has_a_term_and_a_head_per_student_block():
    t = Target("clip", "features", student_blocks=(3, 11))
    assert [(p.teacher, p.student, p.key, p.source_key) for p in t.pairs] == [
        (None, 3, "clip_features_s3", "clip_features"), (None, 11, "clip_features_s11", "clip_features")]
    assert {p.source for p in t.pairs} == {("clip/features", None)}  # one target value serves both


def test_only_relations_are_compared_without_a_head():
    assert {k for k, kind in KINDS.items() if not kind.feature_like} == {"relations"}
    assert {kind.at for kind in KINDS.values()} == {"enter", "leave", "final"}


def test_a_recipe_target_takes_exactly_the_fields_of_target():
    from hdcli.config import DistillConfig, load_config

    assert {"teacher", "kind", "blocks", "weight", "student_blocks", "name", "norm", "registers", "pooled", "head",
            "loss", "summary_loss", "patch_loss", "summary_weight"} == set(TARGET_KEYS)
    with pytest.raises(HDError, match=r"distill.targets\[1\]: unknown target kind 'relation'"):
        load_config(DistillConfig, overrides={"distill.teachers": ["a", "b"], "distill.targets": [
            {"teacher": "a", "kind": "features"}, {"teacher": "b", "kind": "relation", "blocks": [1]}]})
    with pytest.raises(HDError, match=r"unknown key distill.targets\[0\].wieght"):
        load_config(DistillConfig, overrides={"distill.teachers": ["a"], "distill.targets": [
            {"teacher": "a", "kind": "features", "wieght": 2}]})

"""hdcli.config: defaults = METHOD.md, recipes on top, CLI overrides, unknown keys, TOML round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hdcli import config
from hdcli.config import DistillConfig, load_config
from hdcli.errors import HDError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_defaults_are_the_papers_main_setting():
    c = DistillConfig()
    assert (c.optim.blr, c.optim.weight_decay, c.optim.betas, c.optim.warmup_epochs) == (1.5e-4, 0.05, (0.9, 0.95), 40.0)
    assert (c.optim.clip_grad, c.student.drop_path, c.train.epochs) == (3.0, 0.2, 300)
    assert (c.data.img_size, c.data.scale, c.data.hflip) == (224, (0.2, 1.0), 0.5)
    d = c.distill
    assert (d.teachers, d.relation_blocks, d.mask_blocks, d.drop_ratio) == (["mae", "clip"], [9, 10], [0, 4, 8], 0.3)
    assert (d.alpha, d.beta, d.masking, d.relation_heads) == (1.0, 2.0, "progressive", "match")
    assert c.student.arch == "vit_base_patch16_224"


def test_main_recipe_resolves_to_the_defaults_plus_its_batch_and_precision():
    c = load_config(DistillConfig, recipe=REPO / "recipes/distill/hybrid-mae-clip-vitb.toml")
    d = DistillConfig()
    assert c.distill == d.distill and c.optim == d.optim and c.student == d.student
    assert c.train.mixed_precision == "bf16" and c.train.batch_size * 8 == 1024


def test_recipe_overrides_only_what_it_lists(tmp_path):
    c = load_config(DistillConfig, recipe=write(tmp_path, "[optim]\nblr = 1e-3\n[student]\nkwargs = {depth = 6}\n"))
    assert c.optim.blr == 1e-3 and c.student.kwargs == {"depth": 6}
    assert c.optim.weight_decay == 0.05 and c.train.batch_size == 128


def test_cli_overrides_beat_the_recipe_and_none_means_not_given(tmp_path):
    r = write(tmp_path, "[train]\nbatch_size = 16\nsteps = 7\n")
    c = load_config(DistillConfig, recipe=r, overrides={"train.batch_size": 4, "train.steps": None})
    assert c.train.batch_size == 4 and c.train.steps == 7


def test_comma_lists_from_flags_become_typed_lists():
    c = load_config(DistillConfig, overrides={"distill.relation_blocks": "3,4", "distill.teachers": "mae,deit"})
    assert c.distill.relation_blocks == [3, 4] and c.distill.teachers == ["mae", "deit"]


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(HDError) as e:
        load_config(DistillConfig, recipe=write(tmp_path, "[optim]\nbrl = 1e-3\n"))
    assert "optim.brl" in e.value.problem and "optim.blr" in e.value.hint


def test_bare_key_outside_a_section_suggests_its_section(tmp_path):
    with pytest.raises(HDError) as e:
        load_config(DistillConfig, recipe=write(tmp_path, "drop_ratio = 0.5\n"))
    assert "distill.drop_ratio" in e.value.hint


def test_unknown_section_suggests_the_closest(tmp_path):
    with pytest.raises(HDError) as e:
        load_config(DistillConfig, recipe=write(tmp_path, "[optimizer]\nblr = 1e-3\n"))
    assert "optim" in e.value.hint


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(HDError, match="train.batch_size must be an integer"):
        load_config(DistillConfig, recipe=write(tmp_path, "[train]\nbatch_size = \"big\"\n"))


@pytest.mark.parametrize("key, value, words", [
    ("distill.drop_ratio", 1.0, "drop_ratio"),
    ("distill.drop_ratio", -0.1, "drop_ratio"),
    ("train.batch_size", 0, "batch_size"),
    ("optim.blr", 0.0, "blr"),
    ("train.mixed_precision", "fp8", "mixed_precision"),
    ("distill.masking", "progresive", "progressive"),
    ("data.scale", [0.5, 0.2], "data.scale"),
])
def test_impossible_numbers_are_errors(key, value, words):
    with pytest.raises(HDError) as e:
        load_config(DistillConfig, overrides={key: value})
    assert words in str(e.value)


def test_hybrid_default_needs_two_teachers():
    with pytest.raises(HDError, match="two teachers"):
        load_config(DistillConfig, overrides={"distill.teachers": ["clip"]})


def test_general_targets_are_checked():
    ok = load_config(DistillConfig, overrides={"distill.teachers": ["clip"], "distill.targets": [
        {"teacher": "clip", "kind": "features"}]})
    assert ok.distill.targets == [{"teacher": "clip", "kind": "features"}]
    with pytest.raises(HDError, match="not one of distill.teachers"):
        load_config(DistillConfig, overrides={"distill.teachers": ["clip"], "distill.targets": [
            {"teacher": "mae", "kind": "features"}]})
    with pytest.raises(HDError, match="kind"):
        load_config(DistillConfig, overrides={"distill.teachers": ["clip"], "distill.targets": [
            {"teacher": "clip", "kind": "feature"}]})


def test_none_string_unsets_an_optional_field(tmp_path):
    c = load_config(DistillConfig, recipe=write(tmp_path, "[optim]\nclip_grad = \"none\"\n"))
    assert c.optim.clip_grad is None


def test_set_assignments_parse_toml_values():
    got = config.parse_assignments(["optim.min_lr=1e-6", "student.kwargs={depth = 6}", "data.source=/x/y"])
    assert got == {"optim.min_lr": 1e-6, "student.kwargs": {"depth": 6}, "data.source": "/x/y"}
    with pytest.raises(HDError, match="KEY=VALUE"):
        config.parse_assignments(["optim.min_lr"])


def test_dump_reads_back_equal(tmp_path):
    c = load_config(DistillConfig, overrides={
        "optim.clip_grad": "none", "student.kwargs": {"embed_dim": 48, "weird key": "a\"b\\c"},
        "distill.teachers": ["random:x.y", "local-dir:/tmp/a b"], "data.source": "/d/train-{000000..000009}.tar",
        "train.steps": 5})
    path = config.save_config(c, tmp_path / "run" / "config.toml")
    assert config.from_dict(DistillConfig, tomllib.loads(path.read_text())) == c


def test_valid_keys_lists_dotted_keys():
    keys = config.valid_keys(DistillConfig)
    assert "optim.blr" in keys and "distill.drop_ratio" in keys and "train.nan_tolerance" in keys


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_float_settings_must_be_finite(value):
    from hdcli.config import DistillConfig, load_config

    with pytest.raises(HDError, match=r"optim.lr must be a finite number"):
        load_config(DistillConfig, overrides={"optim.lr": float(value)})
    with pytest.raises(HDError, match=r"distill.alpha must be a finite number"):
        load_config(DistillConfig, overrides=config.parse_assignments([f"distill.alpha={value}"]))


def test_identity_changes_compare_values_not_their_spelling():
    import tomllib

    cfg = DistillConfig()
    cfg.student.kwargs = {"embed_dim": 48, "depth": 6}
    old = tomllib.loads(config.dump_config(cfg))
    old["student"]["drop_path"] = 0  # hand-edited, an int
    again = DistillConfig()
    again.student.kwargs = {"depth": 6, "embed_dim": 48}  # the same table, another key order
    again.student.drop_path = 0.0
    assert config.identity_changes(again, old) == {}
    again.distill.relation_blocks = [9, 11]
    assert config.identity_changes(again, old) == {"distill.relation_blocks": ("[9, 10]", "[9, 11]")}


def test_a_target_weight_must_be_finite():
    with pytest.raises(HDError, match=r"distill.targets\[0\].weight must be a finite number ≥ 0, got nan"):
        load_config(DistillConfig, overrides=config.parse_assignments(
            ['distill.targets=[{teacher = "mae", kind = "features", weight = nan}]']))


def test_target_tables_outside_the_distill_section_name_where_they_go(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[distill]\nteachers = ["mae", "clip"]\n\n[[target]]\nteacher = "clip"\nkind = "features"\n')
    with pytest.raises(HDError, match=r"\[\[target\]\] tables .* belong to the distill section") as e:
        load_config(DistillConfig, recipe=recipe)
    assert "[[distill.targets]]" in e.value.hint
    recipe.write_text(recipe.read_text().replace("[[target]]", "[[distill.targets]]"))
    assert load_config(DistillConfig, recipe=recipe).distill.targets == [{"teacher": "clip", "kind": "features"}]

"""hdcli.commands.options: one declaration per flag, help defaults read from the config dataclasses."""

from __future__ import annotations

import inspect

import pytest

from hdcli.commands import options
from hdcli.config import DistillConfig, FinetuneConfig, load_pretrain


def test_help_shows_each_commands_own_default_from_its_dataclass():
    epochs = next(o for o in options.TRAIN if o.key == "train.epochs")
    assert epochs.help_for(DistillConfig) == f"Epochs (default: {DistillConfig().train.epochs})."
    assert epochs.help_for(FinetuneConfig) == f"Epochs (default: {FinetuneConfig().train.epochs})."
    assert "(default: 300)" in epochs.help_for(lambda: load_pretrain("supervised"))
    blr = next(o for o in options.TRAIN if o.key == "optim.blr")
    assert blr.help_for(DistillConfig).endswith("(default: 1.5e-4).")


def test_a_note_joins_the_default_and_a_none_default_shows_nothing():
    (epochs,) = options.noted([o for o in options.TRAIN if o.key == "train.epochs"], epochs="90 linear probing")
    assert epochs.help_for(FinetuneConfig) == "Epochs (default: 100; 90 linear probing)."
    steps = next(o for o in options.TRAIN if o.key == "train.steps")
    assert steps.help_for(DistillConfig) == steps.help


def test_with_options_passes_overrides_and_refuses_a_flag_declared_twice():
    @options.with_options(DistillConfig, *options.run_options("runs/x"), *options.CHECKPOINTS)
    def cmd(overrides, out, recipe, resume, set_, print_config, allow_config_change):
        return overrides, out

    params = inspect.signature(cmd).parameters
    assert {"save_every", "out", "recipe"} <= set(params)
    overrides, out = cmd(**{name: p.default for name, p in params.items()} | {"save_every": 7})
    assert overrides["train.save_every"] == 7 and overrides["train.log_every"] is None and str(out) == "runs/x"
    with pytest.raises(TypeError, match="declared twice"):
        options.with_options(DistillConfig, *options.CHECKPOINTS, *options.CHECKPOINTS)(lambda overrides: None)


def test_every_config_key_of_the_shared_options_exists():
    from hdcli.config import valid_keys

    keys = set(valid_keys(DistillConfig))
    for o in (*options.TRAIN, *options.CHECKPOINTS, *options.DATA_OPTS, options.DATA_SOURCE):
        assert o.key in keys

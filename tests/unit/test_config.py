"""EngineConfig (runtime/config.py): every setting validated in one place, and the engine's command-line
flags generated from its fields, so that each setting has one name and one default."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import pytest

from zipmoe_ray.cli.engine_opts import add_engine_options, engine_kwargs
from zipmoe_ray.errors import ConfigError
from zipmoe_ray.runtime.config import EngineConfig


def _parser(**defaults) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_engine_options(p, **defaults)
    return p


def test_every_flag_is_a_field_with_the_field_s_default():
    p = _parser()
    by_dest = {a.dest: a for a in p._actions if a.dest != "help"}
    flagged = {f.name: f for f in fields(EngineConfig) if "cli" in f.metadata}
    assert set(by_dest) == set(flagged)
    for name, f in flagged.items():
        want = f.metadata["cli"].cli_default if f.default is MISSING else f.default
        assert by_dest[name].default == want, name


def test_parsed_flags_make_a_valid_config_with_the_defaults():
    cfg = EngineConfig(**engine_kwargs(_parser().parse_args([])))
    plain = EngineConfig(memory_budget="50%")
    assert cfg == plain


def test_flags_are_parsed_into_the_fields_types():
    args = _parser().parse_args(
        [
            "--ssd-bandwidth",
            "0.5GB",
            "--nodes",
            "edge0, edge1",
            "--no-calibrate",
            "--timeline",
            "--num-decompressors",
            "3",
            "--read-mode",
            "drop",
            "--no-recombine-on-device",
            "--replan-every",
            "64",
        ]
    )
    cfg = EngineConfig(**engine_kwargs(args))
    assert cfg.bandwidth == 5e8 and cfg.nodes == ("edge0", "edge1") and cfg.calibrate is False
    assert cfg.timeline is True and cfg.num_decompressors == 3 and cfg.read_mode == "drop"
    assert cfg.recombine_on_device is False and cfg.replan_every == 64


def test_a_command_can_change_a_default():
    assert _parser(memory_budget="25%").parse_args([]).memory_budget == "25%"


@pytest.mark.parametrize(
    "argv", [["--ssd-bandwidth", "fast"], ["--num-decompressors", "two"], ["--policy", "x"]]
)
def test_bad_flag_values_are_usage_errors_naming_the_flag(argv):
    with pytest.raises(argparse.ArgumentError, match=argv[0]):
        _parser().parse_args(argv)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"backend": "spark"}, "backend"),
        ({"backend": "local", "address": "1.2.3.4:6379"}, "--address needs the ray backend"),
        ({"num_decompressors": 0}, "num_decompressors"),
        ({"torch_threads": True}, "torch_threads"),
        ({"read_mode": "cached"}, "read mode"),
        ({"policy": "best"}, "policy"),
        ({"popularity": "mru"}, "popularity"),
        ({"decay": 0}, "decay"),
        ({"device": "tpu"}, "device"),
        ({"nodes": "edge0"}, "nodes"),
        ({"node_timeout": -1}, "node_timeout"),
        ({"nodes": ("a",), "resources": {"a": 1}}, "either resources"),
        ({"bandwidth": 0}, "bandwidth"),
        ({"latency": -1}, "latency"),
        ({"replan_every": -1}, "replan_every"),
        ({"replan_every": 2.5}, "replan_every"),
    ],
)
def test_invalid_settings_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(memory_budget="50%", **kw)


def test_read_options_follow_the_config():
    opts = EngineConfig(memory_budget=1, read_mode="page-cache", bandwidth=1e9, latency=1e-4).read_options()
    assert (opts.read_mode, opts.bandwidth, opts.latency) == ("page-cache", 1e9, 1e-4)


def test_the_old_read_option_name_still_works():
    from zipmoe_ray.store import ReadOptions

    with pytest.warns(DeprecationWarning):
        assert ReadOptions(cache="drop").read_mode == "drop"

"""The `fxjax` command line: every launcher is a subcommand with a --help that explains its arguments; the
`python -m launch.<name>` shims run the same code; configs resolve by shipped name or by path; `config show`
prints every key with its value, default and comment; bad input exits 2 the same way under both entry points."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from fxjax import config as config_lib
from fxjax.cli import config as config_cli, main as cli

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ("train", "extract", "report", "export", "predict", "suite")


def leaf_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in c.items():
        keys += leaf_keys(value, f"{prefix}{key}.") if isinstance(value, ml_collections.ConfigDict) else [prefix + key]
    return keys


def test_top_level_help_lists_every_command_with_its_summary(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, module in cli.COMMANDS.items():
        doc = importlib.import_module(module).__doc__
        assert f"  {name:<9} {doc.splitlines()[0]}" in out
    assert set(LAUNCHERS) | {"config"} <= set(cli.COMMANDS)


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", LAUNCHERS)
def test_each_launcher_help_explains_every_argument(name, capsys, monkeypatch):
    module = importlib.import_module(cli.COMMANDS[name])
    helps = []
    real_add_argument = argparse.ArgumentParser.add_argument

    def recording_add_argument(parser, *args, **kwargs):
        helps.append((args, kwargs.get("help")))
        return real_add_argument(parser, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", recording_add_argument)
    monkeypatch.setattr(sys, "argv", ["fxjax"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fxjax {name} ")
    assert module.__doc__.splitlines()[0] in out
    own = [(args, text) for args, text in helps if args[0] not in ("-h", "--help")]
    assert own, name
    assert all(text for _, text in own), [args for args, text in own if not text]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launch_shims_run_the_package_code(name):
    shim = importlib.import_module(f"launch.{name}")
    assert shim.main is importlib.import_module(f"fxjax.cli.{name}").main


def test_usage_line_names_the_entry_point_the_user_typed(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "launch" / "train.py")])
    assert cli.prog("train") == "python -m launch.train"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fxjax"])
    assert cli.prog("train") == "fxjax train"


def test_a_shipped_name_and_its_path_load_the_same_config(monkeypatch, tmp_path):
    by_path = config_lib.load_config_file(str(ROOT / "configs" / "quickstart.py"))
    monkeypatch.chdir(tmp_path)  # names resolve from anywhere, not only from the repository root
    assert config_lib.load_config_file("quickstart").to_dict() == by_path.to_dict()
    assert config_lib.load_config_file("pixels_digits").backbone == "pixels"  # builds on quickstart by name
    assert {"quickstart", "pixels_digits", "vit_b16_cifar10"} <= set(config_lib.shipped_names())


def test_a_file_in_the_working_directory_wins_over_a_shipped_name(monkeypatch, tmp_path):
    (tmp_path / "quickstart").write_text(
        "from fxjax.config import default_config\n\n\ndef get_config():\n    c = default_config()\n"
        "    c.num_epochs = 7\n    return c\n"
    )
    monkeypatch.chdir(tmp_path)
    assert config_lib.load_config_file("quickstart").num_epochs == 7


@pytest.mark.parametrize("given", ["quikstart", "configs/nope.py", "quickstart.py"])
def test_an_unknown_config_names_what_exists(given, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"config file '{given}' not found; .*quickstart"):
        config_lib.load_config_file(given)


def test_every_default_key_has_a_comment():
    comments = config_cli.key_comments()
    keys = leaf_keys(config_lib.default_config())
    assert sorted(k for k in comments if k in keys) == sorted(keys)
    assert [k for k in keys if not comments[k]] == []


def test_config_show_prints_every_key_value_default_and_comment(capsys):
    code = cli.main(["config", "show", "quickstart", "--config.num_epochs=3", "--config.head.kind=mlp"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ") and lines[0].split()[1].endswith("quickstart.py:")
    shown = {line.split(" = ")[0]: line for line in lines if " = " in line and not line.startswith("#")}
    assert sorted(shown) == sorted(leaf_keys(config_lib.default_config()))
    assert shown["num_epochs"] == "num_epochs = 3  # default: 10; passes over the training split"
    assert shown["head.kind"] == "head.kind = 'mlp'  # default: 'linear'; linear | mlp"
    assert shown["optimizer.learning_rate"].startswith("optimizer.learning_rate = 0.003  # default: 0.001; ")
    assert "# sweep: Many linear heads at once" in "\n".join(lines)


def test_config_show_lists_each_protocols_settings_with_default_and_override(capsys):
    from fxjax.evaluate import catalog

    args = ["--config.protocols=('dinov2_knn', 'vtab1k')", "--config.protocol_overrides.vtab1k.steps=300"]
    assert cli.main(["config", "show", "quickstart", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = {line.split(" = ")[0]: line for line in lines if line.startswith("protocol_overrides.")}
    expected = [f"protocol_overrides.{n}.{k}" for n in ("dinov2_knn", "vtab1k") for k in catalog.protocol_defaults(n)]
    assert list(shown) == expected  # every setting of each listed protocol, in the protocols' order
    assert shown["protocol_overrides.vtab1k.steps"] == "protocol_overrides.vtab1k.steps = 300  # default: None"
    assert shown["protocol_overrides.dinov2_knn.k"] == "protocol_overrides.dinov2_knn.k = 20  # default: 20"
    header = lines.index(next(line for line in lines if line.startswith("# protocol_overrides")))
    assert lines[header + 1].startswith("protocol_overrides.dinov2_knn.") and lines[header + len(shown) + 1] == ""


def test_config_show_of_a_bad_override_is_one_line_and_exit_2(capsys):
    assert cli.main(["config", "show", "quickstart", "--config.num_epoch=3"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown config key 'num_epoch' (did you mean 'num_epochs'?)\n"


def test_bad_input_exits_2_with_the_same_message_under_both_entry_points(tmp_path):
    args = ["--config", "no_such_config", "--workdir", str(tmp_path / "w")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    results = [
        subprocess.run([sys.executable, *entry, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        for entry in (["-m", "launch.train"], ["-m", "fxjax.cli", "train"])
    ]
    for result in results:
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: config file 'no_such_config' not found; ")
        assert result.stderr.count("\n") == 1
    assert results[0].stderr == results[1].stderr

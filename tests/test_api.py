"""The public API (dsgd.*, lazy), dsgd.train from Python, `dsgd config` against the config
dataclasses, the --help name lists, and model / data factories named "module:factory"."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import dsgd
from dsgd.data import load_dataset
from dsgd.errors import UserError
from dsgd.experiments import config as C
from dsgd.experiments import config_doc
from dsgd.experiments.cli import build_parser, main
from dsgd.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_import_dsgd_loads_no_torch_and_exports_the_api():
    code = ("import sys, dsgd; assert 'torch' not in sys.modules, 'torch imported'; "
            "names = [n for n in dsgd.__all__ if n != '__version__']; "
            "assert all(callable(getattr(dsgd, n)) for n in names), names; print(len(names))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 9
    from dsgd.engine import Engine
    from dsgd.optim import SAM

    assert dsgd.Engine is Engine and dsgd.SAM is SAM
    with pytest.raises(AttributeError):
        dsgd.nothing_here  # noqa: B018


def test_train_from_python_equals_the_command_line(tmp_path):
    overrides = [*TINY, "train.steps=10"]
    summary = dsgd.train("quickstart", tmp_path / "py", set=overrides)
    assert summary["status"] == "finished" and summary["steps"] == 10
    args = [a for o in overrides for a in ("--set", o)]
    assert main(["train", "--config", "quickstart", *args, "--out", str(tmp_path / "cli")]) == 0
    rows = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("py", "cli")]
    wall = ("time", "sim_time_s")  # sim_time_s: from the measured compute time
    strip = [[{k: v for k, v in eval_row(r).items() if k not in wall} for r in rs] for rs in rows]
    assert strip[0] == strip[1]  # the same training, row for row
    # a Config object and a mapping of values give the same config as the strings
    cfg = dsgd.load_config("quickstart", overrides)
    as_map = dsgd.load_config(C.load("quickstart"), {k: C._parse_value(v) for k, v in
                                                     (o.split("=", 1) for o in overrides)})
    assert cfg == as_map
    with pytest.raises(C.ConfigError, match="unknown key train.lrr"):
        dsgd.load_config(None, {"train.lrr": 0.1})


def eval_row(line: str) -> dict:
    import json
    return json.loads(line)


def all_keys(cls=C.Config, prefix=""):
    out = []
    for f in dataclasses.fields(cls):
        hint = C.typing.get_type_hints(cls)[f.name]
        out += (all_keys(hint, f"{f.name}.") if dataclasses.is_dataclass(hint)
                else [prefix + f.name])
    return out


def test_config_reference_lists_every_key_with_its_default_and_meaning(capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    listed = {k: (v, doc) for k, v, doc in config_doc.keys()}
    assert sorted(listed) == sorted(all_keys())
    defaults = C.to_dict(C.Config())
    for key, (value, doc) in listed.items():
        assert doc, f"{key} has no meaning: add a comment to its field in config.py"
        section, _, name = key.rpartition(".")
        default = defaults[section][name] if section else defaults[name]
        assert value == ("(unset)" if default is None else config_doc._value(default))
        assert f"{key} " in text and doc in text
    assert listed["train.lr"] == ("0.1", "peak learning rate (scale it linearly with the total "
                                         "batch yourself)")
    for kind in ("presets", "topologies", "models", "algorithms"):
        assert f"\n{kind}: " in text


def test_config_preset_prints_the_resolved_preset(capsys):
    assert main(["config", "--preset", "quickstart", "--set", "train.steps=7"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert C.from_dict(printed) == C.load("quickstart", ["train.steps=7"])
    assert main(["config", "--preset", "nope"]) == 2


def test_help_lists_presets_topologies_models_and_algorithms():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    train = sub.choices["train"].format_help()
    for name in ("quickstart", "cpu_fashion_mlp", "exponential", "one_peer_exponential",
                 "lenet5", "resnet18_micro", "dsgd, csgd", "package.module:factory"):
        assert name in train, name
    assert "one_peer_exponential" in sub.choices["topology"].format_help()


# ---- "module:factory" ------------------------------------------------------------------------
def test_model_factory_by_import_name(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(
        "from torch import nn\n"
        "def net(num_classes, hidden=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.Linear(hidden, "
        "num_classes))\n"
        "def shaped(in_shape, num_classes, width=3):\n"
        "    return nn.Linear(in_shape[0] * width, num_classes)\n"
        "def broken():\n    return 3\n"
        "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("user_models:net", 5, (2, 3), hidden=4)
    assert model[2].out_features == 5  # num_classes, by keyword
    assert model[1].out_features == 4  # the option arrived as a keyword
    assert build_model("user_models:shaped", 7, (2,), width=5).weight.shape == (7, 10)
    for name, fragment in [("no_such_module:net", "cannot import 'no_such_module'"),
                           ("user_models:nett", "has no attribute 'nett'"),
                           ("user_models:VALUE", "not a callable"),
                           ("user_models:broken", "returned int"),
                           ("user_models:net; rm", "neither a known name")]:
        with pytest.raises(UserError, match=fragment) as err:
            build_model(name, 5, (2, 3))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="bad options"):
        build_model("user_models:net", 5, (2, 3), depth=2)


def test_data_factory_by_import_name(tmp_path, monkeypatch):
    (tmp_path / "user_data.py").write_text(
        "import torch\n"
        "from torch.utils.data import Dataset\n"
        "class Pairs(Dataset):\n"
        "    classes = ['a', 'b', 'c']\n"
        "    def __init__(self, n, offset):\n"
        "        self.n, self.offset = n, offset\n"
        "    def __len__(self):\n        return self.n\n"
        "    def __getitem__(self, i):\n"
        "        return torch.full((2,), float(i + self.offset)), i % 2\n"
        "def load(n=10, data_dir=None):\n"
        "    return Pairs(n, 0), (torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = load_dataset("user_data:load", "/some/dir", n_train=6, n=8)
    assert ds.x_train.shape == (6, 2) and ds.num_classes == 3  # len(train.classes)
    assert torch.equal(ds.x_train[:, 0], torch.arange(6.0))
    assert ds.y_train.tolist() == [0, 1, 0, 1, 0, 1] and ds.y_test.tolist() == [0, 1, 2, 1]
    with pytest.raises(UserError, match="bad options"):
        load_dataset("user_data:load", size=3)
    cfg = C.load(None, ["data.name=user_data:load", "data.options={n=40}", "model.name=mlp"])
    assert cfg.data.options == {"n": 40}
    with pytest.raises(C.ConfigError, match="package.module:factory"):
        C.load(None, ["model.name=nosuchmodel"])


def test_a_missing_factory_module_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["train", "--set", "model.name=not_installed_anywhere:net", "--set",
               "data.name=synthetic", "--no-progress", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "cannot import 'not_installed_anywhere' for model.name" in err and "PYTHONPATH" in err

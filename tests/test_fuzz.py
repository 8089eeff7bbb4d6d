"""Property-based fuzzing of everything dsgd reads: configs (values, --set strings, files), IDX
and CIFAR bytes, checkpoint bytes. The invariants: a bad input is a one-line UserError (never
another exception), nothing from a file is executed, and what dsgd writes it reads back.

The default run is bounded (FAST: a few dozen examples per property, a deadline); the LONG
profile behind ``-m slow`` tries many more. Each property prints how many inputs it tried and
how many were accepted or refused with a one-line error (see them with ``pytest -s``); any other
outcome fails the property.
"""

import collections
import gzip
import io
import json
import pickle
import tomllib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dsgd.data.readers import _load_pickle, _unpickle, read_idx
from dsgd.errors import UserError
from dsgd.experiments import config as C
from dsgd.experiments.rundir import RunDir

FAST = settings(max_examples=40, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
LONG = settings(FAST, max_examples=1000, deadline=None, derandomize=False)
PROFILES = [pytest.param(FAST, id="fast"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]


@pytest.fixture
def tally(request):
    """Counts the outcomes of one property's inputs and prints them at the end."""
    counts: collections.Counter = collections.Counter()
    yield counts
    print(f"\n{request.node.name}: {sum(counts.values())} tried, all clean "
          f"({counts[True]} accepted, {counts[False]} refused with one line)")

# ---------------------------------------------------------------- configs
# Values TOML can hold (no None), nested a little.
scalars = st.one_of(st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["ring", "mlp", "synthetic", "cpu",
                                                           "cuda:0", "dsgd", "csgd", "iid"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
KEYS = {section: [f.name for f in C.dataclasses.fields(cls)]
        for section, cls in (("data", C.DataConfig), ("model", C.ModelConfig),
                             ("train", C.TrainConfig), ("log", C.LogConfig))}
key_paths = st.one_of(
    st.sampled_from([f"{s}.{k}" for s, ks in KEYS.items() for k in ks] + ["name", "device"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=12))
BASE = ["data.name=synthetic", "model.name=mlp", "train.workers=4"]
# Values of the annotated type, mostly valid, so that accepted configs are fuzzed too (their
# TOML round trip: config.toml must read back as the same config).
TYPED = {
    int: st.integers(-2, 2000), float: st.floats(1e-4, 10.0), bool: st.booleans(),
    str: st.sampled_from(["ring", "grid", "exponential", "dsgd", "csgd", "iid", "dirichlet",
                          "multistep", "cosine", "constant", "sgd", "sam", "gossip", "auto"]),
}


def _typed(section: str, key: str):
    hint = C.typing.get_type_hints(dict(data=C.DataConfig, model=C.ModelConfig,
                                        train=C.TrainConfig, log=C.LogConfig)[section])[key]
    if key == "options":
        return st.dictionaries(st.text(max_size=8), values, max_size=3)
    if key == "milestones":
        return st.lists(st.integers(1, 500), max_size=3).map(lambda v: sorted(set(v)))
    if key in ("name", "dir", "instruments"):
        return st.just(None) if key == "dir" else st.just([]) if key == "instruments" else \
            st.sampled_from(["synthetic", "mlp"])
    args = [a for a in C.typing.get_args(hint) if a is not type(None)] or [hint]
    return TYPED.get(args[0], values)


typed_overrides = st.dictionaries(
    st.sampled_from([(s, k) for s, ks in KEYS.items() for k in ks if (s, k) != ("data", "name")]),
    st.none(), max_size=5).flatmap(lambda keys: st.fixed_dictionaries(
        {f"{s}.{k}": _typed(s, k) for s, k in keys}))


def _raw(overrides: dict) -> dict:
    raw: dict = {}
    for path, value in overrides.items():
        *head, last = path.split(".")
        node = raw
        for part in head:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return {}
        node[last] = value
    return raw


def _check_config(load):
    """``load()`` gives a valid Config that survives a TOML round trip, or a ConfigError."""
    try:
        cfg = load()
    except C.ConfigError as err:
        assert "\n" not in str(err).strip()
        return False
    assert C.NAME_PATTERN.fullmatch(cfg.name)
    assert C.from_dict(tomllib.loads(C.dumps_toml(cfg))) == cfg or _has_nan(cfg)
    assert C.from_dict(json.loads(json.dumps(C.to_dict(cfg)))) == cfg or _has_nan(cfg)
    return True


def _has_nan(cfg) -> bool:  # NaN != NaN: only model.options may still hold one
    return "NaN" in json.dumps(C.to_dict(cfg))


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_config_values(profile, tally):
    @profile
    @given(st.one_of(typed_overrides, st.dictionaries(key_paths, values, max_size=4)),
           st.one_of(st.just("run"), st.text(max_size=20)))
    def check(overrides, name):
        raw = _raw({"data.name": "synthetic", "model.name": "mlp", "train.workers": 4,
                    **overrides, "name": name})
        tally[_check_config(lambda: C.from_dict(raw))] += 1

    check()


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_set_strings(profile, tally):
    @profile
    @given(st.lists(st.one_of(st.text(max_size=30),
                              st.builds(lambda k, v: f"{k}={v}", key_paths, st.text(max_size=20))),
                    max_size=3))
    def check(overrides):
        tally[_check_config(lambda: C.load(None, [*BASE, *overrides]))] += 1

    check()


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_config_files(profile, tmp_path, tally):
    valid = C.dumps_toml(C.load(None, BASE)).encode()

    @profile
    @given(st.one_of(st.binary(max_size=300),
                     st.builds(lambda i, b: valid[:i] + b + valid[i:],
                               st.integers(0, len(valid)), st.binary(max_size=8))))
    def check(content):
        path = tmp_path / "c.toml"
        path.write_bytes(content)
        tally[_check_config(lambda: C.load(str(path)))] += 1

    check()


# ---------------------------------------------------------------- IDX bytes
def _idx(shape, data: bytes) -> bytes:
    magic = 2051 if len(shape) == 3 else 2049
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape) + data


idx_files = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda shape, data: _idx(shape, data),
              st.tuples(*[st.integers(0, 2**32 - 1)] * 3) | st.tuples(*[st.integers(0, 6)] * 3),
              st.binary(max_size=300)))


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_idx_bytes(profile, tmp_path, tally):
    @profile
    @given(idx_files, st.booleans(), st.integers(0, 40), st.integers(0, 255))
    def check(content, gz, flip_at, flip):
        data = gzip.compress(content) if gz else content
        if flip and data:
            data = bytearray(data)
            data[flip_at % len(data)] ^= flip
        path = tmp_path / ("f.gz" if gz else "f")
        path.write_bytes(bytes(data))
        try:
            a = read_idx(str(path), 3)
        except UserError as err:
            assert "\n" not in str(err)
            tally[False] += 1
            return
        tally[True] += 1
        dims = tuple(int.from_bytes(bytes(data if not gz else gzip.decompress(data))[4 + 4 * i:
                                                                                  8 + 4 * i],
                                    "big") for i in range(3))
        assert a.dtype == np.uint8 and a.shape == dims

    check()


# ---------------------------------------------------------------- CIFAR pickle bytes
pickled_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=8),
              st.text(max_size=8),
              st.builds(lambda n, dt: np.zeros((n, 3072 if n % 2 else 5), dtype=dt),
                        st.integers(0, 3), st.sampled_from(["u1", "i8", "f4", "O"]))),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from([b"data", b"labels", "data", b"x"]),
                                            inner, max_size=3)),
    max_leaves=6)


def _mutate(raw: bytes, at: int, flip: int, cut: int) -> bytes:
    b = bytearray(raw)
    if flip and b:
        b[at % len(b)] ^= flip
    return bytes(b[: len(b) - cut % (len(b) + 1)] if cut else b)


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_cifar_pickle_bytes(profile, tmp_path, tally):
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
                         b"filenames": [b"a", b"b"]}, protocol=2)

    @profile
    @given(st.one_of(st.binary(max_size=200),
                     st.builds(lambda v, p: pickle.dumps(v, protocol=p), pickled_values,
                               st.integers(2, 5)),
                     st.builds(lambda a, f, c: _mutate(good, a, f, c), st.integers(0, 10**6),
                               st.integers(0, 255), st.integers(0, 60))))
    def check(content):
        path = tmp_path / "data_batch_1"
        path.write_bytes(content)
        try:
            x, y = _unpickle(str(path), b"labels")
        except UserError as err:
            assert "\n" not in str(err)
            tally[False] += 1
            return
        tally[True] += 1
        assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32) and y.shape == (len(x),)

    check()


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return self.target, ("touch /nonexistent-dsgd-fuzz",)


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "builtins.exec",
                                    "subprocess.call", "numpy.load", "builtins.getattr"])
def test_any_global_outside_the_allow_list_is_refused(target, tmp_path):
    module, name = target.rsplit(".", 1)
    raw = (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nX\x01\x00\x00\x00x\x85R.")
    path = tmp_path / "p"
    path.write_bytes(raw)
    with pytest.raises(UserError, match=f"refused to load {module}.{name}"):
        _load_pickle(str(path))


# ---------------------------------------------------------------- checkpoint bytes
@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_checkpoint_bytes(profile, tmp_path, tally):
    buf = io.BytesIO()
    torch.save({"engine": {"step": 3, "w": torch.zeros(2, 3)}, "loader": {}, "torch_rng":
                torch.get_rng_state(), "running": {"loss": 0.0}}, buf)
    good = buf.getvalue()

    @profile
    @given(st.one_of(st.binary(max_size=200),
                     st.builds(lambda a, f, c: _mutate(good, a, f, c), st.integers(0, 10**6),
                               st.integers(0, 255), st.integers(0, 3000))))
    def check(content):
        assume(content != good)
        run = RunDir(tmp_path / "run")
        run.ckpt.parent.mkdir(parents=True, exist_ok=True)
        run.ckpt.write_bytes(content)
        try:
            state = run._load(run.ckpt)
        except UserError as err:
            assert "\n" not in str(err)
            tally[False] += 1
            return
        tally[True] += 1
        assert isinstance(state["engine"]["step"], int)  # a flip in padding: still whole

    check()


def test_a_damaged_pickle_that_breaks_numpys_dtype_is_one_line(tmp_path):
    """Found by the long fuzz profile: this mutation of a valid pickle made the unpickler raise
    SystemError from numpy's dtype constructor."""
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
                         b"filenames": [b"a", b"b"]}, protocol=2)
    path = tmp_path / "data_batch_1"
    path.write_bytes(_mutate(good, 207, 3, 0))
    try:
        _unpickle(str(path), b"labels")
    except UserError as err:
        assert "\n" not in str(err)

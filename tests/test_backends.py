"""Gradient backends: each against the others and the engine's reference, the out-of-memory
fallback, the timed ``auto`` choice, random ops (dropout) and the engine's input checks."""

import time
import warnings

import pytest
import torch
from test_engine import M, batches, convnet
from torch import nn

from dsgd.engine import Engine
from dsgd.engine.backends import (
    AutoBackend,
    LoopBackend,
    Objective,
    OneBatchBackend,
    OutOfMemoryFallback,
    VmapBackend,
    _intra_op_threads,
    default_strategy,
)
from dsgd.errors import BatchError, UserError
from dsgd.optim import SGD
from dsgd.topology import make_topology


def mlp(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(dropout), nn.Linear(7, 3))


def objective(engine):
    return Objective(engine.model, engine.layout, engine.loss)


class TightVmap(VmapBackend):
    """vmap that runs out of memory on more than ``fits`` workers at a time."""

    fits = 3

    def gradients(self, w, buffers, x, y):
        if (self.chunk_size or w.shape[0]) > self.fits:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return super().gradients(w, buffers, x, y)

    def with_chunk(self, chunk_size):
        smaller = TightVmap(self.objective, chunk_size)
        smaller.fits = self.fits
        return smaller


@pytest.mark.parametrize("fits,expect", [(3, "vmap over 3 workers at a time"),
                                         (1, "worker by worker")])
def test_out_of_memory_halves_the_chunk_down_to_the_loop(fits, expect):
    data = batches((2, 5, 5), 3)
    loop = Engine(convnet(), make_topology("ring", M), lr=0.1, strategy="loop")
    tight = Engine(convnet(), make_topology("ring", M), lr=0.1)
    TightVmap.fits = fits
    tight.backend = OutOfMemoryFallback(TightVmap(objective(tight)),
                                        lambda: LoopBackend(objective(tight)))
    with pytest.warns(UserWarning, match=expect):
        tight.step(*data[0])
    assert tight.backend.name == ("vmap" if fits > 1 else "loop")
    for x, y in data[1:]:
        tight.step(x, y)
    for x, y in data:
        loop.step(x, y)
    torch.testing.assert_close(tight.w, loop.w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tight.b, loop.b, atol=1e-5, rtol=1e-5)  # no statistics lost
    TightVmap.fits = 3


def test_explicit_vmap_has_no_silent_fallback():
    engine = Engine(mlp(), make_topology("ring", M), lr=0.1, strategy="vmap")
    assert type(engine.backend) is VmapBackend
    engine.backend = TightVmap(objective(engine))
    with pytest.raises(torch.OutOfMemoryError):
        engine.step(*batches((5,), 1)[0])


def test_threaded_loop_equals_the_serial_loop_and_restores_the_thread_setting():
    topo = make_topology("exponential", M)
    before = torch.get_num_threads()
    runs = {}
    for n in (1, 3):
        eng = Engine(convnet(), topo, lr=0.1, strategy="loop", optimizer=SGD(momentum=0.9))
        eng.backend = LoopBackend(objective(eng), threads=n)
        for x, y in batches((2, 5, 5), 3):
            eng.step(x, y)
            assert torch.get_num_threads() == before
        runs[n] = eng
    torch.testing.assert_close(runs[3].w, runs[1].w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(runs[3].b, runs[1].b, atol=1e-6, rtol=1e-6)
    runs[3].close()


def test_one_batch_csgd_equals_the_per_worker_gradients_averaged():
    topo = make_topology("complete", M)
    kw = dict(lr=0.1, algorithm="csgd", optimizer=SGD(momentum=0.9))
    fast, apart = Engine(mlp(), topo, **kw), Engine(mlp(), topo, **kw)
    assert isinstance(fast.backend, OneBatchBackend)
    apart.backend = VmapBackend(objective(apart))  # the workers' gradients, then averaged
    for x, y in batches((5,), 5):
        r_fast, r_apart = fast.step(x, y), apart.step(x, y)
        torch.testing.assert_close(r_fast.loss, r_apart.loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r_fast.accuracy, r_apart.accuracy)
    torch.testing.assert_close(fast.w, apart.w, atol=1e-6, rtol=1e-6)
    # BatchNorm couples a batch's samples: its workers keep their own batches
    assert not isinstance(Engine(convnet(), topo, **kw).backend, OneBatchBackend)
    assert not isinstance(Engine(mlp(), make_topology("ring", M), lr=0.1).backend,
                          OneBatchBackend)


class Sleepy:
    """A backend that computes like ``inner`` and takes ``delay`` seconds longer."""

    def __init__(self, inner, delay, name):
        self.inner, self.delay, self.name = inner, delay, name

    def gradients(self, w, buffers, x, y):
        time.sleep(self.delay)
        return self.inner.gradients(w, buffers, x, y)

    def close(self):
        pass


def test_auto_keeps_the_default_unless_another_is_clearly_faster():
    eng = Engine(mlp(), make_topology("ring", M), lr=0.1, strategy="loop")
    ob = objective(eng)
    x, y = batches((5,), 1)[0]
    slow_default = AutoBackend({"fast": lambda: Sleepy(VmapBackend(ob), 0.0, "fast"),
                                "slow": lambda: Sleepy(VmapBackend(ob), 0.06, "slow")},
                               default="slow")
    slow_default.gradients(eng.w, {}, x, y)
    assert slow_default.name == "fast"
    assert "fast" in slow_default.reason and "slow" in slow_default.reason
    close = AutoBackend({"a": lambda: Sleepy(VmapBackend(ob), 0.100, "a"),
                         "b": lambda: Sleepy(VmapBackend(ob), 0.102, "b")}, default="b")
    close.gradients(eng.w, {}, x, y)
    assert close.name == "b"  # within the margin: the default stays, runs stay repeatable


def test_auto_choice_is_checkpointed_and_the_probe_changes_nothing():
    topo = make_topology("ring", M)
    data = batches((2, 5, 5), 4)
    auto = Engine(convnet(), topo, lr=0.1, optimizer=SGD(momentum=0.9))
    explicit = Engine(convnet(), topo, lr=0.1, optimizer=SGD(momentum=0.9))
    auto.step(*data[0])
    chosen = auto.backend.name
    assert chosen in ("vmap", "loop") and chosen in auto.backend.reason
    explicit.backend = (VmapBackend if chosen == "vmap" else LoopBackend)(objective(explicit))
    explicit.step(*data[0])
    # the timing runs discarded their results: same weights and BatchNorm statistics
    assert torch.equal(auto.w, explicit.w) and torch.equal(auto.b, explicit.b)
    resumed = Engine(convnet(), topo, lr=0.1, optimizer=SGD(momentum=0.9))
    resumed.load_state_dict(auto.state_dict())
    assert resumed.backend.name == chosen  # no new timing: the same numbers as before
    for x, y in data[1:]:
        auto.step(x, y)
        resumed.step(x, y)
    assert torch.equal(auto.w, resumed.w)


def test_default_strategy_by_model_kind():
    assert default_strategy(mlp(), 16, "cpu") == "vmap"
    assert default_strategy(convnet(), 16, "cpu") == "loop"
    assert default_strategy(nn.LSTM(4, 4), 16, "cpu") == "loop"
    assert default_strategy(nn.TransformerEncoderLayer(8, 2), 16, "cpu") == "loop"
    assert default_strategy(mlp(), 1, "cpu") == "loop"


# ---- random ops ----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [VmapBackend, LoopBackend])
def test_dropout_masks_differ_between_workers_in_train_mode_only(make):
    eng = Engine(mlp(dropout=0.5), make_topology("ring", M), lr=0.1)
    backend = make(objective(eng))
    x, y = batches((5,), 1, m=1)[0]
    x, y = x.expand(M, -1, -1), y.expand(M, -1)  # equal weights, equal batch
    eng.model.train()
    grads, _, _ = backend.gradients(eng.w, {}, x, y)
    assert all(not torch.equal(grads[0], grads[j]) for j in range(1, M))
    eng.model.eval()
    grads, _, _ = backend.gradients(eng.w, {}, x, y)
    assert all(torch.equal(grads[0], grads[j]) for j in range(1, M))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_dropout_runs_are_reproducible_from_the_seed_and_resume_bit_identically(strategy,
                                                                                 tmp_path):
    topo = make_topology("ring", M)
    data = batches((5,), 8)

    def engine(seed=0):
        return Engine(mlp(dropout=0.3), topo, lr=0.2, strategy=strategy, seed=seed,
                      optimizer=SGD(momentum=0.9))

    whole, again, other = engine(), engine(), engine(seed=1)
    losses = []
    for x, y in data:
        losses.append(whole.step(x, y).loss.mean())
        again.step(x, y)
        other.step(x, y)
    assert torch.equal(whole.w, again.w) and not torch.equal(whole.w, other.w)
    assert losses[-1] < losses[0]
    first = engine()
    for x, y in data[:4]:
        first.step(x, y)
    torch.manual_seed(123)  # the global generator does not matter
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = engine()
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    for x, y in data[4:]:
        resumed.step(x, y)
    assert torch.equal(resumed.w, whole.w)


def test_the_engine_leaves_the_global_generator_alone():
    eng = Engine(mlp(dropout=0.5), make_topology("ring", M), lr=0.1)
    state = torch.get_rng_state()
    eng.step(*batches((5,), 1)[0])
    assert torch.equal(torch.get_rng_state(), state)


# ---- input checks ----------------------------------------------------------------------------
def test_step_rejects_batches_that_do_not_fit():
    eng = Engine(mlp(), make_topology("ring", M), lr=0.1)
    x, y = batches((5,), 1)[0]
    with pytest.raises(BatchError, match=r"hosts 6 workers: give x of shape \(6, B, \.\.\.\)"):
        eng.step(x[:4], y[:4])
    with pytest.raises(BatchError, match=r"y must have shape \(6, 8, \.\.\.\)"):
        eng.step(x, y[:, :5])
    with pytest.raises(BatchError, match=r"pass y.long\(\)"):
        eng.step(x, y.float())
    mse = Engine(mlp(), make_topology("ring", M), lr=0.1, loss=nn.functional.mse_loss)
    with pytest.raises(BatchError, match=r"pass y.float\(\)"):
        mse.step(x, torch.zeros(M, 8, 3, dtype=torch.long))
    assert issubclass(BatchError, UserError)
    assert torch.equal(eng.w, Engine(mlp(), make_topology("ring", M), lr=0.1).w)  # untouched


@pytest.mark.slow
def test_cli_trains_alexnet_with_dropout_under_vmap(tmp_path):
    from cli_helpers import dsgd_cli, sets

    out = tmp_path / "alex"
    res = dsgd_cli("train", *sets("data.image_size=32", "model.name=alexnet_micro",
                                  "model.options={dropout=0.5}", "train.strategy=vmap",
                                  "train.steps=4", "log.eval_every=2"),
                   "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stderr
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4


# ---- mixed precision -------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_bf16_forward_keeps_float32_state_and_tracks_float32(strategy):
    """bf16 autocast for forward and backward: weights, BatchNorm statistics, optimizer state
    and gossip stay float32, so the workers' mean moves exactly as the averaged update says;
    the weights stay within 5e-2 of a float32 run after 5 steps (observed: 5e-3 to 3e-2)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        eng = Engine(convnet(), make_topology("ring", M), lr=0.1, strategy=strategy,
                     precision=precision, optimizer=SGD(momentum=0.9))
        for x, y in batches((2, 5, 5), 5):
            before = eng.w.mean(0)
            eng.step(x, y)
        runs[precision] = eng
    bf = runs["bf16"]
    assert bf.w.dtype == bf.b.dtype == bf.opt_state.momentum["w"].dtype == torch.float32
    # the mean moves by -lr times the mean direction (gossip preserves it), in float32
    step = -0.1 * bf.opt_state.momentum["w"].mean(0)
    torch.testing.assert_close(bf.w.mean(0), before + step, atol=1e-6, rtol=0)
    gap = (bf.w - runs["fp32"].w).abs().max().item()
    assert 1e-5 < gap < 5e-2  # bf16 did run, and stays close
    torch.testing.assert_close(bf.b, runs["fp32"].b, atol=2e-3, rtol=0)


# ---- memory format -----------------------------------------------------------------------------
class ViewsAfterConv(nn.Module):
    """``x.view(x.size(0), -1)`` after a convolution: needs contiguous activations; dropout
    before it draws random numbers on the failing attempt."""

    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.fc = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(27, 3)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_channels_last_trains_as_contiguous_does(strategy):
    """Conv nets take channels-last input by default (not under vmap, which runs contiguous);
    the run lands where the contiguous one does (the convolutions round differently), weights
    and BatchNorm statistics alike."""
    runs = {}
    for cl in (None, False):
        eng = Engine(convnet(), make_topology("ring", M), lr=0.1, strategy=strategy,
                     channels_last=cl, optimizer=SGD(momentum=0.9))
        for x, y in batches((2, 5, 5), 5):
            eng.step(x, y)
        runs[cl] = eng
    assert runs[None].objective.channels_last
    torch.testing.assert_close(runs[None].w, runs[False].w, atol=1e-5, rtol=0)
    torch.testing.assert_close(runs[None].b, runs[False].b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_model_that_needs_contiguous_activations_falls_back_once(threads, tmp_path):
    """The first channels-last call fails in ``view``; the buffers it touched and the dropout
    draws it made are put back and the run continues contiguous, bit for bit the run that never
    tried; a run resumed from its checkpoint keeps the decision (no second attempt)."""
    def engine(cl):
        return Engine(ViewsAfterConv(dropout=0.3), make_topology("ring", M), lr=0.1,
                      strategy="loop", channels_last=cl, seed=3)

    data = batches((2, 5, 5), 4)
    runs = {}
    with _intra_op_threads(threads):
        for cl in (None, False):
            eng = engine(cl)
            if cl is None:
                with pytest.warns(UserWarning, match="failed on channels-last input"):
                    eng.step(*data[0])
            else:
                eng.step(*data[0])
            eng.step(*data[1])
            torch.save(eng.state_dict(), tmp_path / f"{cl}.pt")
            for x, y in data[2:]:
                eng.step(x, y)
            runs[cl] = eng
        resumed = engine(None)
        resumed.load_state_dict(torch.load(tmp_path / "None.pt", weights_only=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second attempt, no second warning
            for x, y in data[2:]:
                resumed.step(x, y)
    assert not runs[None].objective.channels_last and not resumed.objective.channels_last
    for eng in (runs[None], resumed):
        assert torch.equal(eng.w, runs[False].w) and torch.equal(eng.b, runs[False].b)


class TiedLM(nn.Module):
    """An embedding and an output layer sharing one weight (weight tying)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mid = nn.Embedding(11, 6), nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x))))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_tied_weights_get_both_uses_gradients(strategy):
    """The slot swap ties what named_parameters() ties, as functional_call does: each worker's
    gradient equals plain autograd's on a copy of the model holding its weights."""
    model, m = TiedLM(), 3
    eng = Engine(model, make_topology("ring", m), lr=0.1, strategy=strategy)
    assert eng.layout.names == ["emb.weight", "mid.weight", "mid.bias"]
    eng.w += 0.1 * torch.randn_like(eng.w)  # workers that differ
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (m, 4), generator=gen), torch.randint(0, 11, (m, 4), generator=gen)
    grads, _, _ = eng.backend.gradients(eng.w, {}, x, y)
    for j in range(m):
        ref = eng.module(eng.worker_state(j))
        assert ref.out.weight is ref.emb.weight
        nn.functional.cross_entropy(ref(x[j]), y[j]).backward()
        expect = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
        torch.testing.assert_close(grads[j], expect, atol=1e-6, rtol=1e-6)
    assert model.out.weight is model.emb.weight  # the model's own slots are back


def test_a_failing_forward_leaves_the_models_tensors_in_place():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.register_buffer("scale", torch.ones(3))

        def forward(self, x):
            if x.shape[0] > 2:
                raise RuntimeError("no batches over 2")
            return self.lin(x) * self.scale

    model = Fails()
    before = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    eng = Engine(model, make_topology("ring", 2), lr=0.1, strategy="loop")
    obj = objective(eng)
    tensors = {**eng.params, "scale": torch.zeros(2, 3)}
    row = {n: v[0] for n, v in tensors.items()}
    assert torch.equal(obj.forward(model, row, torch.ones(2, 5)), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="no batches over 2"):
        obj.forward(model, row, torch.ones(3, 5))
    after = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    # a name that is no slot of the module goes through functional_call, as before
    extra = {**row, "lin.nothing": torch.ones(1)}
    out = obj.forward(model, extra, torch.ones(2, 5))
    assert torch.equal(out, torch.func.functional_call(model, extra, (torch.ones(2, 5),)))
    assert obj._slots[model][1] is None and not hasattr(model.lin, "nothing")

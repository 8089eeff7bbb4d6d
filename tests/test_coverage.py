"""Model coverage: every kind of layer a user brings, on every gradient backend, against the
loop-over-modules reference (deterministic models) or for reproducible progress (dropout)."""

import pytest
import torch
from torch import nn

from dsgd.engine import Engine
from dsgd.engine.reference import ReferenceEngine
from dsgd.models import build_model
from dsgd.optim import SGD
from dsgd.topology import make_topology

M, B, CLASSES = 4, 6, 3


class Recurrent(nn.Module):
    """A sequence classifier: GRU or LSTM over (B, T, F), the last step's state to logits."""

    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.rnn = cell(4, 8, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Tokens(nn.Module):
    """nn.Embedding + nn.TransformerEncoder over token ids (B, T), mean-pooled to logits."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def _seeded(make):
    def build():
        torch.manual_seed(0)
        return make()
    return build


def _floats(*shape):
    return lambda g: torch.randn(M, B, *shape, generator=g)


def _tokens(g):
    return torch.randint(0, 20, (M, B, 5), generator=g)


DETERMINISTIC = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, CLASSES)),
            _floats(5)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(),
                                        nn.Linear(8, CLASSES)), _floats(5)),
    "batchnorm1d": (lambda: nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                          nn.Linear(8, CLASSES)), _floats(5)),
    "batchnorm2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                          nn.Flatten(), nn.Linear(27, CLASSES)), _floats(2, 5, 5)),
    "gru": (lambda: Recurrent(nn.GRU), _floats(5, 4)),
    "lstm": (lambda: Recurrent(nn.LSTM), _floats(5, 4)),
    "transformer": (Tokens, _tokens),
}
BUILT_IN = {  # every built-in model, at a small input its layers accept
    "mlp": (1, 28, 28), "cnn1d": (40,), "lenet5": (1, 28, 28), "resnet8": (3, 8, 8),
    "resnet20": (3, 8, 8), "resnet18_micro": (3, 8, 8), "resnet34_micro": (3, 8, 8),
    "alexnet_micro": (3, 32, 32),
}
HEAVY = {"resnet20", "resnet18_micro", "resnet34_micro", "alexnet_micro"}  # 10-90 s each


def _maybe_slow(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


def _batches(data, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(data(g), torch.randint(0, CLASSES, (M, B), generator=g)) for _ in range(steps)]


def _against_reference(make, data, strategy, steps=3, dtype=torch.float32):
    topo = make_topology("ring", M)
    fast = Engine(make().to(dtype), topo, lr=0.05, strategy=strategy, optimizer=SGD(momentum=0.9))
    ref = ReferenceEngine(make().to(dtype), topo, lr=0.05, momentum=0.9)
    for x, y in _batches(data, steps):
        x = x.to(dtype) if x.is_floating_point() else x
        fast.step(x, y)
        ref.step(x, y)
    for name, stacked in ref.worker_params().items():
        torch.testing.assert_close(fast.params[name], stacked, atol=1e-5, rtol=1e-4)
    for name, value in ref.average_state().items():  # BatchNorm statistics too
        torch.testing.assert_close(fast.average_state()[name].to(value.dtype), value,
                                   atol=1e-5, rtol=1e-4)
    fast.close()


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("kind", list(DETERMINISTIC))
def test_layer_kinds_equal_the_reference(kind, strategy):
    make, data = DETERMINISTIC[kind]
    _against_reference(_seeded(make), data, strategy)


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("name", _maybe_slow(BUILT_IN))
def test_built_in_models_equal_the_reference(name, strategy):
    # in float64: deep nets with BatchNorm over 2x2 feature maps amplify float32 rounding
    shape = BUILT_IN[name]
    _against_reference(_seeded(lambda: build_model(name, CLASSES, shape)), _floats(*shape),
                       strategy, steps=2, dtype=torch.float64)


RANDOM = {
    "dropout_mlp": (lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3),
                                          nn.Linear(16, CLASSES)), _floats(5)),
    "transformer_dropout": (lambda: Tokens(dropout=0.1), _tokens),
    "alexnet_micro": (lambda: build_model("alexnet_micro", CLASSES, (3, 32, 32), dropout=0.5),
                        _floats(3, 32, 32)),
}


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("kind", _maybe_slow(RANDOM))
def test_models_that_draw_random_numbers_train_reproducibly(kind, strategy):
    make, data = RANDOM[kind]
    fixed = _batches(data, 1)[0]  # one batch again and again: the loss must fall

    def run(choice=None):
        engine = Engine(_seeded(make)(), make_topology("ring", M), lr=0.05, strategy=strategy,
                        seed=3)
        if choice is not None:  # auto's choice is timed, so it can differ between runs: keep it
            engine.backend.select(choice)
        losses = [engine.step(*fixed).loss.mean().item() for _ in range(12)]
        return engine, losses

    a, losses = run()
    b, _ = run(a.backend.name if strategy == "auto" else None)
    assert torch.equal(a.w, b.w)  # reproducible from the seed
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    a.close()
    b.close()

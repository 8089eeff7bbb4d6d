"""Stacked Linear layers (``dsgd.engine.stacked``): which models take the path, and gradients,
losses and accuracies equal to ``torch.func.vmap(grad(...))``, the path it replaces."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from dsgd.engine import Engine
from dsgd.engine.backends import Objective, VmapBackend, accuracy
from dsgd.engine.layout import Layout
from dsgd.engine.stacked import StackedGradients, stack
from dsgd.models import build_model
from dsgd.optim import SGD
from dsgd.topology import make_topology

M = 5


class Functional(nn.Module):
    """Layers called through functions, a Linear without bias, flatten as a method."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 9), nn.Linear(9, 4, bias=False)

    def forward(self, x):
        return self.b(F.gelu(self.a(x.flatten(1))))


class Activations(nn.Module):
    """Elementwise functions traced with keyword arguments, and tensor methods."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.a(torch.flatten(x, start_dim=1)), inplace=True)
        h = F.leaky_relu(self.b(h), negative_slope=0.2).tanh()
        return self.c(F.elu(h, alpha=0.5))


class ModeBranch(nn.Module):
    """A forward that branches on the mode: traced in train mode, as the engine steps."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 4)

    def forward(self, x):
        out = self.a(x.flatten(1))
        return out if self.training else torch.sigmoid(out)


def _hooked():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    model[1].register_forward_hook(lambda mod, args, out: out * 2)
    return model


def _weight_normed():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.Sequential(nn.Flatten(), nn.utils.weight_norm(nn.Linear(12, 4)))


class Shared(nn.Module):
    """One Linear applied twice, and a layer whose output is unused (its gradient is zero)."""

    def __init__(self):
        super().__init__()
        self.a, self.unused = nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.a(x.flatten(1)))
        self.unused(h)
        return self.a(h)


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 4)

    def forward(self, x):
        return self.a(x.flatten(1)) if x.sum() > 0 else -self.a(x.flatten(1))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.scale = nn.Linear(12, 4), nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.a(x.flatten(1)) * self.scale


STACKED = {
    "mlp": lambda: build_model("mlp", 4, (3, 4)),
    "functional": Functional,
    "flatten_module": lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(),
                                            nn.Dropout(0.0), nn.Linear(6, 4)),
    "sequence": lambda: nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 4)),
    "shared_layer": Shared,  # one Linear called twice: its two gradient contributions add up
    "activations": Activations,
    "mode_branch": lambda: ModeBranch().eval(),  # built in eval mode, trained in train mode
}
NOT_STACKED = {
    "conv": lambda: build_model("lenet5", 4, (1, 28, 28)),
    "batchnorm": lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)),
    "control_flow": Branching,
    "parameter_outside_linear": Scaled,
    "attention": lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Softmax(-1)),
    "forward_hook": _hooked,  # the traced graph would not run it
    "weight_norm": _weight_normed,  # weight_g and weight_v, no weight parameter
}


@pytest.mark.parametrize("name", NOT_STACKED)
def test_models_that_are_not_linear_stacks_keep_vmap(name):
    assert stack(NOT_STACKED[name]()) is None


def _reference(model, w, lay, loss, x, y):
    ob = Objective(model, lay, loss)
    g, (losses, acc) = vmap(grad(ob, has_aux=True))(lay.views(w), {}, x, y)
    return lay.flatten(g, batch_dims=1), losses, acc


@pytest.mark.parametrize("name", STACKED)
def test_gradients_losses_and_accuracy_equal_vmap(name):
    torch.manual_seed(0)
    model = STACKED[name]()
    plan = stack(model)
    assert plan is not None
    model.train()  # as the engine's step runs it
    params = {n: p.detach() for n, p in model.named_parameters()}
    lay = Layout(params)
    w = lay.flatten(params).repeat(M, 1) + 0.3 * torch.randn(M, lay.size)  # rows differ
    x = torch.randn(M, 7, 3, 4)  # "sequence" applies its layers to the last dim: (7, 3) tokens
    y = torch.randint(0, 4, (M, 7) if name != "sequence" else (M, 7, 3))
    loss = (F.cross_entropy if name != "sequence"
            else lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten()))
    want = _reference(model, w, lay, loss, x, y)
    got = StackedGradients(plan, lay, loss, accuracy).gradients(w, x, y)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    if name != "sequence":
        torch.testing.assert_close(got[2], want[2])


def test_ignored_targets_count_as_in_cross_entropy():
    """Targets at ignore_index (-100) leave the mean, as in each worker's F.cross_entropy."""
    torch.manual_seed(0)
    model = build_model("mlp", 4, (3, 4))
    params = {n: p.detach() for n, p in model.named_parameters()}
    lay = Layout(params)
    w = lay.flatten(params).repeat(M, 1) + 0.3 * torch.randn(M, lay.size)
    x, y = torch.randn(M, 7, 3, 4), torch.randint(0, 4, (M, 7))
    y[0, :3] = -100
    want = _reference(model, w, lay, F.cross_entropy, x, y)
    got = StackedGradients(stack(model), lay, F.cross_entropy, accuracy).gradients(w, x, y)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)


def test_dropout_masks_are_each_workers_own_and_off_in_eval_mode():
    """Dropout draws one mask over all workers' activations: with equal weights and batches the
    workers' gradients differ in train mode, equal vmap's exactly in eval mode, and the draws
    come from the generator in force (the engine's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 4))
    plan = stack(model)
    assert plan is not None
    params = {n: p.detach() for n, p in model.named_parameters()}
    lay = Layout(params)
    w = lay.flatten(params).repeat(M, 1)
    x, y = torch.randn(1, 7, 3, 4).expand(M, -1, -1, -1), torch.randint(0, 4, (1, 7)).expand(M, -1)
    stacked = StackedGradients(plan, lay, F.cross_entropy, accuracy)
    model.train()
    torch.manual_seed(5)
    g = stacked.gradients(w, x, y)[0]
    assert all(not torch.equal(g[0], g[j]) for j in range(1, M))
    torch.manual_seed(5)
    assert torch.equal(stacked.gradients(w, x, y)[0], g)  # the same draws, the same gradients
    model.eval()
    torch.testing.assert_close(stacked.gradients(w, x, y)[0],
                               _reference(model, w, lay, F.cross_entropy, x, y)[0],
                               atol=1e-6, rtol=1e-5)


def test_regression_loss():
    torch.manual_seed(0)
    model = build_model("mlp", 2, (5,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    lay = Layout(params)
    w = lay.flatten(params).repeat(M, 1) + 0.3 * torch.randn(M, lay.size)
    x, y = torch.randn(M, 8, 5), torch.randn(M, 8, 2)
    want = _reference(model, w, lay, F.mse_loss, x, y)
    got = StackedGradients(stack(model), lay, F.mse_loss, accuracy).gradients(w, x, y)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    assert torch.isnan(got[2]).all()  # no class scores: accuracy is NaN, as vmap's


def test_engine_takes_the_path_and_trains_as_the_loop_does():
    """strategy vmap on an MLP runs the stacked path (not with chunk_size or compile), and ten
    D-SGD steps with momentum land where the per-worker loop lands."""
    def run(strategy, **kw):
        torch.manual_seed(0)
        eng = Engine(build_model("mlp", 4, (3, 4)), make_topology("ring", M), lr=0.1,
                     strategy=strategy, optimizer=SGD(momentum=0.9), **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            eng.step(torch.randn(M, 6, 3, 4, generator=gen),
                     torch.randint(0, 4, (M, 6), generator=gen))
        return eng

    vm, loop, chunked = run("vmap"), run("loop"), run("vmap", chunk_size=2)
    assert isinstance(vm.backend, VmapBackend) and vm.backend._stacked is not None
    assert chunked.backend._stacked is None
    torch.testing.assert_close(vm.w, loop.w, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.w, loop.w, atol=1e-5, rtol=0)

"""Compressors (round trips, unbiasedness, byte counts against their closed forms), CHOCO-SGD
against the step-then-gossip D-SGD loop it reduces to, on fixed and time-varying schedules, and
C-SGD with compressed gradients (error feedback) against plain C-SGD and its closed form."""

import math

import pytest
import torch
from torch import nn

from dsgd.algorithms import CSGD, Choco
from dsgd.compress import (
    QSGD,
    Identity,
    LowPrecision,
    RandomK,
    Rescaled,
    Sign,
    TopK,
    compress_rows,
    generator_states,
    make_compressor,
    worker_seed,
)
from dsgd.engine import Engine, LocalCommunicator
from dsgd.engine.network import faulty
from dsgd.topology import make_topology

M, P = 4, 1000


def x(seed=0):
    return torch.randn(M, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lossless_round_trips():
    v = x()
    for comp in (Identity(), TopK(1.0), RandomK(1.0)):
        torch.testing.assert_close(comp.decompress(comp.compress(v)), v, atol=1e-12, rtol=0)
    low = LowPrecision("bf16")
    torch.testing.assert_close(low.decompress(low.compress(v)), v.to(torch.bfloat16).double())


def test_top_k_keeps_the_largest_entries():
    v = x()
    out = TopK(0.1).decompress(TopK(0.1).compress(v))
    kept = out != 0
    assert (kept.sum(1) == 100).all()
    assert (v.abs()[kept].reshape(M, -1).min(1).values
            >= v.abs().masked_fill(kept, 0).max(1).values).all()


UNBIASED = [RandomK(0.1), QSGD(3, bucket=0), QSGD(3, bucket=64)]
UNBIASED_IDS = ["randomk", "qsgd", "qsgd-buckets"]


def _variance(comp, v):
    """Each entry's variance under the compressor, in closed form."""
    if isinstance(comp, RandomK):  # v P / k with probability k / P, else 0
        return v**2 * (1 / comp.ratio - 1)
    b = comp.bucket or v.shape[1]  # each entry scaled by the norm of its bucket
    norm = torch.cat([c.norm().expand(c.shape[1]) for c in v.split(b, dim=1)])[None]
    level = v.abs() / norm * comp.levels  # rounded up with probability frac(level)
    frac = level - level.floor()
    return (norm / comp.levels) ** 2 * frac * (1 - frac)


@pytest.mark.parametrize("comp", UNBIASED, ids=UNBIASED_IDS)
def test_random_compressors_are_unbiased(comp):
    v = x()[:1]
    gen = torch.Generator().manual_seed(1)
    draws = 4000
    mean = sum(comp.decompress(comp.compress(v, gen)) for _ in range(draws)) / draws
    se = (_variance(comp, v) / draws).sqrt()  # every entry within 5 standard errors
    assert ((mean - v).abs() <= 5 * se + 1e-12).all()


@pytest.mark.parametrize("comp", [*UNBIASED, Rescaled(RandomK(0.1))],
                         ids=[*UNBIASED_IDS, "rescaled-randomk"])
def test_random_compressors_draw_each_row_from_its_own_workers_generator(comp):
    v = x()
    msg, after = compress_rows(comp, v, generator_states(5, range(M)))
    out = comp.decompress(msg)
    for j in range(M):  # row j alone, from a generator seeded for worker j
        gen = torch.Generator().manual_seed(worker_seed(5, j))
        torch.testing.assert_close(out[j:j + 1], comp.decompress(comp.compress(v[j:j + 1], gen)),
                                   atol=0, rtol=0)
        assert torch.equal(after[j], gen.get_state())
    # a block of the workers (what one torchrun rank hosts) draws what those rows drew
    block, _ = compress_rows(comp, v[2:], generator_states(5, range(2, M)))
    torch.testing.assert_close(comp.decompress(block), out[2:], atol=0, rtol=0)
    # and not worker 0's draws (one generator for every row would give those)
    first = torch.Generator().manual_seed(worker_seed(5, 0))
    assert not torch.equal(out[1:2], comp.decompress(comp.compress(v[1:2], first)))


def test_deterministic_compressors_compress_all_rows_at_once_and_draw_nothing():
    v, states = x(), generator_states(5, range(M))
    for comp in (Identity(), TopK(0.1), Sign(), LowPrecision()):
        msg, after = compress_rows(comp, v, states)
        torch.testing.assert_close(comp.decompress(msg), comp.decompress(comp.compress(v)),
                                   atol=0, rtol=0)
        assert after is states


def test_sign_is_the_scaled_sign():
    v = x()
    out = Sign().decompress(Sign().compress(v))
    torch.testing.assert_close(out, v.abs().mean(1, keepdim=True) * v.sign())


def test_byte_counts_equal_their_closed_forms():
    v = x().float()
    k = 10
    assert Identity().bytes(Identity().compress(v)) == 4 * P
    assert TopK(0.01).bytes(TopK(0.01).compress(v)) == k * (4 + 4)
    assert RandomK(0.01).bytes(RandomK(0.01).compress(v)) == k * 4 + 8
    # 4 bits an entry, a float32 norm per bucket of 512 entries (default) or of the vector
    assert QSGD(7).bytes(QSGD(7).compress(v)) == math.ceil(P * 4 / 8) + 4 * math.ceil(P / 512)
    assert QSGD(1, 0).bytes(QSGD(1, 0).compress(v)) == math.ceil(P * 2 / 8) + 4
    assert Sign().bytes(Sign().compress(v)) == math.ceil(P / 8) + 4
    assert LowPrecision("fp16").bytes(LowPrecision("fp16").compress(v)) == 2 * P
    assert isinstance(make_compressor("topk", ratio=0.5), TopK)
    with pytest.raises(ValueError, match="unknown compressor"):
        make_compressor("zip")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches(steps, m=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(m, 8, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (m, 8), generator=g)) for _ in range(steps)]


@pytest.mark.parametrize("algorithm", ["choco", "deepsqueeze"])
@pytest.mark.parametrize("compression", ["none", TopK(1.0)], ids=["identity", "topk100"])
def test_choco_with_exact_messages_and_gamma_one_is_step_then_gossip_dsgd(compression,
                                                                         algorithm):
    topo = make_topology("ring", 6)
    P = topo.matrix(0)
    choco = Engine(_mlp(), topo, lr=0.1, algorithm=algorithm, compression=compression,
                   consensus_step=1.0)
    plain = Engine(_mlp(), topo, lr=0.1, strategy="loop")  # gradients only, then by hand
    w = choco.w.clone()
    for xb, yb in _batches(5):
        choco.step(xb, yb)
        g, _, _ = plain.backend.gradients(w, {}, xb, yb)
        w = P @ (w - 0.1 * g)
    torch.testing.assert_close(choco.w, w, atol=1e-6, rtol=0)


def _resumed(engine, data, split, path):
    """``a`` trained on all of ``data``, ``b`` resumed from a's checkpoint after ``split``
    batches and trained on the rest; and a's bytes at the checkpoint."""
    a = engine()
    for xb, yb in data[:split]:
        a.step(xb, yb)
    torch.save(a.state_dict(), path)
    sent = a.comm.bytes_sent
    b = engine()
    b.load_state_dict(torch.load(path, weights_only=True))
    for xb, yb in data[split:]:
        a.step(xb, yb)
        b.step(xb, yb)
    return a, b, sent


def test_choco_top_k_trains_counts_compressed_bytes_and_resumes_bit_identically(tmp_path):
    topo = make_topology("ring", 6)

    def engine():
        return Engine(_mlp(), topo, lr=0.1, algorithm="choco",
                      compression=RandomK(0.2), consensus_step=0.5)

    a, b, _ = _resumed(engine, _batches(10), 5, tmp_path / "c.pt")
    assert torch.equal(a.w, b.w)
    params = a.layout.size
    k = math.ceil(0.2 * params)
    # a ring: every worker sends its message to 2 neighbours, each step
    assert a.comm.bytes_sent == 10 * 6 * 2 * (k * 8 + 8)
    assert a.consensus_distance() > 0


def _schedules():
    return {"one-peer-exponential": make_topology("one_peer_exponential", 8),
            "ring-with-drops": faulty(make_topology("ring", 6), drop=0.3, seed=1)}


@pytest.mark.parametrize("name", ["one-peer-exponential", "ring-with-drops"])
@pytest.mark.parametrize("compression", ["none", TopK(1.0)], ids=["identity", "topk100"])
def test_choco_on_a_time_varying_schedule_with_exact_messages_is_step_then_gossip_dsgd(
        name, compression):
    topo = _schedules()[name]
    choco = Engine(_mlp(), topo, lr=0.1, algorithm="choco", compression=compression,
                   consensus_step=1.0)
    plain = Engine(_mlp(), topo, lr=0.1, strategy="loop")  # gradients only, then by hand
    w = choco.w.clone()
    for t, (xb, yb) in enumerate(_batches(8, m=topo.m)):
        choco.step(xb, yb)
        g, _, _ = plain.backend.gradients(w, {}, xb, yb)
        w = topo.matrix(t) @ (w - 0.1 * g)  # x(t+1) = P(t) (x(t) - lr d(t))
    torch.testing.assert_close(choco.w, w, atol=1e-6, rtol=0)
    assert (w - w.mean(0)).abs().max() > 1e-3  # the workers disagree: not vacuous


def test_choco_top_k_on_a_faulty_ring_moves_the_mean_as_dsgd():
    topo = _schedules()["ring-with-drops"]
    e = Engine(_mlp(), topo, lr=0.1, algorithm="choco", compression=TopK(0.2),
               consensus_step=0.5)
    plain = Engine(_mlp(), topo, lr=0.1, strategy="loop")
    ring, dropped = make_topology("ring", 6).matrix(0), 0
    for t, (xb, yb) in enumerate(_batches(8)):
        w = e.w.clone()
        g, _, _ = plain.backend.gradients(w, {}, xb, yb)
        e.step(xb, yb)
        # sum_k P(t)[j, k] x_hat_k - x_hat_j has mean zero for a doubly stochastic P(t)
        torch.testing.assert_close(e.w.mean(0), (w - 0.1 * g).mean(0), atol=1e-12, rtol=0)
        dropped += int(((ring != 0) & (topo.matrix(t) == 0)).sum())
    assert dropped > 0  # some links were down
    assert (e.algo_state["x_hat"] != e.w).any()  # the copies lag: compression is lossy


@pytest.mark.parametrize("name, degree", [("one-peer-exponential", 3), ("ring-with-drops", 2)])
def test_choco_on_a_time_varying_schedule_sends_one_message_per_union_neighbour_and_step(
        name, degree):
    """The union graph: worker j's copy is held by j - 1, j - 2, j - 4 on the one-peer
    exponential graph of 8 (offsets 1, 2, 4 in turn), by both ring neighbours with drops."""
    topo, steps = _schedules()[name], 8
    e = Engine(_mlp(), topo, lr=0.1, algorithm="choco", compression=TopK(0.2),
               consensus_step=0.5)
    message = math.ceil(0.2 * e.layout.size) * (8 + 4)  # float64 values, int32 indices
    for xb, yb in _batches(steps, m=topo.m):
        e.step(xb, yb)
    union = sum(topo.matrix(t) for t in range(steps)) != 0
    union.fill_diagonal_(False)
    assert torch.equal(e.algo_state["holders"], union.T)  # [j, k]: k holds j's copy
    assert (union.sum(0) == degree).all()
    assert e.comm.bytes_sent == steps * topo.m * degree * message


def test_choco_time_varying_resumes_bit_identically_bytes_included(tmp_path):
    topo = _schedules()["ring-with-drops"]

    def engine():
        return Engine(_mlp(), topo, lr=0.1, algorithm="choco", compression=RandomK(0.2),
                      consensus_step=0.5)

    a, b, sent = _resumed(engine, _batches(8), 4, tmp_path / "c.pt")
    assert torch.equal(a.w, b.w)
    assert b.comm.bytes_sent == a.comm.bytes_sent - sent  # no copy sent twice after resuming


def test_choco_names_its_options():
    with pytest.raises(ValueError, match="bad options"):
        Engine(_mlp(), make_topology("ring", 6), algorithm="choco", gamma=0.5)
    assert Choco("topk").compression == TopK()


@pytest.mark.parametrize("comp", UNBIASED, ids=UNBIASED_IDS)
def test_rescaled_unbiased_compressors_are_contractions(comp):
    from dsgd.compress import Rescaled

    v = x()[:1]
    gen = torch.Generator().manual_seed(2)
    draws = 2000
    err = {name: sum(float((c.decompress(c.compress(v, gen)) - v).pow(2).sum())
                     for _ in range(draws)) / draws
           for name, c in (("plain", comp), ("rescaled", Rescaled(comp)))}
    omega, norm2 = comp.omega(v.shape[1]), float(v.pow(2).sum())
    assert err["plain"] <= omega * norm2 * 1.05  # the variance bound (5 % Monte Carlo slack)
    assert err["rescaled"] <= (1 - 1 / (1 + omega)) * norm2 * 1.05  # a contraction
    assert err["rescaled"] < norm2  # which the plain one need not be
    assert Choco(compression=comp).compression == Rescaled(comp)


@pytest.mark.parametrize("topo", [make_topology("ring", 6),
                                  faulty(make_topology("ring", 6), drop=0.3, seed=1)],
                         ids=["ring", "ring-with-drops"])
def test_deepsqueeze_moves_the_mean_as_dsgd_and_its_residual_is_what_the_message_left(topo):
    e = Engine(_mlp(), topo, lr=0.1, algorithm="deepsqueeze", compression=TopK(0.2),
               consensus_step=0.5)
    plain = Engine(_mlp(), topo, lr=0.1, strategy="loop")
    for xb, yb in _batches(6):
        w, error = e.w.clone(), e.algo_state["error"].clone()
        g, _, _ = plain.backend.gradients(w, {}, xb, yb)
        e.step(xb, yb)
        x = w - 0.1 * g
        # (P - I) c has mean zero for a doubly stochastic P: the mean is D-SGD's, exactly
        torch.testing.assert_close(e.w.mean(0), x.mean(0), atol=1e-12, rtol=0)
        v = x + error
        kept = TopK(0.2).decompress(TopK(0.2).compress(v))
        torch.testing.assert_close(e.algo_state["error"], v - kept, atol=1e-12, rtol=0)
    assert e.algo_state["error"].abs().sum() > 0



def test_deepsqueeze_trains_from_a_config(tmp_path):
    import json

    from cli_helpers import sets

    from dsgd.experiments.cli import main

    out = tmp_path / "ds"
    assert main(["train", *sets("train.algorithm=deepsqueeze", "train.consensus_step=0.5",
                                'train.compression={name="topk", ratio=0.1}'),
                 "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_acc"] > 0.3  # 10 separable clusters, chance is 0.1


# ---- C-SGD with a compressed gradient exchange (error feedback) -------------------------------
def test_csgd_with_the_identity_equals_plain_csgd_and_counts_an_all_gather():
    from dsgd.optim import SGD

    topo, steps = make_topology("ring", 6), 5
    plain = Engine(_mlp(), topo, lr=0.1, algorithm="csgd", optimizer=SGD(momentum=0.9))
    ef = Engine(_mlp(), topo, lr=0.1, algorithm=CSGD(compression="none"),
                optimizer=SGD(momentum=0.9))
    assert plain.backend.name == "one-batch" and ef.backend.name != "one-batch"
    for xb, yb in _batches(steps):
        plain.step(xb, yb)
        ef.step(xb, yb)
    torch.testing.assert_close(ef.w, plain.w, atol=1e-6, rtol=0)
    # each worker's float64 message reaches the 5 others: 5 messages sent per worker and step
    assert ef.comm.bytes_sent == steps * 6 * 5 * ef.layout.size * 8
    assert [kind for kind, _, _ in ef.comm.rounds] == ["allgather"] * steps


@pytest.mark.parametrize("comp", [TopK(0.1), Sign(), RandomK(0.1)], ids=["topk", "sign", "randomk"])
def test_csgd_error_feedback_loses_nothing_the_residual_does_not_hold(comp):
    """sum_t (1/m) sum_j c_j(t) + (1/m) sum_j e_j(T) = sum_t (1/m) sum_j g_j(t), every T."""
    alg, comm = CSGD(compression=comp), LocalCommunicator(make_topology("ring", M))
    state = alg.init(x(), comm)
    sent = total = torch.zeros(P, dtype=torch.float64)
    for t in range(20):
        g = x(seed=10 + t)  # (m, P) any gradients
        mean, state = alg.gradient(g, torch.zeros(M), state, comm, t)
        assert (mean == mean[0]).all()  # every worker steps with the same mean
        sent, total = sent + mean[0], total + g.mean(0)
        torch.testing.assert_close(sent + state["error"].mean(0), total, atol=1e-10, rtol=0)
    assert state["error"].abs().max() > 1e-3  # the messages did leave something out
    assert comm.bytes_sent == 20 * M * (M - 1) * alg.compression.bytes(
        alg.compression.compress(x()[:1], torch.Generator()))


def test_csgd_error_feedback_compresses_each_workers_own_gradient_in_the_engine():
    topo = make_topology("ring", 6)
    e = Engine(_mlp(), topo, lr=0.1, algorithm="csgd", compression=TopK(0.2))
    plain = Engine(_mlp(), topo, lr=0.1, strategy="loop")  # per-worker gradients, by hand
    w0, sent = e.w.clone(), 0
    for xb, yb in _batches(6):
        w, error = e.w.clone(), e.algo_state["error"].clone()
        g, _, _ = plain.backend.gradients(w, {}, xb, yb)  # (m, P), rows differ
        e.step(xb, yb)
        v = g + error
        torch.testing.assert_close(e.algo_state["error"], v - TopK(0.2).decompress(
            TopK(0.2).compress(v)), atol=1e-12, rtol=0)
        sent = sent + g.mean(0)
        assert (e.w == e.w[0]).all()  # the workers stay equal
    # w(T) = w(0) - lr (sum of the decoded means) = w(0) - lr (sum of mean gradients - mean e)
    torch.testing.assert_close(e.w[0], w0[0] - 0.1 * (sent - e.algo_state["error"].mean(0)),
                               atol=1e-10, rtol=0)

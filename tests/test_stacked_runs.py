"""Stacked runs (experiment/stacked_runs.py, TruncatedBPTT(runs=K, lengths=)) against the same
runs trained one at a time: every parameter's gradient, the synthesizers' targets and the
reported losses, with the runs' sequences ending at different steps in one padded batch."""

import copy

import pytest
import torch
from torch import nn

from dni.recurrent import zero_state
from experiment.stacked_runs import (
    StackedLinear,
    StackedLSTM,
    run_optimizer_state,
    run_state_dict,
    stack_optimizer_states,
    stack_runs,
)
from model import SequenceModel

I, H, O, B = 3, 5, 2, 4
LENGTHS = [7, 4, 9]   # the runs' sequence lengths; the batch is padded to 9


def models(**options):
    built = []
    for seed in range(len(LENGTHS)):
        torch.manual_seed(seed)
        model = SequenceModel(I, O, hidden=H, **options)
        for p in model.parameters():       # zero-initialised parts would hide mistakes
            nn.init.normal_(p, std=0.4)
        built.append(model)
    return built


def sequences():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(n, B, I, generator=g) for n in LENGTHS]
    ys = [torch.randn(n, B, O, generator=g) for n in LENGTHS]
    return xs, ys


def loss_of(targets):
    return lambda y, t0, t1: (y - targets[t0:t1]).pow(2).sum() / y.shape[1]


def padded(tensors):
    """(L, K*B, F): the runs' sequences side by side, run-major, zeros after each end."""
    out = torch.zeros(max(LENGTHS), len(tensors) * B, tensors[0].shape[2])
    for k, t in enumerate(tensors):
        out[:t.shape[0], k * B:(k + 1) * B] = t
    return out


def stacked_loss(ys):
    """Each run's batch-mean loss over its own steps, (K,)."""
    target = padded(ys)
    scored = torch.zeros(max(LENGTHS), len(ys) * B, 1)
    for k, n in enumerate(LENGTHS):
        scored[:n, k * B:(k + 1) * B] = 1

    def loss(y, t0, t1):
        rows = ((y - target[t0:t1]).pow(2) * scored[t0:t1]).sum((0, 2))
        return rows.view(len(ys), B).sum(1) / B
    return loss


@pytest.mark.parametrize("options", [
    {"truncation": 3, "synthesizer": None},
    {"truncation": 2, "synthesizer": "linear", "discount": 0.5},
    {"truncation": 3, "synthesizer": "linear", "discount": 0.5, "target_decay": 0.9, "center": True},
    {"truncation": 2, "synthesizer": "mlp", "discount": 0.5, "aux_weight": 0.3},
    {"truncation": 4, "synthesizer": "linear", "discount": 1.0, "aux_weight": 0.5, "target_decay": 0.5},
    {"truncation": 3, "synthesizer": "linear", "discount": 0.5, "target_decay": 0.5,
     "input_window": 4},
])
def test_stacked_runs_get_the_gradients_each_run_gets_alone(options):
    singles, xs_ys = models(**options), sequences()
    xs, ys = xs_ys
    stacked = stack_runs(models(**options))
    reports = []
    for model, x, y in zip(singles, xs, ys):
        model.zero_grad()
        reports.append(model.trainer(x, loss_of(y)))
    zeros = torch.zeros(1, len(LENGTHS) * B, H)
    report = stacked.trainer(padded(xs), stacked_loss(ys), state=(zeros, zeros.clone()),
                             lengths=torch.tensor(LENGTHS).repeat_interleave(B))
    assert stacked.trainer.runs == len(LENGTHS)
    names = [name for name, _ in stacked.named_parameters()]
    assert names == [name for name, _ in singles[0].named_parameters()]
    for k, (single, alone) in enumerate(zip(singles, reports)):
        assert torch.allclose(report.loss[k], alone.loss, atol=1e-5)
        for (name, p), (_, q) in zip(stacked.named_parameters(), single.named_parameters()):
            if q.grad is None:
                assert p.grad is None or not p.grad[k].any(), name
            else:
                assert torch.allclose(p.grad[k], q.grad, atol=1e-5), name
        if alone.synthesizer_loss is not None:
            assert torch.allclose(report.synthesizer_loss[k], alone.synthesizer_loss,
                                  rtol=1e-4), k
            for target, want in zip(report.targets, alone.targets):   # S's targets, d_k
                assert torch.allclose(target[k * B:(k + 1) * B], want, atol=1e-5)
        if alone.aux_loss is not None:
            assert torch.allclose(report.aux_loss[k], alone.aux_loss, rtol=1e-4)
        outputs = report.outputs[:LENGTHS[k], k * B:(k + 1) * B]
        assert torch.allclose(outputs, alone.outputs, atol=1e-5)
    if options.get("target_decay"):   # every run's target synthesizer followed its own S
        for k, single in enumerate(singles):
            for p, q in zip(stacked.trainer.target_synthesizer.parameters(),
                            single.trainer.target_synthesizer.parameters()):
                assert torch.allclose(p[k], q, atol=1e-6)


def test_a_run_past_its_end_receives_nothing():
    """A run whose sequence ended sends no gradient back from the padding: its gradients do
    not change when the padding's inputs change."""
    stacked = stack_runs(models(truncation=2, synthesizer="linear", discount=0.5,
                                aux_weight=0.3))
    xs, ys = sequences()
    zeros = torch.zeros(1, len(LENGTHS) * B, H)
    lengths = torch.tensor(LENGTHS).repeat_interleave(B)
    grads = []
    for noise in (0.0, 5.0):
        x = padded(xs)
        x[LENGTHS[1]:, B:2 * B] = noise       # run 1's padding
        stacked.zero_grad()
        stacked.trainer(x, stacked_loss(ys), state=(zeros, zeros.clone()), lengths=lengths)
        grads.append([p.grad[1].clone() for p in stacked.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_stacked_layers_match_their_single_layers():
    torch.manual_seed(0)
    lstms, linears = [nn.LSTM(I, H) for _ in range(3)], [nn.Linear(H, O) for _ in range(3)]
    x = torch.randn(6, 3 * B, I)
    h0, c0 = torch.randn(1, 3 * B, H), torch.randn(1, 3 * B, H)
    stacked = StackedLSTM(lstms)
    assert all(torch.equal(z, torch.zeros(1, 3 * B, H)) for z in zero_state(stacked, 3 * B))
    y, (h, c) = stacked(x, (h0, c0))
    out = StackedLinear(linears)(y)
    for k in range(3):
        part = slice(k * B, (k + 1) * B)
        want, (wh, wc) = lstms[k](x[:, part], (h0[:, part], c0[:, part]))
        assert torch.allclose(y[:, part], want, atol=1e-6)
        assert torch.allclose(h[:, part], wh, atol=1e-6)
        assert torch.allclose(c[:, part], wc, atol=1e-6)
        assert torch.allclose(out[:, part], linears[k](want), atol=1e-6)


def test_state_dicts_move_between_the_stack_and_its_runs():
    singles = models(truncation=2, synthesizer="linear", aux_weight=0.1)
    stacked = stack_runs(singles)
    for k, single in enumerate(singles):
        for name, value in run_state_dict(stacked.state_dict(), k).items():
            assert torch.equal(value, single.state_dict()[name]), name
    opts = [torch.optim.Adam(m.parameters(), lr=0.1) for m in singles]
    for model, opt in zip(singles, opts):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    stacked_opt = torch.optim.Adam(stack_runs(singles).parameters(), lr=0.1)
    stacked_opt.load_state_dict(stack_optimizer_states([o.state_dict() for o in opts]))
    for k, opt in enumerate(opts):
        back = run_optimizer_state(stacked_opt.state_dict(), k)
        for i, per_param in opt.state_dict()["state"].items():
            for key, value in per_param.items():
                assert torch.equal(back["state"][i][key], value), (i, key)


def test_layers_other_than_lstm_and_linear_are_refused():
    with pytest.raises(ValueError, match="GRU"):
        stack_runs([SequenceModel(I, O, hidden=H, core="gru") for _ in range(2)])


@pytest.mark.parametrize("options", [{"center": True}, {"center": True, "target_decay": 0.5},
                                     {"aux_weight": 0.3}])
def test_padding_of_ended_examples_changes_nothing_within_a_run(options):
    """One run whose examples end at different steps: the ended examples' padding reaches no
    gradient, not even through the centring of the synthetic gradient over the batch."""
    torch.manual_seed(0)
    model = SequenceModel(I, O, hidden=H, truncation=2, synthesizer="linear", discount=0.5,
                          **options)
    for p in model.parameters():
        nn.init.normal_(p, std=0.4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, B, I, generator=g), torch.randn(9, B, O, generator=g)
    lengths = torch.tensor([9, 4, 9, 5])
    scored = (torch.arange(9)[:, None] < lengths[None, :]).float()[..., None]

    def loss(out, t0, t1):
        return ((out - y[t0:t1]).pow(2) * scored[t0:t1]).sum() / B

    grads = []
    for noise in (0.0, 3.0):
        padded_x = torch.where(scored.bool(), x, torch.full_like(x, noise))
        fresh = copy.deepcopy(model)        # a call moves the target synthesizer
        fresh.trainer(padded_x, loss, lengths=lengths)
        grads.append([p.grad for p in fresh.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)

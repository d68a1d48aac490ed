"""Recurrent DNI (dni/recurrent.py) against autograd: full BPTT when T covers the sequence,
plain truncated BPTT at step 0, the synthesizer's bootstrapped target, LSTM / GRU cores,
RNNSynthesizer in the loop, and DNI+Aux."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni import LinearSynthesizer, RNNSynthesizer, TruncatedBPTT
from dni.interface import synthesizer_loss
from dni.recurrent import flatten_state, state_size, unflatten_state, zero_state

L, B, I, H, O = 7, 5, 3, 6, 2


def sequence(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, B, I, generator=g), torch.randn(L, B, O, generator=g)


def chunk_loss(targets):
    """Squared error summed over the chunk's steps and outputs, mean over the batch."""
    return lambda y, t0, t1: (y - targets[t0:t1]).pow(2).sum() / y.shape[1]


def build(kind="lstm", seed=1, synthesizer=True, random_synth=False, **options):
    torch.manual_seed(seed)
    core = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](I, H)
    readout = nn.Linear(H, O)
    synth = LinearSynthesizer(state_size(core)) if synthesizer else None
    if random_synth:
        nn.init.normal_(synth.net[0].weight, std=0.3)
        nn.init.normal_(synth.net[0].bias, std=0.3)
    return TruncatedBPTT(core, readout=readout, synthesizer=synth, **options)


def network_grads(bptt):
    synth = {id(p) for p in bptt.synthesizer.parameters()} if bptt.synthesizer else set()
    return [p.grad.clone() for p in bptt.parameters() if id(p) not in synth]


def full_bptt_grads(bptt, x, y):
    """The reference: the whole sequence in one graph, one backward."""
    bptt.zero_grad()
    out, _ = bptt.core(x)
    loss = chunk_loss(y)(bptt.readout(out), 0, L)
    loss.backward()
    grads = network_grads(bptt)
    bptt.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_state_flattening_round_trip(kind):
    core = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](I, H, num_layers=2)
    state = zero_state(core, B)
    pieces = state if isinstance(state, tuple) else (state,)
    pieces = tuple(torch.randn_like(p) for p in pieces)
    like = pieces if isinstance(state, tuple) else pieces[0]
    flat = flatten_state(like)
    assert flat.shape == (B, state_size(core)) == (B, 2 * H * len(pieces))
    back = unflatten_state(flat, like)
    for a, b in zip(pieces, back if isinstance(back, tuple) else (back,)):
        assert torch.equal(a, b)
    # example b's vector holds only example b's state
    assert torch.equal(flat[1, :H], pieces[0][0, 1])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("truncation", [L, L + 3])
def test_truncation_covering_the_sequence_is_full_bptt(kind, truncation):
    x, y = sequence()
    bptt = build(kind, truncation=truncation, random_synth=True)
    want_loss, want = full_bptt_grads(bptt, x, y)
    report = bptt(x, chunk_loss(y))
    assert torch.allclose(report.loss, want_loss)
    for g, w in zip(network_grads(bptt), want):
        assert torch.allclose(g, w, atol=1e-6)


def truncated_grads(bptt, x, y, T):
    """Plain truncated BPTT written out: detach the state every T steps."""
    bptt.zero_grad()
    state = None
    for t0 in range(0, L, T):
        out, state = bptt.core(x[t0:t0 + T], state)
        chunk_loss(y)(bptt.readout(out), t0, t0 + T).backward()
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    grads = network_grads(bptt)
    bptt.zero_grad()
    return grads


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("T", [2, 3])
def test_zero_initialised_synthesizer_is_truncated_bptt_at_step_0(kind, T):
    x, y = sequence()
    dni = build(kind, truncation=T, discount=1.0)
    want = truncated_grads(dni, x, y, T)
    dni(x, chunk_loss(y))
    got = network_grads(dni)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
    # a synthesizer that predicts something changes the update (the test can fail)
    dni = build(kind, truncation=T, random_synth=True)
    dni(x, chunk_loss(y))
    assert any(not torch.allclose(g, w, atol=1e-4) for g, w in zip(network_grads(dni), want))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("discount", [1.0, 0.1])
def test_synthesizer_target_is_autograd_gradient_at_chunk_start(kind, discount):
    """d_k = B * d(loss_k + <g_end, e>)/ds with g_end = scale * S(e) / B, and S's parameters
    get the gradient of sum_k ||S(s_k) - d_k||^2 / B."""
    T = 3
    x, y = sequence(2)
    dni = build(kind, truncation=T, discount=discount, random_synth=True)
    dni.zero_grad()
    report = dni(x, chunk_loss(y))
    got_synth_grads = [p.grad.clone() for p in dni.synthesizer.parameters()]
    # independently: run the chunks again with torch.autograd.grad
    S = dni.synthesizer
    like = zero_state(dni.core, B)
    s = flatten_state(like)
    targets, fit = [], 0.0
    starts = list(range(0, L, T))
    for k, t0 in enumerate(starts):
        t1 = min(t0 + T, L)
        s = s.detach().requires_grad_()
        out, end_state = dni.core(x[t0:t1], unflatten_state(s, like))
        e = flatten_state(end_state)
        objective = chunk_loss(y)(dni.readout(out), t0, t1)
        if t1 < L:
            g_end = discount * S(e.detach())[0].detach() / B
            objective = objective + (g_end * e).sum()
        (ds,) = torch.autograd.grad(objective, s)
        d = B * ds
        targets.append(d)
        fit = fit + (S(s.detach())[0] - d).pow(2).sum() / B
        s = e
    assert len(report.targets) == len(targets) == len(starts)
    for got, want in zip(report.targets, targets):
        assert torch.allclose(got, want, atol=1e-6)
    assert targets[0].abs().sum() > 0
    want_grads = torch.autograd.grad(fit, list(S.parameters()))
    for g, w in zip(got_synth_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5)
    assert torch.allclose(report.synthesizer_loss, fit.detach() / len(starts), atol=1e-6)


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("target_decay", [0.0, 0.5])
def test_synthesizer_with_an_input_window_sees_the_inputs_before_each_edge(target_decay,
                                                                            recurrent):
    """input_window W: S(e_k, x[t_k - W:t_k]) (zeros before the start) is fitted at the next
    start, and S's (or, with a target, S_bar's) is sent into chunk k's end (S(s_0, zeros) at the
    first; a recurrent S and S_bar carry their own states); the network's gradient and S's are
    autograd's; future_gradients' synthetic side is the same S; the inputs get no gradient
    from S's fit."""
    T, W = 3, 4
    x, y = sequence(4)
    torch.manual_seed(1)
    core, readout = nn.LSTM(I, H), nn.Linear(H, O)
    S = (RNNSynthesizer(state_size(core), 5, context_size=W * I) if recurrent
         else LinearSynthesizer(state_size(core), context_size=W * I))
    for p in S.parameters():
        nn.init.normal_(p, std=0.3)
    dni = TruncatedBPTT(core, T, synthesizer=S, readout=readout, discount=0.5,
                        input_window=W, target_decay=target_decay)
    if target_decay:                            # S_bar unlike S, so that sending with S fails
        for p in dni.target_synthesizer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x_leaf = x.clone().requires_grad_()
    dni.zero_grad()
    report = dni(x_leaf, chunk_loss(y))
    got_net = [p.grad.clone() for p in [*core.parameters(), *readout.parameters()]]
    got_synth = [p.grad.clone() for p in S.parameters()]
    sender = dni.target_synthesizer if target_decay else S     # as moved at the call's start

    def context(t1):
        seen = x[max(0, t1 - W):t1].transpose(0, 1).reshape(B, -1)
        return torch.cat([torch.zeros(B, W * I - seen.shape[1]), seen], 1)

    like = zero_state(core, B)
    s = flatten_state(like)
    net = [*core.parameters(), *readout.parameters()]
    want_net = [torch.zeros_like(p) for p in net]
    x_ref, want_x = x.clone().requires_grad_(), torch.zeros_like(x)
    synthetic, hidden = S(s, None, context=context(0))
    sent_hidden = sender(s, None, context=context(0))[1] if target_decay else None
    fit, targets = 0.0, []
    for t0 in range(0, L, T):
        t1 = min(t0 + T, L)
        s = s.detach().requires_grad_()
        out, end_state = core(x_ref[t0:t1], unflatten_state(s, like))
        e = flatten_state(end_state)
        objective = chunk_loss(y)(readout(out), t0, t1)
        next_synthetic = None
        if t1 < L:
            next_synthetic, hidden = S(e.detach(), hidden, context=context(t1))
            sent = next_synthetic.detach()
            if target_decay:
                with torch.no_grad():
                    sent, sent_hidden = sender(e.detach(), sent_hidden, context=context(t1))
            objective = objective + (0.5 * sent / B * e).sum()
        grads = torch.autograd.grad(objective, [s, x_ref, *net])
        targets.append(B * grads[0])
        want_x += grads[1]
        want_net = [w + g for w, g in zip(want_net, grads[2:])]
        fit = fit + (synthetic - B * grads[0]).pow(2).sum() / B
        synthetic, s = next_synthetic, e
    for got, want in zip(report.targets, targets, strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(got_net, want_net):
        torch.testing.assert_close(got, want)
    for got, want in zip(got_synth, torch.autograd.grad(fit, list(S.parameters()))):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(x_leaf.grad, want_x)   # the network's alone: S's fit adds none
    if not recurrent:
        pairs = dni.future_gradients(x, chunk_loss(y))
        with torch.no_grad():
            s, ends = flatten_state(like), []
            for t0 in range(0, L - T, T):
                _, state = core(x[t0:t0 + T], unflatten_state(s, like))
                s = flatten_state(state)
                ends.append((t0 + T, s))
        assert len(pairs) == len(ends) == 2
        for (synthetic, _), (t1, e) in zip(pairs, ends):
            torch.testing.assert_close(synthetic, S(e, None, context=context(t1))[0] / B)
    with pytest.raises(ValueError, match="input_window"):
        TruncatedBPTT(core, T, input_window=2)


STREAM_T, STREAM_CUT = 2, 4       # the stream tests' truncation and the step of their cut


def stream_trainer(synthesizer_of, target_decay: float, **options) -> TruncatedBPTT:
    """A fresh TruncatedBPTT (LSTM, T = STREAM_T, discount 0.5) whose S is
    synthesizer_of(state width), its weights drawn at random; S_bar's drawn apart from S's,
    so that sending with S instead fails."""
    torch.manual_seed(1)
    core, readout = nn.LSTM(I, H), nn.Linear(H, O)
    S = synthesizer_of(state_size(core))
    for p in S.parameters():
        nn.init.normal_(p, std=0.3)
    dni = TruncatedBPTT(core, STREAM_T, synthesizer=S, readout=readout, discount=0.5,
                        target_decay=target_decay, **options)
    if target_decay:
        for p in dni.target_synthesizer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return dni


def loss_from(y, t):
    """chunk_loss(y) for a call that starts at step t of the sequence."""
    return lambda out, t0, t1: chunk_loss(y)(out, t0 + t, t1 + t)


def cut_into_two_calls(dni, x, y, history=None, carry_synth_state=False):
    """The sequence as two calls cut at STREAM_CUT, the first `continues=True`, the second
    from its state, given `history` (and the first's synth_state if `carry_synth_state`);
    S_bar is put back between them, so that both send with the S_bar of one call over the
    whole sequence."""
    sender = dni.target_synthesizer
    sent_with = copy.deepcopy(sender.state_dict()) if sender is not None else None
    first = dni(x[:STREAM_CUT], chunk_loss(y), continues=True)
    if sender is not None:
        sender.load_state_dict(sent_with)
    synth_state = first.synth_state if carry_synth_state else None
    return first, dni(x[STREAM_CUT:], loss_from(y, STREAM_CUT), state=first.state,
                      history=history, synth_state=synth_state)


def assert_same_pairs_after_the_cut(after_cut, whole, x, y):
    """future_gradients from the cut on equal the whole sequence's at the edges after it."""
    pairs = whole.future_gradients(x, chunk_loss(y))
    edges_after_cut = (L - 1 - STREAM_CUT) // STREAM_T
    assert len(after_cut) == edges_after_cut >= 1
    for (synthetic, true), (want_synthetic, want_true) in zip(after_cut,
                                                              pairs[-edges_after_cut:]):
        torch.testing.assert_close(synthetic, want_synthetic)
        torch.testing.assert_close(true, want_true)


@pytest.mark.parametrize("center, target_decay", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_a_stream_cut_into_calls_with_history_trains_as_one_call(center, target_decay):
    """input_window on a stream: the sequence cut at a chunk edge into two calls (the first
    `continues=True`, the second from its state with the first's inputs as `history`, longer
    than the window, so only its last W steps count) gives the network, S and S's targets what
    one call over the whole sequence gives, and future_gradients the same pairs after the cut;
    without the history S's context at the cut is zeros and S's gradient differs."""
    W, cut = 3, STREAM_CUT
    x, y = sequence(5)

    def fresh():
        return stream_trainer(lambda width: LinearSynthesizer(width, context_size=W * I),
                              target_decay, input_window=W, center=center)

    def grads(dni):
        return {name: p.grad.clone() for name, p in dni.named_parameters()
                if p.grad is not None}

    whole = fresh()
    report = whole(x, chunk_loss(y))
    parts, cut_targets = [], []
    for history in (x[:cut], None):
        dni = fresh()
        first, second = cut_into_two_calls(dni, x, y, history=history)
        parts.append(grads(dni))
        cut_targets.append(first.targets + second.targets)
        if history is not None:
            after_cut = dni.future_gradients(x[cut:], loss_from(y, cut), state=first.state,
                                             history=history)
    for got, want in zip(cut_targets[0], report.targets, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(parts[0], grads(whole))
    S_weight = "synthesizer.net.0.weight"
    assert not torch.allclose(parts[1][S_weight], grads(whole)[S_weight])
    assert_same_pairs_after_the_cut(after_cut, whole, x, y)
    with pytest.raises(ValueError, match="history must be"):
        fresh()(x[cut:], loss_from(y, cut), history=x[:cut, :2])


@pytest.mark.parametrize("target_decay", [0.0, 0.5])
def test_a_recurrent_synthesizer_carried_across_calls_runs_on_as_in_one_call(target_decay):
    """A recurrent S (and S_bar) on a stream cut at a chunk edge into two calls, the second
    given the first's `synth_state`: S's targets and fit, the network's gradients and the
    future_gradients pairs after the cut are those of one call over the whole sequence; without
    the carried state S restarts from zeros at the cut and its targets there differ."""
    cut = STREAM_CUT
    x, y = sequence(6)

    def fresh():
        return stream_trainer(lambda width: RNNSynthesizer(width, 5), target_decay)

    def network_grads_of(dni):
        return {name: p.grad.clone() for name, p in dni.named_parameters()
                if p.grad is not None and not name.startswith("synthesizer.")}

    whole = fresh()
    report = whole(x, chunk_loss(y))
    assert report.synth_state is not None
    cut_targets, cut_grads, cut_fits = [], [], []
    for carry in (True, False):
        dni = fresh()
        first, second = cut_into_two_calls(dni, x, y, carry_synth_state=carry)
        cut_targets.append(first.targets + second.targets)
        cut_grads.append(network_grads_of(dni))
        cut_fits.append(sum(r.synthesizer_loss * len(r.targets) for r in (first, second)))
        if carry:
            after_cut = dni.future_gradients(x[cut:], loss_from(y, cut), state=first.state,
                                             synth_state=first.synth_state)
    for got, want in zip(cut_targets[0], report.targets, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(cut_grads[0], network_grads_of(whole))
    # S's predictions, through its fit: the sum of the per-edge losses of the two calls
    torch.testing.assert_close(cut_fits[0], report.synthesizer_loss * len(report.targets))
    assert not torch.allclose(cut_fits[1], cut_fits[0])
    # the chunk after the cut: its end gets S's gradient, from the restarted S without the carry
    assert not torch.allclose(cut_targets[1][cut // STREAM_T], report.targets[cut // STREAM_T])
    assert_same_pairs_after_the_cut(after_cut, whole, x, y)


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("aux_weight", [0.0, 0.3])
def test_target_synthesizer_sends_the_gradient_and_follows_by_moving_average(recurrent,
                                                                          aux_weight):
    """With target_decay, the gradient sent into each chunk's end (and so the bootstrapped
    target and the aux head's target) is the slow copy's S_bar(e), which runs its own hidden
    state; the online S is fitted on those targets; S_bar <- d * S_bar + (1 - d) * S at the
    start of each training call, and not in eval mode or without gradients."""
    T, decay, scale = 3, 0.9, 0.5
    x, y = sequence(5)
    torch.manual_seed(1)
    core, readout = nn.LSTM(I, H), nn.Linear(H, O)
    synth = RNNSynthesizer(state_size(core), 8) if recurrent else LinearSynthesizer(state_size(core))
    dni = TruncatedBPTT(core, T, synthesizer=synth, readout=readout, discount=scale,
                        target_decay=decay, aux_weight=aux_weight, aux_input_size=H)
    S, S_bar = dni.synthesizer, dni.target_synthesizer
    assert all(torch.equal(a, b) for a, b in zip(S.parameters(), S_bar.parameters()))
    with torch.no_grad():                       # make the two differ, as after some steps
        for p in S.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in S_bar.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if aux_weight:
            nn.init.normal_(dni.aux_head.weight, std=0.3)
    before = [p.clone() for p in S_bar.parameters()]
    dni.eval()
    dni(x, chunk_loss(y))
    dni.train()
    with torch.no_grad():
        dni(x, chunk_loss(y))
    assert all(torch.equal(a, b) for a, b in zip(before, S_bar.parameters()))
    dni.zero_grad()
    report = dni(x, chunk_loss(y))
    for b, p, q in zip(before, S.parameters(), S_bar.parameters()):
        assert torch.allclose(q, decay * b + (1 - decay) * p, atol=1e-6)
        assert not q.requires_grad and q.grad is None
    got_synth_grads = [p.grad.clone() for p in S.parameters()]
    got_aux_grads = [p.grad.clone() for p in dni.aux_head.parameters()] if aux_weight else []
    like = zero_state(dni.core, B)
    s = flatten_state(like)
    prediction, hidden = S(s, None)
    _, target_hidden = S_bar(s, None)
    fit, aux_losses, aux_total = 0.0, [], 0.0
    for k, t0 in enumerate(range(0, L, T)):
        t1 = min(t0 + T, L)
        s = s.detach().requires_grad_()
        out, end_state = dni.core(x[t0:t1], unflatten_state(s, like))
        e = flatten_state(end_state)
        objective = chunk_loss(y)(dni.readout(out), t0, t1)
        sent = torch.zeros_like(e)
        if t1 < L:
            with torch.no_grad():
                sent, target_hidden = S_bar(e, target_hidden)
            objective = objective + (scale * sent / B * e).sum()
        if aux_weight:
            aux = synthesizer_loss(dni.aux_head(out).flatten(0, 1), sent.repeat(t1 - t0, 1))
            aux_losses.append(aux.detach())
            aux_total = aux_total + aux_weight * aux
        (ds,) = torch.autograd.grad(objective, s, retain_graph=True)  # the aux loss: not in it
        assert torch.allclose(report.targets[k], B * ds, atol=1e-6)
        fit = fit + (prediction - B * ds).pow(2).sum() / B
        if t1 < L:
            prediction, hidden = S(e.detach(), hidden)
        s = e
    for g, w in zip(got_synth_grads, torch.autograd.grad(fit, list(S.parameters()))):
        assert torch.allclose(g, w, atol=1e-5)
    if aux_weight:
        assert torch.allclose(report.aux_loss, torch.stack(aux_losses).mean(), atol=1e-6)
        want = torch.autograd.grad(aux_total, list(dni.aux_head.parameters()))
        for g, w in zip(got_aux_grads, want):
            assert torch.allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_bad_target_decay(decay):
    with pytest.raises(ValueError):
        build("lstm", truncation=3, target_decay=decay)
    with pytest.raises(ValueError):
        build("lstm", truncation=3, synthesizer=False, target_decay=0.5)


def test_synthetic_gradient_is_zero_after_the_end():
    """The last chunk's objective has no synthetic term: its target is the local gradient."""
    x, y = sequence(3)
    dni = build("lstm", truncation=4, random_synth=True)
    report = dni(x, chunk_loss(y))
    like = zero_state(dni.core, B)
    start = flatten_state(dni.core(x[:4])[1]).detach().requires_grad_()
    out, _ = dni.core(x[4:], unflatten_state(start, like))
    (ds,) = torch.autograd.grad(chunk_loss(y)(dni.readout(out), 4, L), start)
    assert torch.allclose(report.targets[-1], B * ds, atol=1e-6)


@pytest.mark.parametrize("center", [False, True])
def test_a_continuing_sequence_gets_the_synthetic_gradient_at_its_last_end(center):
    """continues=True (a stream cut into calls): every chunk's end, the last one's too, gets
    g_end = discount * S(e) / B (centred over the batch with `center`), from the state given;
    S is fit on d_k = B * d(loss_k + <g_end, e>)/ds_k."""
    T, discount = 3, 0.5
    x, y = sequence(4)
    dni = build("lstm", truncation=T, discount=discount, random_synth=True, center=center)
    like = tuple(torch.randn_like(p) for p in zero_state(dni.core, B))
    dni.zero_grad()
    report = dni(x, chunk_loss(y), state=like, continues=True)
    got_synth_grads = [p.grad.clone() for p in dni.synthesizer.parameters()]

    def S(state):
        out = dni.synthesizer(state.detach())[0]
        return out - out.mean(0, keepdim=True) if center else out

    s, targets, fit = flatten_state(like), [], 0.0
    for t0 in range(0, L, T):
        t1 = min(t0 + T, L)
        s = s.detach().requires_grad_()
        out, end_state = dni.core(x[t0:t1], unflatten_state(s, like))
        e = flatten_state(end_state)
        g_end = discount * S(e).detach() / B
        objective = chunk_loss(y)(dni.readout(out), t0, t1) + (g_end * e).sum()
        (ds,) = torch.autograd.grad(objective, s)
        targets.append(B * ds)
        fit = fit + (S(s) - B * ds).pow(2).sum() / B
        s = e
    for got, want in zip(report.targets, targets, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    want_grads = torch.autograd.grad(fit, list(dni.synthesizer.parameters()))
    for g, w in zip(got_synth_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5)
    stopped = dni(x, chunk_loss(y), state=like)          # the default: 0 after the end
    assert not torch.allclose(stopped.targets[-1], report.targets[-1])


def test_rnn_synthesizer_carries_its_state_and_learns():
    """RNNSynthesizer in the loop: its hidden state runs across chunk edges, its loss falls."""
    x, y = sequence(4)
    torch.manual_seed(0)
    core, readout = nn.LSTM(I, H), nn.Linear(H, O)
    synth = RNNSynthesizer(state_size(core), hidden_size=16)
    dni = TruncatedBPTT(core, 2, synthesizer=synth, readout=readout, discount=0.5)
    opt = torch.optim.Adam(synth.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        losses.append(dni(x, chunk_loss(y)).synthesizer_loss.item())
        assert all(p.grad is not None for p in synth.rnn.parameters())
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_dni_aux_trains_core_and_head_but_not_the_synthesizers_target():
    """DNI+Aux against autograd, chunk by chunk: S's target is B * d(loss_k + <g_end, e>)/ds
    without the aux loss (which holds S's own output); the core gets the gradient of the chunk
    loss, the future and aux_weight * aux; the aux head gets aux_weight * d aux; S is fitted to
    those targets. On the old code the aux gradient leaked into the target."""
    T, w = 2, 0.7
    x, y = sequence(5)
    dni = build("lstm", truncation=T, random_synth=True, aux_weight=w, discount=0.5)
    nn.init.normal_(dni.aux_head.weight, std=0.3)  # zero-initialised, it would send nothing
    dni.zero_grad()
    report = dni(x, chunk_loss(y))
    S, core, head = dni.synthesizer, dni.core, dni.aux_head
    like = zero_state(core, B)
    s = flatten_state(like)
    prediction = dni.synthetic_gradient(s)[0]
    core_params = list(core.parameters()) + list(dni.readout.parameters())
    want_core = [torch.zeros_like(p) for p in core_params]
    want_head = [torch.zeros_like(p) for p in head.parameters()]
    fit = 0.0
    for k, t0 in enumerate(range(0, L, T)):
        t1 = min(t0 + T, L)
        s = s.detach().requires_grad_()
        out, end_state = core(x[t0:t1], unflatten_state(s, like))
        e = flatten_state(end_state)
        main = chunk_loss(y)(dni.readout(out), t0, t1)
        sent = torch.zeros_like(e)
        if t1 < L:
            sent = dni.synthetic_gradient(e)[0].detach()
            main = main + (0.5 * sent / B * e).sum()
        aux = w * synthesizer_loss(head(out).flatten(0, 1), sent.repeat(t1 - t0, 1))
        (ds,) = torch.autograd.grad(main, s, retain_graph=True)
        assert torch.allclose(report.targets[k], B * ds, atol=1e-6), k
        (with_aux,) = torch.autograd.grad(main + aux, s, retain_graph=True)
        assert not torch.allclose(with_aux, ds, atol=1e-6), "the aux loss must matter here"
        for acc, g in zip(want_core, torch.autograd.grad(main + aux, core_params,
                                                         retain_graph=True)):
            acc += g
        for acc, g in zip(want_head, torch.autograd.grad(aux, list(head.parameters()))):
            acc += g
        fit = fit + (prediction - B * ds).pow(2).sum() / B
        prediction = dni.synthetic_gradient(e)[0] if t1 < L else None
        s = e
    for p, want in zip(core_params, want_core):
        assert torch.allclose(p.grad, want, atol=1e-5)
    for p, want in zip(head.parameters(), want_head):
        assert torch.allclose(p.grad, want, atol=1e-5)
    for p, want in zip(S.parameters(), torch.autograd.grad(fit, list(S.parameters()))):
        assert torch.allclose(p.grad, want, atol=1e-5)


def test_grad_scale_is_a_deprecated_name_of_discount():
    core = nn.LSTM(I, H)
    with pytest.warns(DeprecationWarning, match="discount"):
        bptt = TruncatedBPTT(core, 2, synthesizer=LinearSynthesizer(2 * H), grad_scale=0.3)
    assert bptt.discount == 0.3 and bptt.grad_scale == 0.3


def test_chunks_that_score_nothing():
    """A loss only at the last step (add / argmax): early chunks have no local loss."""
    x, y = sequence(6)

    def last_step(out, t0, t1):
        return F.mse_loss(out[-1], y[-1], reduction="sum") / B if t1 == L else out.sum() * 0

    bptt = build("gru", truncation=2, synthesizer=False)
    bptt(x, last_step)
    grads = network_grads(bptt)
    assert grads[0].abs().sum() > 0
    dni = build("gru", truncation=2, random_synth=True)
    report = dni(x, last_step)
    assert len(report.targets) == 4


def test_custom_core_needs_an_initial_state():
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.RNNCell(I, H)

        def forward(self, x, h):
            outs = []
            for xt in x:
                h = self.cell(xt, h)
                outs.append(h)
            return torch.stack(outs), h

    core = Cell()
    x, y = sequence(7)
    dni = TruncatedBPTT(core, 3, synthesizer=LinearSynthesizer(H), readout=nn.Linear(H, O))
    with pytest.raises(TypeError, match="initial state"):
        dni(x, chunk_loss(y))
    report = dni(x, chunk_loss(y), state=torch.zeros(B, H))
    assert report.outputs.shape == (L, B, O) and report.state.shape == (B, H)

    class CellWithZeroState(Cell):
        def zero_state(self, batch, device=None, dtype=None):
            return torch.zeros(batch, H, device=device, dtype=dtype)

    core = CellWithZeroState()
    core.load_state_dict(dni.core.state_dict())
    dni.core = core
    again = dni(x, chunk_loss(y))                       # the core gives its own zero state
    assert torch.equal(again.outputs, report.outputs)


def test_bad_options():
    core = nn.LSTM(I, H)
    with pytest.raises(ValueError):
        TruncatedBPTT(core, 0)
    with pytest.raises(ValueError):
        TruncatedBPTT(core, 2, synthesizer=LinearSynthesizer(2 * H), discount=-1.0)
    with pytest.raises(ValueError):
        TruncatedBPTT(core, 2, aux_weight=1.0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("discount", [1.0, 0.5])
def test_future_gradient_is_the_discounted_gradient_of_the_losses_after_the_edge(kind,
                                                                                  discount):
    T = 2
    bptt = build(kind, truncation=T, discount=discount, random_synth=True)
    x, y = sequence()
    loss = chunk_loss(y)
    pairs = bptt.future_gradients(x, loss)
    assert len(pairs) == (L - 1) // T                     # edges at t = 2, 4, 6
    # reference: run the whole sequence, keep the state at each edge, then from a leaf copy of
    # that state re-run the rest; the chunk j edges later weighs discount ** j
    with torch.no_grad():
        edge_states, state = [], zero_state(bptt.core, B)
        for t0 in range(0, L, T):
            if t0 > 0:
                edge_states.append((t0, flatten_state(state)))
            _, state = bptt.core(x[t0:t0 + T], state)
    for (synthetic, true), (t_edge, flat) in zip(pairs, edge_states):
        leaf = flat.clone().requires_grad_()
        state, future = unflatten_state(leaf, zero_state(bptt.core, B)), 0.0
        for j, t0 in enumerate(range(t_edge, L, T)):
            out, state = bptt.core(x[t0:t0 + T], state)
            future = future + discount ** j * loss(bptt.readout(out), t0, min(t0 + T, L))
        expected, = torch.autograd.grad(future, leaf)
        torch.testing.assert_close(true, expected)
        torch.testing.assert_close(synthetic, bptt.synthesizer(flat, None)[0] / B)
    assert all(p.grad is None for p in bptt.parameters())   # a diagnostic: nothing accumulated


def test_future_gradient_of_an_untrained_synthesizer_is_zero():
    bptt = build(truncation=3)
    pairs = bptt.future_gradients(*[sequence()[0], chunk_loss(sequence()[1])])
    assert pairs and all(torch.count_nonzero(s) == 0 and torch.count_nonzero(t) > 0
                         for s, t in pairs)


def test_future_gradients_leave_the_training_random_stream_as_it_was():
    """A core and readout with dropout, in training mode: the numbers drawn after a logged
    step's diagnostic are those drawn without it."""
    torch.manual_seed(1)
    core = nn.LSTM(I, H, num_layers=2, dropout=0.5)
    readout = nn.Sequential(nn.Dropout(0.5), nn.Linear(H, O))
    bptt = TruncatedBPTT(core, 2, readout=readout, synthesizer=LinearSynthesizer(state_size(core)))
    x, y = sequence()
    draws = []
    for diagnose in (False, True):
        torch.manual_seed(5)
        if diagnose:
            assert bptt.future_gradients(x, chunk_loss(y))
        draws.append(torch.rand(8))
    torch.testing.assert_close(draws[1], draws[0])

"""The GPT (model.GPT), synthetic gradients on sequence activations (B, T, d), and
lm.py --model gpt: the decoder is causal; DNI(gpt, optim=opt) on a tiny GPT sends, fits and
bootstraps as autograd and the hand-written reference step say, with the positions counted into
the batch; cDNI's context is per position; no synthesizer flattens a sequence; lm.py trains,
scores and resumes exactly. A small text made here stands in for the corpus."""

import copy
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from dni import DNI, LinearSynthesizer, MLPSynthesizer, SequenceConvSynthesizer
from dni.reference import reference_step
from dni.synthesizers import one_hot
from experiment.data import load_text
from experiment.errors import RunInterrupted
from experiment.lm_flags import parse_args
from experiment.lm_train import build_gpt, evaluate_gpt_bpc, token_loss, train
from model import GPT
from tests.conftest import assert_same_run, run_records

VOCAB, WIDTH, CONTEXT, BATCH = 7, 16, 8, 3
TINY = ["--model", "gpt", "--width", "16", "--layers", "2", "--heads", "2", "--context", "8",
        "--batch-size", "4", "--device", "cpu", "--threads", "1", "--eval-every", "4"]


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(VOCAB, width=WIDTH, layers=2, heads=2, context=CONTEXT)


def tokens(seed, batch=BATCH, length=CONTEXT):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb_synthesizers(model, std=0.2):
    """Synthesizers start at zero: give them something to say."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.interfaces.parameters():
            p.normal_(std=std)


def test_gpt_is_a_stack_of_sequence_blocks_and_causal():
    net = tiny_gpt()
    assert [type(m).__name__ for m in net] == ["TokenEmbedding", "TransformerBlock",
                                               "TransformerBlock", "Sequential"]
    x = tokens(0)
    h = net[0](x)
    assert h.shape == (BATCH, CONTEXT, WIDTH) and net[1](h).shape == h.shape
    logits = net(x)
    assert logits.shape == (BATCH, CONTEXT, VOCAB)
    changed = x.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    after = net(changed)
    assert torch.allclose(after[:, :5], logits[:, :5], atol=1e-6)   # the past is untouched
    assert not torch.allclose(after[:, 5:], logits[:, 5:])
    with pytest.raises(ValueError, match="longer than the context"):
        net(tokens(0, length=CONTEXT + 1))


def test_one_cut_sends_fits_and_trains_as_autograd_says():
    """One interface after block 1 of a tiny GPT, one SGD step: the lower blocks get
    S(h) / (B T) (the positions count into the batch), the upper ones the true gradient
    of the mean token loss from h on, and S is fit on ||S(h) - B T dL/dh||^2 summed over
    features, averaged over the B T positions."""
    net = tiny_gpt()
    reference = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model = DNI(net, optim=opt, blocks=["1"], synthesizer_lr=0.05, example_input=tokens(0))
    perturb_synthesizers(model)
    synthesizer = copy.deepcopy(model.interfaces[0].synthesizer)
    x, y = tokens(1), tokens(2)
    opt.zero_grad()
    loss = token_loss(model(x), y)
    loss.backward()

    positions = BATCH * CONTEXT
    lower, upper = list(reference[:2].parameters()), list(reference[2:].parameters())
    h = reference[:2](x)
    s = synthesizer(h.detach(), None)[0]
    want_lower = torch.autograd.grad(h, lower, grad_outputs=s.detach() / positions)
    h_in = h.detach().requires_grad_()
    ref_loss = token_loss(reference[2:](h_in), y)
    *want_upper, true = torch.autograd.grad(ref_loss, [*upper, h_in])
    fit = (s - positions * true).pow(2).sum() / positions
    want_synth = torch.autograd.grad(fit, list(synthesizer.parameters()))

    assert torch.allclose(loss, ref_loss, atol=1e-6)
    got_lower, got_upper = list(net[:2].parameters()), list(net[2:].parameters())
    for got, want in zip([*got_lower, *got_upper], [*want_lower, *want_upper]):
        assert torch.allclose(got.grad, want, atol=1e-6)
    for got, want in zip(model.interfaces[0].synthesizer.parameters(), want_synth):
        assert torch.allclose(got.grad, want, atol=1e-5)
    interface = model.interfaces[0]
    assert torch.allclose(interface.last_target, true, atol=1e-7)
    assert interface.last_loss.item() == pytest.approx(fit.item(), rel=1e-5)


SEQUENCE_KINDS = [("linear", {}), ("mlp", {"hidden_size": 8}),
                  ("sequence_conv", {"hidden_size": 8, "kernel_size": 3})]


@pytest.mark.parametrize("kind, options", SEQUENCE_KINDS)
@pytest.mark.parametrize("conditioned, center", [(False, False), (True, False), (False, True),
                                                 (True, True)])
def test_reference_step_equals_dni_on_a_gpt(kind, options, conditioned, center):
    """An interface after every block (the default: embedding, block 1, block 2), so the
    lower targets are bootstrapped through the blocks above; three SGD steps; every
    parameter, synthesizer and loss equal to dni.reference's step."""
    net = tiny_gpt()
    reference = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model = DNI(net, optim=opt, synthesizer=kind, example_input=tokens(0),
                context_size=VOCAB if conditioned else 0, synthesizer_lr=0.05,
                center_gradients=center, **options)
    assert model.block_names == ["0", "1", "2"]
    perturb_synthesizers(model)
    synthesizers = [copy.deepcopy(i.synthesizer) for i in model.interfaces]
    ref_opt = torch.optim.SGD([{"params": reference.parameters()},
                               {"params": [p for s in synthesizers for p in s.parameters()],
                                "lr": 0.05}], lr=0.1)
    for step in range(3):
        x, y = tokens(10 + step), tokens(20 + step)
        opt.zero_grad()
        loss = token_loss(model(x, context=y) if conditioned else model(x), y)
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ref_loss = reference_step(list(reference)[:-1], synthesizers, reference[-1], x, y,
                                  token_loss, center=center,
                                  context=one_hot(y, VOCAB) if conditioned else None)
        ref_opt.step()
        assert torch.allclose(loss, ref_loss, atol=1e-6), step
        for (name, a), b in zip(net.named_parameters(), reference.parameters()):
            assert torch.allclose(a, b, atol=1e-6), (step, name)
        for i, (interface, s) in enumerate(zip(model.interfaces, synthesizers)):
            for a, b in zip(interface.synthesizer.parameters(), s.parameters()):
                assert torch.allclose(a, b, atol=1e-6), (step, i)


def test_the_default_synthesizer_of_a_sequence_acts_per_position():
    net = tiny_gpt()
    model = DNI(net, optim=torch.optim.SGD(net.parameters(), lr=0.1), example_input=tokens(0),
                context_size=VOCAB)
    synthesizer = model.interfaces[0].synthesizer
    assert isinstance(synthesizer, LinearSynthesizer)
    assert sum(p.numel() for p in synthesizer.parameters()) == (WIDTH + VOCAB) * WIDTH + WIDTH
    perturb_synthesizers(model)
    h = torch.randn(BATCH, CONTEXT, WIDTH)
    for t in range(CONTEXT):   # position t's gradient is the map of position t's [h, c] alone
        row = synthesizer(h[:, t], None, context=one_hot(tokens(2)[:, t], VOCAB))[0]
        whole = synthesizer(h, None, context=one_hot(tokens(2), VOCAB))[0]
        assert torch.allclose(whole[:, t], row, atol=1e-6)


@pytest.mark.parametrize("kind, options", SEQUENCE_KINDS)
def test_no_synthesizer_size_depends_on_the_sequence_length(kind, options):
    sizes = []
    for length in (4, 8, 64):
        net = GPT(VOCAB, width=WIDTH, layers=2, heads=2, context=64)
        model = DNI(net, synthesizer=kind, example_input=tokens(0, length=length),
                    context_size=VOCAB, **options)
        sizes.append([sum(p.numel() for p in i.parameters()) for i in model.interfaces])
    assert sizes[0] == sizes[1] == sizes[2]
    assert max(sizes[0]) < (CONTEXT * WIDTH) ** 2 / 4   # far from one T d x T d map


def test_cdni_context_is_each_positions_target():
    """With cDNI, position t's synthetic gradient changes with y_t and with nothing else of y
    (per-position synthesizer), and lm.py's step hands the targets as the context."""
    net = tiny_gpt()
    model = DNI(net, optim=torch.optim.SGD(net.parameters(), lr=0.1), blocks=["1"],
                context_size=VOCAB, example_input=tokens(0))
    perturb_synthesizers(model)
    interface = model.interfaces[0]
    h, y = torch.randn(BATCH, CONTEXT, WIDTH), tokens(3)
    changed = y.clone()
    changed[:, 4] = (changed[:, 4] + 1) % VOCAB
    a = interface.predict(h, one_hot(y, VOCAB))
    b = interface.predict(h, one_hot(changed, VOCAB))
    moved = (a - b).abs().sum(dim=(0, 2))
    assert moved[4] > 0 and moved[torch.arange(CONTEXT) != 4].sum() == 0


def test_sequence_conv_looks_only_at_this_and_later_positions():
    synthesizer = SequenceConvSynthesizer(WIDTH, hidden_size=8, kernel_size=3)
    torch.manual_seed(0)
    assert torch.count_nonzero(synthesizer(torch.randn(2, CONTEXT, WIDTH))[0]) == 0
    with torch.no_grad():
        for p in synthesizer.parameters():
            p.normal_(std=0.3)
    h = torch.randn(2, CONTEXT, WIDTH)
    changed = h.clone()
    changed[:, 5] += 1.0
    moved = (synthesizer(h)[0] - synthesizer(changed)[0]).abs().sum(dim=(0, 2))
    assert (moved[3:6] > 0).all()                              # kernel 3: t = 3, 4, 5 see 5
    assert moved[:3].sum() == 0 and moved[6:].sum() == 0
    with pytest.raises(ValueError, match=r"\(B, T, d\)"):
        synthesizer(torch.randn(2, WIDTH))


def test_the_mlp_synthesizer_normalises_over_positions():
    synthesizer = MLPSynthesizer(WIDTH, hidden_size=8, num_layers=2)
    out = synthesizer(torch.randn(BATCH, CONTEXT, WIDTH))[0]
    assert out.shape == (BATCH, CONTEXT, WIDTH)
    assert synthesizer.net[1].num_batches_tracked == 1


def test_gpt_bpc_is_the_cross_entropy_of_a_fixed_distribution(small_text):
    splits = load_text(str(small_text))
    net = GPT(splits.vocab_size, width=WIDTH, layers=1, heads=2, context=CONTEXT)
    counts = torch.bincount(splits.train, minlength=splits.vocab_size).float() + 1
    p = counts / counts.sum()
    with torch.no_grad():
        net[-1][1].weight.zero_()
        net[-1][1].bias.copy_(p.log())
    want = -p.log2()[splits.valid[1:]].mean().item()
    assert evaluate_gpt_bpc(net, splits.valid, CONTEXT, batch_size=5) == \
        pytest.approx(want, rel=1e-5)


def test_lm_builds_the_cuts_and_the_conditioned_context(small_text):
    args = parse_args([*TINY, "--corpus", str(small_text), "--cuts", "2", "0",
                       "--conditioned"])
    assert args.cuts == [0, 2] and args.lr == 1e-3
    model, optimizer = build_gpt(args, VOCAB, torch.device("cpu"))
    assert model.block_names == ["0", "2"] and model.context_size == VOCAB
    assert optimizer.param_groups[-1]["params"] == list(model.synthesizer_parameters())
    bp, _ = build_gpt(parse_args([*TINY, "--method", "bp"]), VOCAB, torch.device("cpu"))
    assert isinstance(bp, GPT)


def test_lower_lr_gives_the_blocks_up_to_the_top_cut_their_own_rate():
    args = parse_args([*TINY, "--cuts", "1", "0", "--lower-lr", "0.1", "--synth-lr", "1e-2"])
    model, optimizer = build_gpt(args, VOCAB, torch.device("cpu"))
    lower, upper, synthesizers = optimizer.param_groups
    net = model.net
    assert lower["params"] == [*net[0].parameters(), *net[1].parameters()]
    assert upper["params"] == [*net[2].parameters(), *net[3].parameters()]
    assert synthesizers["params"] == list(model.synthesizer_parameters())
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-3, 1e-2])
    _, optimizer = build_gpt(parse_args([*TINY]), VOCAB, torch.device("cpu"))
    assert len(optimizer.param_groups) == 2   # the network's, the synthesizers'


def test_frozen_control_never_trains_the_blocks_up_to_the_cut(small_text, tmp_path):
    args = parse_args([*TINY, "--corpus", str(small_text), "--method", "frozen", "--cuts", "1",
                       "--steps", "6", "--out", str(tmp_path)])
    assert args.cuts == [1]
    torch.manual_seed(args.seed)
    start, optimizer = build_gpt(args, load_text(str(small_text)).vocab_size,
                                 torch.device("cpu"))
    assert isinstance(start, GPT)
    assert [p for g in optimizer.param_groups for p in g["params"]] == \
        [*start[2].parameters(), *start[3].parameters()]
    start = {k: v.clone() for k, v in start.state_dict().items()}
    summary = train(args)
    assert summary["method"] == "frozen" and summary["cuts"] == [1]
    _, _, state = run_records(tmp_path)
    assert state.keys() == start.keys()
    for key in state:
        frozen = key.split(".")[0] in ("0", "1")    # the embedding and block 1
        assert torch.equal(state[key], start[key]) == frozen, key


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt", "--method", "bptt"], "--method: bptt is not a method of --model gpt"),
    (["--model", "gpt", "--truncation", "3"], "--truncation: is a flag of --model lstm"),
    (["--cuts", "1"], "--cuts: is a flag of --model gpt, not lstm"),
    (["--method", "bp"], "--method: bp is not a method of --model lstm"),
    (["--model", "gpt", "--method", "bp", "--conditioned"], "for --method dni, not bp"),
    (["--model", "gpt", "--method", "frozen", "--lower-lr", "0.1"],
     "--lower-lr: for --method dni, not frozen"),
    (["--model", "gpt", "--method", "frozen", "--conditioned"], "for --method dni, not frozen"),
    (["--model", "gpt", "--cuts", "5"], "--cuts: distinct blocks from 0 to --layers 4"),
    (["--model", "gpt", "--synthesizer", "rnn"], "--synthesizer: rnn is not a synthesizer"),
    (["--model", "gpt", "--synthesizer", "loss_gradient"], "loss_gradient needs --conditioned"),
    (["--model", "gpt", "--heads", "3"], "--heads: --width 128 is not a multiple of 3")])
def test_mismatched_flags_give_one_error_line(run_script, argv, message):
    result = run_script("lm.py", *argv)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_script_trains_a_gpt_and_writes_bits_per_character(run_script, small_text, tmp_path):
    result = run_script("lm.py", *TINY, "--corpus", small_text, "--steps", "8",
                        "--method", "dni", "--conditioned", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    rows, summary, _ = run_records(tmp_path)
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert all(r["valid_bpc"] and r["sg_loss"] and r["sg_cos"] and not r["aux_loss"]
               for r in rows)
    assert -1 <= float(rows[-1]["sg_cos"]) <= 1
    assert summary["valid_bpc"] == pytest.approx(min(float(r["valid_bpc"]) for r in rows),
                                                 rel=1e-6)
    assert 0 < summary["test_bpc"] < 8 and summary["stopped_by"] == "steps"
    assert summary["cuts"] == [1] and summary["conditioned"] is True
    assert summary["epochs"] == pytest.approx(8 * 4 * 8 / len(load_text(str(small_text)).train))
    assert "gpt cdni: test" in result.stdout


@pytest.mark.parametrize("method", [["dni", "--conditioned"], ["dni", "--synthesizer",
                                    "sequence_conv", "--synth-hidden", "8"], ["bp"]])
def test_gpt_sigterm_then_resume_is_exact(tmp_path, small_text, method):
    def run_args(out):
        return parse_args([*TINY, "--corpus", str(small_text), "--steps", "14",
                           "--out", str(out), "--method", *method])

    train(run_args(tmp_path / "ref"))

    def kill(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunInterrupted):
        train(run_args(tmp_path / "cut"), on_step=kill)
    assert not (tmp_path / "cut" / "summary.json").exists()
    train(parse_args(["--resume", str(tmp_path / "cut")]))
    assert_same_run(tmp_path / "cut", tmp_path / "ref",
                    ("valid_bpc", "test_bpc", "best_step", "steps", "epochs"))


def test_a_resume_keeps_the_gpt_and_refuses_lstm_flags(run_script, small_text, tmp_path):
    summary = train(parse_args([*TINY, "--corpus", str(small_text), "--steps", "4",
                                "--out", str(tmp_path)]))
    assert summary["steps"] == 4 and not math.isnan(summary["valid_bpc"])
    result = run_script("lm.py", "--resume", tmp_path, "--cuts", "0")
    assert result.returncode == 2 and "--cuts 0 contradicts the run's 1" in result.stderr
    result = run_script("lm.py", "--resume", tmp_path, "--discount", "0.3")
    assert result.returncode == 2 and "--discount: is a flag of --model lstm" in result.stderr
    result = run_script("lm.py", "--resume", tmp_path, "--steps", "8")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8


def test_token_loss_is_the_mean_over_every_position():
    logits, y = torch.randn(2, 5, VOCAB), torch.randint(0, VOCAB, (2, 5))
    want = sum(F.cross_entropy(logits[b, t][None], y[b, t][None]) for b in range(2)
               for t in range(5)) / 10
    assert torch.allclose(token_loss(logits, y), want)


def test_loss_gradient_synthesizer_is_exact_under_a_linear_head():
    """Cut below a linear head with the mean token loss: the loss_gradient synthesizer with
    the head's W, b and a = 1 sends the true gradient (the blocks below get what backprop
    gives them) and its regression loss is zero."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, VOCAB))
    reference = copy.deepcopy(net)
    x, y = torch.randn(BATCH, CONTEXT, WIDTH), tokens(2)
    model = DNI(net, optim=torch.optim.SGD(net.parameters(), lr=0.1), blocks=["0"],
                synthesizer="loss_gradient", context_size=VOCAB, example_input=x)
    synthesizer = model.interfaces[0].synthesizer
    with torch.no_grad():
        synthesizer.head.load_state_dict(net[1].state_dict())
        synthesizer.scale.fill_(1.0)
    token_loss(model(x, context=y), y).backward()
    token_loss(reference(x), y).backward()
    for got, want in zip(net.parameters(), reference.parameters()):
        assert torch.allclose(got.grad, want.grad, atol=1e-7)
    assert model.interfaces[0].last_loss.item() < 1e-12

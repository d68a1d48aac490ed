"""dni.pipeline: stages in separate processes (gloo, spawned here) against one-process DNI
with interfaces at the same blocks, and against a hand-written pipeline at staleness k."""

import math
import os
import traceback
from collections import deque

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dni import DNI
from dni.pipeline import (
    PipelineStage,
    balanced_stages,
    block_costs,
    check_counts,
    counted_split,
    interface_positions,
    stage_costs,
    synthesizer_costs,
)
from dni.pipeline.transport import Layout
from dni.wrapper import synthesizer_factory
from tests.conftest import free_port

STEPS = 6
BATCH = 16
LR, SYNTH_LR = 1e-2, 3e-3


def mlp(seed: int, width: int = 24) -> nn.Sequential:
    """A small FCN of four blocks (three interfaces), the shape of the project's MLP.
    BatchNorm sits in the first block only: below BatchNorm a gradient sums to zero over the
    batch, and a synthesizer bias fitted to it is rounding noise that Adam magnifies, which
    would make exact comparisons fail on noise alone."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Linear(12, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Linear(width, 5))


def mlp_batchnorm_everywhere(seed: int, width: int = 24) -> nn.Sequential:
    """The FCN with BatchNorm in every block, as the project's MLP has it (compared under
    SGD, which does not magnify the rounding noise that Adam would, see mlp())."""
    torch.manual_seed(seed)
    return nn.Sequential(
        *[nn.Sequential(nn.Linear(12 if i == 0 else width, width), nn.BatchNorm1d(width),
                        nn.ReLU()) for i in range(3)],
        nn.Linear(width, 5))


def cnn(seed: int) -> nn.Sequential:
    """A small CNN of three blocks on 1x8x8 inputs (feature maps cross the stage edges)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 5)))


def dropout_net(seed: int) -> nn.Sequential:
    """Two blocks that both end in dropout of the same shape (one stage each)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5)),
        nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.5), nn.Linear(32, 5)))


NETS = {"mlp": mlp, "mlp_bn": mlp_batchnorm_everywhere, "cnn": cnn, "dropout": dropout_net}
INPUTS = {"mlp": (12,), "mlp_bn": (12,), "cnn": (1, 8, 8), "dropout": (4,)}


def optimizer(kind: str, params):
    return torch.optim.SGD(params, lr=LR) if kind == "sgd" else torch.optim.Adam(params, lr=LR)


def data(steps: int = STEPS, shape: tuple = (12,)):
    """Batches of random inputs and labels (the last one smaller, to test padding)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(steps * BATCH - 5, *shape, generator=g)
    y = torch.randint(0, 5, (len(x),), generator=g)
    return list(zip(x.split(BATCH), y.split(BATCH)))


def ends(counts):
    """The last block of every stage but the last (0-based): where edge interfaces sit."""
    return [sum(counts[:s + 1]) - 1 for s in range(len(counts) - 1)]


def float_contexts(steps: int = STEPS) -> list[torch.Tensor]:
    """A float context (batch, 5) per batch of data(): soft labels, which truncation to
    integers would turn into zeros."""
    g = torch.Generator().manual_seed(11)
    contexts = torch.randn(steps * BATCH - 5, 5, generator=g).softmax(1)
    return list(contexts.split(BATCH))


def summed_cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def one_process(conditioned: bool, grad_scale: float, synthesizer: str = "linear",
                steps: int = STEPS, after: list[int] | None = None, net: str = "mlp",
                optim: str = "adam", center: bool = False, float_context: bool = False,
                summed: bool = False, measure_steps: tuple = (), figures: list | None = None,
                **options):
    """Blocks, synthesizers and synthesizer buffers after `steps` steps of one-process DNI,
    with interfaces after every hidden block or after the blocks in `after` (0-based).
    Uncentred unless `center`: a centred synthesizer's output bias has a gradient of rounding
    noise alone, which Adam magnifies (see mlp()); centring is compared under SGD.
    `float_context`: cDNI on float_contexts(); `summed`: a loss summed over the batch
    (batch_mean=False). `figures` collects each step's (synthesizer losses, cosines), the
    cosines measured before the steps in `measure_steps` (nan elsewhere)."""
    batches = data(steps, INPUTS[net])
    contexts = float_contexts(steps) if float_context else [y for _, y in batches]
    loss_fn = summed_cross_entropy if summed else F.cross_entropy
    net = NETS[net](seed=3)
    opt = optimizer(optim, net.parameters())
    model = DNI(net, optim=opt, synthesizer=synthesizer,
                context_size=5 if conditioned or float_context else 0,
                blocks=None if after is None else [str(i) for i in after],
                grad_scale=grad_scale, synthesizer_lr=SYNTH_LR, example_input=batches[0][0][:2],
                center_gradients=center, batch_mean=not summed, **options)
    for step, ((x, y), c) in enumerate(zip(batches, contexts)):
        context = c if conditioned or float_context else None
        cosines = [float("nan")] * len(model.interfaces)
        if step in measure_steps:
            cosines = model.gradient_cosines(loss_fn, x, y, context=context)
        opt.zero_grad()
        out = model(x, context=context)
        loss_fn(out, y).backward()
        opt.step()
        if figures is not None:
            figures.append((model.synthetic_gradient_losses(), cosines))
    blocks = [p.detach().clone() for p in net.parameters()]
    synth = [p.detach().clone() for p in model.synthesizer_parameters()]
    buffers = [b.clone() for b in model.interfaces.buffers()]
    statistics = {k: b.clone() for k, b in net.named_buffers()
                  if k.split(".")[-1].startswith("running")}
    return blocks, synth, buffers, statistics


def as_tuple(figures):
    """(step, losses, cosines) of a stage's reported figures (None stays None)."""
    return None if figures is None else (figures.step, figures.losses, figures.cosines)


def _worker(rank, world, port, out, options):
    """One stage: train, drain the synthesizer updates still owed, evaluate, then save its
    parameters (or the error) to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        kind = options.get("net", "mlp")
        net = NETS[kind](seed=3)
        steps = options.get("steps", STEPS)
        batches = data(steps, INPUTS[kind])
        float_context = options.get("float_context", False)
        contexts = float_contexts(steps) if float_context else [None] * len(batches)
        summed = options.get("summed", False)
        stage = PipelineStage(net, batches[0][0][:2], max_batch=BATCH,
                              synthesizer=options.get("synthesizer", "linear"),
                              counts=options.get("counts"),
                              interfaces=options.get("interfaces", "edges"),
                              context_size=5 if options["conditioned"] or float_context else 0,
                              grad_scale=options["grad_scale"], staleness=options["staleness"],
                              message_dtype=options.get("message_dtype"),
                              center_gradients=options.get("center", False),
                              **({"loss_fn": summed_cross_entropy, "batch_mean": False}
                                 if summed else {}),
                              **options.get("synthesizer_options", {}))
        masks = []   # each dropout layer's mask, step by step, in training
        for module in stage.blocks.modules():
            if isinstance(module, nn.Dropout):
                module.register_forward_hook(
                    lambda m, args, out: masks.append(out == 0) if m.training else None)
        opt = optimizer(options.get("optim", "adam"),
                        stage.param_groups(lr=LR, synthesizer_lr=SYNTH_LR))
        measure_steps = options.get("measure_steps", ())
        losses, figures = [], []
        for step, ((x, y), context) in enumerate(zip(batches, contexts)):
            # only the keywords a test needs: the others run as the earlier API did
            keywords = {"context": context} if float_context else {}
            if measure_steps:
                keywords["measure"] = step in measure_steps
            losses.append(stage.train_step(opt, x, y, report=True, **keywords))
            figures.append(as_tuple(stage.reported_figures()) if measure_steps else None)
        drained = stage.drain(opt)
        stage.eval()
        outputs = [stage.eval_step(x, y) for x, y in batches]
        figures.append(as_tuple(stage.reported_figures()) if measure_steps else None)
        torch.save({"blocks": [p.detach() for p in stage.block_parameters()],
                    "synth": [p.detach() for p in stage.synthesizer_parameters()],
                    "synth_buffers": [b for b in stage.interfaces.buffers()],
                    "block_state": stage.blocks.state_dict(), "counts": stage.counts,
                    "losses": losses, "outputs": outputs, "drained": drained,
                    "masks": masks, "figures": figures,
                    "times": vars(stage.times)}, f"{out}/stage{rank}.pt")
        stage.flush()
    except Exception:  # noqa: BLE001 (reported to the test through the file)
        with open(f"{out}/stage{rank}.err", "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_stages(tmp_path, world=2, **options):
    options.setdefault("conditioned", False)
    options.setdefault("grad_scale", 1.0)
    mp.start_processes(_worker, args=(world, free_port(), str(tmp_path), options),
                       nprocs=world, start_method="spawn")
    errors = list(tmp_path.glob("*.err"))
    assert not errors, errors[0].read_text()
    return [torch.load(tmp_path / f"stage{r}.pt") for r in range(world)]


def assert_all_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conditioned,grad_scale,counts", [
    (False, 1.0, [1, 3]), (True, 0.5, [2, 2])])
def test_all_interfaces_at_staleness_0_follow_one_process_dni_exactly(
        tmp_path, conditioned, grad_scale, counts):
    """interfaces="all", staleness 0: each stage waits for its target before the next batch,
    so every block and synthesizer equals one-process DNI's (same seed, same Adam)."""
    stages = run_stages(tmp_path, conditioned=conditioned, grad_scale=grad_scale, counts=counts,
                        staleness=0, interfaces="all")
    blocks, synth, _, _ = one_process(conditioned, grad_scale)
    assert_all_close([p for s in stages for p in s["blocks"]], blocks)
    assert_all_close([p for s in stages for p in s["synth"]], synth)
    # the synthesizers did learn (they start at zero), so the comparison has teeth
    assert all(p.abs().sum() > 0 for s in stages for p in s["synth"])


@pytest.mark.parametrize("world,counts,conditioned,grad_scale", [
    (2, [1, 3], False, 1.0), (3, [1, 1, 2], True, 0.5), (4, [1, 1, 1, 1], False, 1.0)])
def test_edges_at_staleness_0_follow_one_process_dni_with_interfaces_at_the_cuts(
        tmp_path, world, counts, conditioned, grad_scale):
    """The default, interfaces="edges": N stages equal one-process DNI whose only interfaces
    sit after each stage's last block, parameter for parameter; inside a stage, backprop."""
    stages = run_stages(tmp_path, world=world, counts=counts, conditioned=conditioned,
                        grad_scale=grad_scale, staleness=0)
    blocks, synth, _, _ = one_process(conditioned, grad_scale, after=ends(counts))
    assert_all_close([p for s in stages for p in s["blocks"]], blocks)
    assert_all_close([p for s in stages for p in s["synth"]], synth)
    assert [len(s["synth"]) for s in stages] == [2] * (world - 1) + [0]  # weight, bias
    assert all(p.abs().sum() > 0 for s in stages for p in s["synth"])
    if world < 4:   # against interfaces everywhere, blocks inside a stage learn differently
        every, _, _, _ = one_process(conditioned, grad_scale)
        got = [p for s in stages for p in s["blocks"]]
        assert not all(torch.allclose(g, w) for g, w in zip(got, every))


@pytest.mark.parametrize("net, counts, conditioned, synthesizer, optim", [
    ("cnn", [1, 2], True, "conv", "adam"),          # cDNI, conv synthesizers on feature maps
    ("mlp_bn", [2, 2], False, "linear", "sgd"),     # BatchNorm in every block
])
def test_other_networks_at_staleness_0_follow_one_process_dni(tmp_path, net, counts,
                                                              conditioned, synthesizer, optim):
    """The edge pipeline on a CNN under cDNI with a one-layer conv synthesizer (main.py's for
    the CNN), and on an FCN with BatchNorm in every block: parameters and BatchNorm running
    statistics equal one-process DNI's."""
    options = {"num_layers": 1} if synthesizer == "conv" else {}
    stages = run_stages(tmp_path, counts=counts, conditioned=conditioned, staleness=0,
                        net=net, synthesizer=synthesizer, optim=optim,
                        synthesizer_options=options)
    blocks, synth, _, statistics = one_process(conditioned, 1.0, synthesizer=synthesizer,
                                               after=ends(counts), net=net, optim=optim,
                                               **options)
    assert_all_close([p for s in stages for p in s["blocks"]], blocks)
    assert_all_close([p for s in stages for p in s["synth"]], synth)
    assert all(p.abs().sum() > 0 for s in stages for p in s["synth"])
    got = {}
    for s, offset in zip(stages, [0, counts[0]]):
        got.update({f"{int(k.split('.')[0]) + offset}.{k.split('.', 1)[1]}": v
                    for k, v in s["block_state"].items() if k.split(".")[-1].startswith("running")})
    assert got.keys() == statistics.keys() and len(got) == (6 if net == "mlp_bn" else 0)
    assert_all_close(list(got.values()), list(statistics.values()))


@pytest.mark.parametrize("world, counts, interfaces", [
    (3, [1, 1, 2], "edges"), (2, [1, 3], "all")])
def test_centred_pipeline_follows_one_process_dni(tmp_path, world, counts, interfaces):
    """The library's default, synthetic gradients centred below the top interface: the
    pipeline centres the same interfaces as one-process DNI (compared under SGD)."""
    stages = run_stages(tmp_path, world=world, counts=counts, staleness=0,
                        interfaces=interfaces, optim="sgd", center=True)
    after = ends(counts) if interfaces == "edges" else None
    blocks, synth, _, _ = one_process(False, 1.0, after=after, optim="sgd", center=True)
    assert_all_close([p for s in stages for p in s["blocks"]], blocks)
    assert_all_close([p for s in stages for p in s["synth"]], synth)
    # under SGD a centred synthesizer's output bias stays at zero but for rounding (its
    # gradient sums a centred residual over the batch); uncentred, it learns the mean target
    _, uncentred, _, _ = one_process(False, 1.0, after=after, optim="sgd")
    centred = [p.abs().max() for s in stages for p in s["synth"]][1::2]
    free = [p.abs().max() for p in uncentred[1::2]]
    assert all(f > 1000 * c for f, c in zip(free[:-1], centred[:-1]))
    assert centred[-1] > 1e-4 and torch.isclose(centred[-1], free[-1], rtol=0.1)  # not centred


def test_three_stages_with_all_interfaces_follow_one_process_dni(tmp_path):
    """A middle stage with no inner interface both receives targets and sends them on."""
    stages = run_stages(tmp_path, world=3, staleness=0, counts=[1, 1, 2], interfaces="all")
    blocks, synth, _, _ = one_process(False, 1.0)
    got = [p for s in stages for p in s["blocks"] + s["synth"]]
    want = blocks[:3] + synth[:2] + blocks[3:5] + synth[2:4] + blocks[5:] + synth[4:]
    assert_all_close(got, want)


def test_batchnorm_synthesizer_counts_each_batch_once(tmp_path):
    """An MLP synthesizer with BatchNorm runs again when its target arrives; its running
    statistics still match one-process DNI, which runs it once a step."""
    options = {"hidden_size": 8, "num_layers": 2}
    stages = run_stages(tmp_path, counts=[2, 2], staleness=0, synthesizer="mlp",
                        synthesizer_options=options)
    _, synth, buffers, _ = one_process(False, 1.0, synthesizer="mlp", after=[1], **options)
    # the bias right before BatchNorm has no gradient but rounding noise (see mlp()), and
    # the running mean carries it; every other parameter and statistic must agree
    got = stages[0]["synth"]
    assert_all_close(got[:1] + got[2:], synth[:1] + synth[2:])
    mean, var, batches = stages[0]["synth_buffers"]
    assert batches.item() == buffers[2].item() == STEPS   # one count per step, not two
    torch.testing.assert_close(var, buffers[1])
    torch.testing.assert_close(mean, buffers[0], atol=1e-3, rtol=0)


def test_stages_draw_their_own_dropout_masks(tmp_path):
    """Every rank is seeded alike (equal initial weights); the two stages' same-shaped
    dropout layers must still draw their own masks, as one process draws two different ones
    in a step."""
    stages = run_stages(tmp_path, net="dropout", counts=[1, 1], staleness=0, steps=3)
    lower, upper = stages[0]["masks"], stages[1]["masks"]
    assert len(lower) == len(upper) == 3
    for step, (a, b) in enumerate(zip(lower, upper)):
        assert a.shape == b.shape and a.shape[1] == 32
        assert 0.3 < a.float().mean() < 0.7 and 0.3 < b.float().mean() < 0.7
        assert not torch.equal(a, b), f"the stages drew the same mask at step {step + 1}"


def assert_figures_equal(got, want):
    """Two lists of per-step (losses, cosines), nan where not measured, equal to rounding."""
    assert len(got) == len(want)
    for step, ((got_losses, got_cosines), (losses, cosines)) in enumerate(zip(got, want)):
        assert got_losses == pytest.approx(losses, rel=1e-4, abs=1e-6, nan_ok=True), step
        assert got_cosines == pytest.approx(cosines, rel=1e-4, abs=1e-5, nan_ok=True), step


@pytest.mark.parametrize("world, counts, interfaces", [
    (3, [1, 1, 2], "edges"), (2, [1, 3], "all")])
def test_each_step_reports_its_own_losses_and_cosines_as_one_process(tmp_path, world, counts,
                                                                    interfaces):
    """At staleness 0 the last stage hands out, for every step, each interface's synthesizer
    loss of that step's fit and, on measured steps, its cosine to the true gradient, equal to
    one-process DNI's synthetic_gradient_losses() after the step and gradient_cosines()
    before it; the last step's figures come with the evaluation."""
    measured = (0, 2, 3, STEPS - 1)
    stages = run_stages(tmp_path, world=world, counts=counts, staleness=0,
                        interfaces=interfaces, measure_steps=measured)
    after = ends(counts) if interfaces == "edges" else None
    want = []
    one_process(False, 1.0, after=after, measure_steps=measured, figures=want)
    reported = stages[-1]["figures"]
    assert reported[0] is None   # step 0's figures come with step 1's message
    assert [f[0] for f in reported[1:]] == list(range(STEPS))
    assert_figures_equal([(f[1], f[2]) for f in reported[1:]], want)
    assert all(math.isfinite(c) for step in measured for c in want[step][1])
    # the synthesizers start at zero (cosine 0); after a step they predict something
    assert any(abs(c) > 1e-2 for step in measured[1:] for c in want[step][1])
    assert all(f is None for stage in stages[:-1] for f in stage["figures"])


def test_float_context_and_summed_loss_follow_one_process_dni(tmp_path):
    """A float context (soft labels) is used as DNI uses it, not truncated to integers; with
    a loss summed over the batch, batch_mean=False makes the same synthesizer units as DNI's."""
    stages = run_stages(tmp_path, counts=[1, 3], staleness=0, float_context=True,
                        summed=True)
    blocks, synth, _, _ = one_process(False, 1.0, after=[0], float_context=True, summed=True)
    assert_all_close([p for s in stages for p in s["blocks"]], blocks)
    assert_all_close([p for s in stages for p in s["synth"]], synth)
    assert all(p.abs().sum() > 0 for s in stages for p in s["synth"])
    # the synthesizer's context weights learned from the float context
    assert stages[0]["synth"][0][:, -5:].abs().sum() > 0


def stale_reference(counts: list[int], staleness: int, steps: int, grad_scale: float = 1.0):
    """The edges pipeline at staleness k, written out in one process: at step t, stage s
    trains its blocks by backprop from S_s(h_t) (scaled, per-example units / B), sends
    d = dL/dh_in down, and fits S_s on the (h, d) pair of step t - k; the pairs still owed
    at the end are fitted one optimizer step each. Returns every parameter, stage by stage."""
    net = mlp(seed=3)
    blocks = list(net.children())
    factory = synthesizer_factory("linear")
    width = blocks[1][0].in_features
    cuts = [0] + [sum(counts[:s + 1]) for s in range(len(counts))]
    stages = [nn.Sequential(*blocks[cuts[s]:cuts[s + 1]]) for s in range(len(counts))]
    synths = [factory((width,), 0) for _ in stages[:-1]]
    opts = [torch.optim.Adam([{"params": list(stage.parameters()), "lr": LR}] +
                             ([{"params": list(synths[s].parameters()), "lr": SYNTH_LR}]
                              if s < len(synths) else []))
            for s, stage in enumerate(stages)]
    last = len(stages) - 1
    outputs = [{} for _ in stages]   # outputs[s][t]: h of stage s at step t
    targets = [{} for _ in stages]   # targets[s][t]: d sent down to stage s for step t
    queues = [deque() for _ in stages]

    def fit(s):
        t = queues[s].popleft()
        h, d = outputs[s][t], targets[s][t]
        S = synths[s](h, None)[0]
        ((S - len(h) * d) ** 2).sum().div(len(h)).backward()

    for t, (x, y) in enumerate(data(steps)):
        for s, stage in enumerate(stages):        # forward and backward, bottom up
            opts[s].zero_grad(set_to_none=True)
            h_in = x if s == 0 else outputs[s - 1][t].requires_grad_()
            h = stage(h_in)
            if s == last:
                F.cross_entropy(h, y).backward()
            else:
                outputs[s][t] = h.detach()
                with torch.no_grad():
                    g = synths[s](h, None)[0]
                h.backward(grad_scale * g / len(h))
            if s > 0:
                targets[s - 1][t] = h_in.grad / (1.0 if s == last else grad_scale)
                outputs[s - 1][t] = outputs[s - 1][t].detach()
        for s in range(len(stages)):              # fits of step t - k, then the steps
            if s < last:
                queues[s].append(t)
                while len(queues[s]) > staleness:
                    fit(s)
            opts[s].step()
    for s in range(last):
        while queues[s]:
            opts[s].zero_grad(set_to_none=True)
            fit(s)
            opts[s].step()
    return [[p.detach().clone() for p in list(stage.parameters()) +
             (list(synths[s].parameters()) if s < last else [])]
            for s, stage in enumerate(stages)]


@pytest.mark.parametrize("world,staleness", [
    (2, 0), (2, 1), (2, 2), (2, 8), (3, 0), (3, 1), (3, 2), (3, 8)])
def test_staleness_k_fits_each_synthesizer_on_the_pair_of_step_t_minus_k(
        tmp_path, world, staleness):
    """Against the pipeline written out by hand: at step t each edge synthesizer is fitted on
    its own (h, d) of step t - k, and the k pairs still owed at the end are drained. With k
    past the pipeline's depth (8), no stage may wait on a receive that was never posted."""
    counts = [1, 3] if world == 2 else [1, 1, 2]
    steps = 12
    stages = run_stages(tmp_path, world=world, counts=counts, staleness=staleness,
                        steps=steps, grad_scale=0.5)
    want = stale_reference(counts, staleness, steps, grad_scale=0.5)
    for stage, expected in zip(stages, want):
        assert_all_close(stage["blocks"] + stage["synth"], expected)
    assert [s["drained"] for s in stages] == [staleness] * (world - 1) + [0]
    if staleness:   # a pipeline one step off would fit other pairs: the reference tells
        off_by_one = stale_reference(counts, staleness - 1, steps, grad_scale=0.5)
        assert not all(torch.allclose(g, w) for g, w in zip(stages[0]["synth"],
                                                             off_by_one[0][-2:]))


def test_evaluation_runs_through_the_pipeline(tmp_path):
    """eval_step at the last stage returns the whole network's output in eval mode, the
    smaller last batch included."""
    stages = run_stages(tmp_path, staleness=1, counts=[2, 2])
    net = load_blocks(stages, (0, 2))
    assert stages[0]["outputs"] == [None] * STEPS
    for (x, y), (out, labels) in zip(data(), stages[1]["outputs"]):
        assert torch.equal(labels, y) and labels.dtype == torch.long
        with torch.no_grad():
            torch.testing.assert_close(out, net(x))
    assert len(stages[1]["outputs"][-1][0]) == BATCH - 5


def load_blocks(stages, firsts) -> nn.Sequential:
    """The test network with every stage's trained blocks, in eval mode."""
    net = mlp(seed=3)
    for stage, first in zip(stages, firsts):
        owned = {int(k.split(".")[0]) for k in stage["block_state"]}
        for i in owned:
            prefix = f"{i}."
            net[first + i].load_state_dict({k[len(prefix):]: v for k, v in
                                            stage["block_state"].items() if k.startswith(prefix)})
    return net.eval()


def test_bfloat16_messages_round_activations_and_keep_labels_and_steps_exact(tmp_path):
    """With message_dtype=bfloat16 the last stage sees stage 0's output rounded to bfloat16
    (and nothing else changed); labels and step counts arrive exact."""
    stages = run_stages(tmp_path, staleness=1, counts=[2, 2], message_dtype=torch.bfloat16)
    net = load_blocks(stages, (0, 2))
    for (x, y), (out, labels) in zip(data(), stages[1]["outputs"]):
        assert torch.equal(labels, y)
        with torch.no_grad():
            h = net[1](net[0](x)).to(torch.bfloat16).float()
            torch.testing.assert_close(out, net[3](net[2](h)))
            assert not torch.allclose(out, net(x), rtol=0, atol=1e-7)


def test_layout_fields_keep_their_dtypes():
    layout = Layout([("header", torch.float64, 3), ("labels", torch.int64, 5),
                     ("h", torch.bfloat16, 7)])
    assert layout.nbytes == 24 + 40 + 16
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layout.field(buffer, "header")[:] = torch.tensor([1.0, 123456789.0, float("nan")],
                                                     dtype=torch.float64)
    layout.field(buffer, "labels")[:3] = torch.tensor([9, 2**40, -1])
    layout.field(buffer, "h")[:2] = torch.tensor([1.0, 1 / 3])
    assert layout.field(buffer, "header")[1].item() == 123456789.0
    assert layout.field(buffer, "labels")[:3].tolist() == [9, 2**40, -1]
    assert layout.field(buffer, "h")[1].item() == torch.tensor(1 / 3).bfloat16().item()


def test_balanced_stages_minimise_the_largest_stage():
    assert balanced_stages([3, 1, 1, 1], 2) == [1, 3]
    assert balanced_stages([1, 1, 1, 5], 2) == [3, 1]
    assert balanced_stages([2, 2, 2, 2], 4) == [1, 1, 1, 1]
    # a costly edge synthesizer after block 1 moves the cut away from it
    assert balanced_stages([2, 2, 2, 2], 2) == [2, 2]
    assert balanced_stages([2, 2, 2, 2], 2, edge_costs=[0.1, 3, 0.1, 0]) == [1, 3]
    with pytest.raises(ValueError):
        balanced_stages([1, 2], 3)


def test_block_and_synthesizer_costs_count_matmul_operations():
    """2 B n m per matrix product: forward, weight gradient, and the input gradient except
    at the first block; a linear synthesizer (w x w) predicts, predicts again and takes its
    weight gradient."""
    net, w, b = mlp(seed=0, width=8), 8, 4
    state = torch.get_rng_state()
    costs = block_costs(list(net.children()), torch.randn(b, 12))
    assert costs == [2 * (2 * b * 12 * w), 3 * (2 * b * w * w), 3 * (2 * b * w * w),
                     3 * (2 * b * w * 5)]
    synth = synthesizer_costs(list(net.children()), torch.randn(b, 12),
                              synthesizer_factory("linear"))
    assert synth == [3 * (2 * b * w * w)] * 3
    assert not any(p.grad is not None for p in net.parameters())
    # edges: a synthesizer at the end of every stage but the last; all: after every block
    assert stage_costs([1, 3], costs, synth, "edges") == [costs[0] + synth[0], sum(costs[1:])]
    assert stage_costs([1, 3], costs, synth, "all") == [costs[0] + synth[0],
                                                        sum(costs[1:]) + 2 * synth[0]]
    assert counted_split(list(net.children()), torch.randn(b, 12), 2,
                         synthesizer_factory("linear")) == [1, 3]
    torch.set_rng_state(state)


def test_interface_positions():
    assert interface_positions([1, 3]) == [0]
    assert interface_positions([1, 1, 2]) == [0, 1]
    assert interface_positions([1, 3], "all") == [0, 1, 2]
    with pytest.raises(ValueError):
        interface_positions([1, 3], "some")


@pytest.mark.parametrize("counts", [[1, 2], [0, 4], [2, 3], [4]])
def test_bad_stage_sizes_are_refused(counts):
    with pytest.raises(ValueError):
        check_counts(counts, 4, 2)

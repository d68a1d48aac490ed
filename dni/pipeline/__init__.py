"""Update-unlocked pipeline training across processes: each process runs one *stage*, a run of
consecutive blocks of an nn.Sequential, and never waits for the backward pass of the stages
above it. Communication is torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

    dist.init_process_group("gloo")                   # torchrun sets rank and world size
    stage = PipelineStage(net, example_input)         # interfaces="edges" by default
    opt = torch.optim.Adam(stage.param_groups(lr=1e-3, synthesizer_lr=1e-2))
    for x, y in batches:                               # every rank runs the same loop;
        loss = stage.train_step(opt, x, y)            # x, y are read by stage 0 only
    stage.drain(opt)                                   # the synthesizer updates still owed

For mini-batch t, stage s does:

    h_in, y = receive from stage s-1               stage 0: the batch itself
    h = blocks(h_in)                               backprop inside the stage ("edges"), or
                                                   an interface after every block ("all")
    send (h, y) to stage s+1                       the last stage: loss(h, y).backward()
    h.backward(scale * S(h, c) / B)                synthetic gradient: all gradients are ready
    send d = h_in.grad to stage s-1                the target of stage s-1's synthesizer
    grad of ||S(h, c) - B d||^2 on batch t - k     d came back from stage s+1 meanwhile
    optimizer.step()                               update-unlocked: nobody above is awaited

k is the staleness. With k = 0 a stage waits for batch t's own target before its next batch,
and the parameters of a network without dropout follow one-process `DNI` with interfaces at
the same blocks exactly (the same arithmetic per parameter). Every rank is seeded alike (equal
initial weights); the stage then reseeds torch's stream with a number drawn from it plus its
rank, so each stage draws its own dropout masks (not one process's, mask for mask). With k >= 1 the stages work on different mini-batches at the
same moment. The synthesizer is run again on the kept activation when its target arrives, so
its gradient is taken at its current parameters. Targets travel in the loss's units; the
synthesizer predicts B times them, as in `dni.interface`.

Figures: a step's synthesizer losses ride up with the next message (its fit comes after its
message left), so the last stage's `reported_figures()` of step t arrive at step t + 1, the
last ones with the evaluation. On a step trained with `measure=True` (on every rank) each
stage also runs its blocks again on the same input and masks without interfaces and passes
the true gradient at its input down, so every interface's cosine to it is measured; the
pipeline waits for that message on such a step.

The parts: `stage` (PipelineStage, the algorithm above), `transport` (messages, links,
timeouts, where the time goes) and `split` (counted costs and balanced cuts).
"""

from dni._lazy import lazy_exports as _lazy_exports

INTERFACE_MODES = ("edges", "all")
"""Where a pipeline's interfaces sit: only at the stage edges, or after every block."""

# each name loads its module, and torch, on first use
__all__, __getattr__, __dir__ = _lazy_exports(__name__, {
    "split": ("balanced_stages", "block_costs", "check_counts", "counted_split",
              "interface_positions", "stage_costs", "synthesizer_costs"),
    "stage": ("PipelineStage",),
    "transport": ("PipelineError", "StageTimes"),
}, defined_here=("INTERFACE_MODES",))

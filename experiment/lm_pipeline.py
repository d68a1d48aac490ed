"""lm.py --model gpt under torchrun: the GPT as a pipeline of `dni.pipeline.PipelineStage`s,
one per process, cut after the blocks --cuts names (one cut per process boundary). Stage 0 draws
the batches of windows and reads the token ids; the targets travel up with the activations
(cDNI's one-hot context is rebuilt from them at each stage, not sent). The stages meet only
through synthetic gradients (dni) or not at all (frozen: the stages below the top cut never
train, the control). Every `--eval-every` steps all stages score the validation split
together; the last stage keeps the records (metrics.csv, summary.json, the lines), every stage
its own checkpoint, and `--resume` restarts them together."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from dni.pipeline import PipelineError, PipelineStage
from experiment.data import TextSplits, load_text
from experiment.lm_train import (
    GPT_EVAL_BATCH,
    _TransformerLoop,
    gpt_eval_batches,
    gpt_synthesizer_options,
    scored_nats,
    token_loss,
    uses_synthesizer,
    write_summary,
)
from experiment.pipeline_train import (
    gather_from_every_stage,
    lost_neighbour,
    run_stages,
    shared_out_dir,
    stage_checkpoint_name,
    stage_process,
)
from experiment.records import load_checkpoint, write_config
from experiment.train import adam
from model import GPT


def stage_counts(cuts: list[int], layers: int) -> list[int]:
    """Children per stage of a GPT ([embedding, blocks 1..layers, head]) cut after `cuts`."""
    ends = [cut + 1 for cut in cuts] + [layers + 2]
    return [end - start for start, end in zip([0, *ends[:-1]], ends)]


class _GPTStageLoop(_TransformerLoop):
    """A pipeline stage's share of lm.py's GPT loop: the step goes through the stage (stage 0
    draws the windows), the validation through every stage (the last scores it and tells the
    others, who keep their own best blocks); the synthesizer losses and the cut's cosine
    arrive with the next message and are counted then. A signal goes to the stage, which stops
    the whole pipeline after the step in progress."""

    stops_at_once = False

    def __init__(self, args: argparse.Namespace, stage: PipelineStage, optimizer, text: TextSplits,
                 out_dir: Path, device: torch.device, checkpoint: dict | None, collectives):
        self.stage, self.collectives = stage, collectives
        self.checkpoint_name = stage_checkpoint_name(stage.rank)
        self.show_progress = stage.is_last
        self.cosines: list[float] = []     # the cut's cosines on the last measured step
        super().__init__(args, stage, optimizer, text, out_dir, device, checkpoint, None,
                         clipped=list(stage.block_parameters()))
        if not stage.is_last:
            self.columns = None

    def pass_on_stop(self, signum: int) -> None:
        self.stage.request_stop(signum)

    def model_state(self) -> dict:
        return {k: v.clone() for k, v in self.stage.blocks.state_dict().items()}

    def load_model_state(self, state: dict) -> None:
        self.stage.blocks.load_state_dict(state)

    def snapshot(self) -> dict:
        self.stage.collect_targets()   # the pending updates complete, so the state is whole
        return {**super().snapshot(), "counts": self.stage.counts}

    def measured(self, step: int) -> bool:
        """Whether `step` measures the cut's cosine: each validation period's last step."""
        args = self.args
        return (step + 1) % args.eval_every == 0 or (args.steps is not None
                                                     and step + 1 >= args.steps)

    def train_step(self) -> None:
        stage, state = self.stage, self.state
        x = y = drawn_from = None
        if stage.is_first:   # only stage 0 draws the batches
            drawn_from = self.generator.get_state()
            windows = self.draw_windows(self.generator)
            x, y = windows[:, :-1], windows[:, 1:]
        loss = stage.train_step(self.optimizer, x, y, report=uses_synthesizer(self.args),
                                measure=uses_synthesizer(self.args) and self.measured(state.step))
        self.diagnostic_seconds += stage.last_measure_seconds
        self.take_figures()
        if stage.stopped is not None:
            if drawn_from is not None:   # the batch was not trained: it is drawn again
                self.generator.set_state(drawn_from)
            raise self.interrupted(stage.stopped)
        if stage.is_last:
            if loss is None or not math.isfinite(loss):
                raise self.diverged("loss", "lower --lr or --synth-lr")
            tokens = self.args.batch_size * self.args.context
            self.add_to_sums(loss * tokens, tokens, None, None)

    def take_figures(self) -> None:
        """Last stage: count the synthesizer losses that arrived (their mean over the cuts)
        and keep the cosines of a measured step."""
        figures = self.stage.reported_figures() if self.stage.is_last else None
        if figures is None:
            return
        losses = [v for v in figures.losses if math.isfinite(v)]
        if losses:
            sums = self.state.sums
            sums["sg"] += sum(losses) / len(losses)
            sums["sg_n"] = sums.get("sg_n", 0) + 1
        cosines = [v for v in figures.cosines if math.isfinite(v)]
        if cosines:
            self.cosines = cosines

    def evaluate(self, ids: torch.Tensor) -> float:
        """Bits per character through the pipeline (every stage calls it; all get the
        figure, from the last stage)."""
        stage = self.stage
        stage.eval()
        nats, count = 0.0, 0
        for x, y in gpt_eval_batches(ids, self.args.context):
            result = stage.eval_step(x, y) if stage.is_first else stage.eval_step()
            if result is not None:
                batch_nats, scored = scored_nats(*result)
                nats, count = nats + batch_nats, count + scored
        stage.train()
        self.take_figures()    # the last training step's came with the first batch
        mine = nats / count / math.log(2) if stage.is_last else None
        return gather_from_every_stage(mine, stage, self.collectives)[-1]

    def cosine(self) -> float | None:
        if not uses_synthesizer(self.args) or not self.cosines:
            return None
        return sum(self.cosines) / len(self.cosines)


def build_stage(args: argparse.Namespace, vocab_size: int, device: torch.device,
                world: int) -> tuple[PipelineStage, torch.optim.Optimizer]:
    """This rank's stage of the GPT lm.py's flags describe (built whole, seeded alike on every
    rank, so the weights agree with one process's) and its Adam: the blocks below the top cut
    at --lower-lr times --lr, the synthesizer at --synth-lr."""
    torch.manual_seed(args.seed)
    net = GPT(vocab_size, width=args.width, layers=args.layers, heads=args.heads,
              context=args.context).to(device)
    example = torch.zeros(1, args.context, dtype=torch.int64, device=device)
    stage = PipelineStage(
        net, example, synthesizer=args.synthesizer, counts=stage_counts(args.cuts, args.layers),
        context_size=vocab_size if args.conditioned else 0, staleness=args.staleness,
        timeout=args.timeout, loss_fn=token_loss, max_batch=max(args.batch_size, GPT_EVAL_BATCH),
        message_dtype=getattr(torch, args.message_dtype), label_shape=(args.context,),
        frozen_stages=world - 1 if args.method == "frozen" else 0,
        **gpt_synthesizer_options(args))
    lr = args.lr if stage.is_last else args.lr * args.lower_lr
    groups = stage.param_groups(lr, args.synth_lr)
    return stage, adam(groups, lr=lr)


def train_as_pipeline(args: argparse.Namespace) -> dict | None:
    """lm.py --model gpt under torchrun: join the process group, build this rank's stage and
    train it; the last stage writes summary.json and returns it (the others None)."""
    from experiment.cli import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with stage_process(device, args.timeout) as (rank, world):
        text = load_text(args.corpus)
        args.out = shared_out_dir(args.out, "lm")
        out_dir = Path(args.out)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:   # each machine's, so each can resume
            out_dir.mkdir(parents=True, exist_ok=True)
            write_config(out_dir, "lm.py", args, device)
        dist.barrier()
        checkpoint = (load_checkpoint(Path(args.resume), device,
                                      name=stage_checkpoint_name(rank))
                      if args.resume else None)
        stage, optimizer = build_stage(args, text.vocab_size, device, world)
        collectives = dist.new_group(backend="gloo")
        loop = _GPTStageLoop(args, stage, optimizer, text, out_dir, device, checkpoint,
                             collectives)
        times = run_stages(loop, stage, out_dir, checkpoint, collectives)
        extra = {"processes": world, "stages": stage.counts, "staleness": stage.staleness,
                 "message_dtype": args.message_dtype, "stage_times": times}
        try:   # the final scoring runs through every stage too
            return write_summary(args, loop, text, out_dir, device, extra=extra,
                                 writes=stage.is_last)
        except PipelineError as exc:
            raise lost_neighbour(rank, exc) from None


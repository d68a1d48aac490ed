"""DNI pipelines across processes against backprop, PyTorch's synchronous pipeline schedules
and DDP: samples/s (and the ratio to one-process backprop on all cores), test accuracy after
the same epochs, and where each pipeline stage's time goes. All rows train the same MLP on the
same data with the same global batch and split, one after another in one run.

Usage: python bench/parallel.py [--stages 2] [--epochs 1] [--width 256]
       [--wide-width 2048] [--wide-depth 6] [--wide-train-size 10240] [--rows ...]
Rows: (a) bp: one process, backprop, all cores; (b) dni-1core / dni-allcores: one-process DNI,
an interface after every block; (c) dni-pipeline: N stages under torchrun, one core each,
interfaces after every block (--interfaces all); (d) edges-1core: the edge pipeline's
one-process twin (interfaces only where the stages meet); edges-pipeline: N stages that
backprop inside and meet through one synthetic gradient at each edge (the default);
edges-bf16: the same with bfloat16 messages; edges-lowrank-bf16: and a rank-32 linear
synthesizer (--synth-layers 2 --synth-hidden 32); edges-4stages (MLP only): one block a stage, two
processes a core; (e) gpipe, 1f1b, zero-bubble: the same split under
torch.distributed.pipelining, one core each; (f) ddp: DistributedDataParallel over N
processes, one core each.
Before the rows, for each network and both interface modes: the split's cap, the one-process
twin's step on one core against each stage's blocks alone (what the split allows without a
pipeline). After them: the pipeline's own overhead (its step against the slowest stage alone)
and the edge pipeline against backprop as the median of --repeats pairs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bench.pipeline_schedules import SCHEDULES, end_worker, rank_blocks, schedule_step
from bench.script_runs import failure_line
from bench.timing import measured_costs, one_pinned_thread
from dni.pipeline import check_counts
from experiment.cli import Parser, RawDescriptionHelpFormatter, nonnegative_int, positive_int, run
from experiment.train import adam

ROWS = ("bp", "dni-1core", "dni-allcores", "dni-pipeline", "edges-1core", "edges-pipeline",
        "edges-bf16", "edges-lowrank-bf16", "edges-4stages", "gpipe", "1f1b", "zero-bubble", "ddp")
BATCH = 256


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def script_run(argv: list[str], threads: int, out: Path, torchrun: int = 0) -> dict:
    """Run a project script (under torchrun with `torchrun` processes) and return its summary."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(torchrun)] if torchrun else [sys.executable])
    cmd = [*launcher, *argv, "--out", str(out), "--log-every", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$", f"OMP_NUM_THREADS={threads}", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def worker_run(kind: str, args: argparse.Namespace, processes: int, out: Path) -> dict:
    """Run this file's own worker for `kind` (pipelining schedules, DDP) under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(processes), __file__, "--worker", kind, "--result", str(out / "result.json"),
           "--epochs", str(args.epochs), "--width", str(args.width), "--train-size",
           str(args.train_size), "--stage-blocks", *map(str, args.stage_blocks),
           "--microbatches", str(args.microbatches), "--depth", str(args.depth)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("$", "OMP_NUM_THREADS=1", " ".join(cmd[1:]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"failed": failure_line(done.stderr)}
    return json.loads((out / "result.json").read_text())


# -- workers (run under torchrun) ---------------------------------------------------------
def _worker(args: argparse.Namespace) -> None:
    """One rank of a pipelining-schedule or DDP run; the last rank writes the result."""
    from experiment.data import batch_order, batches, load_mnist
    from experiment.pipeline_train import pin_to_cores
    from experiment.train import evaluate, learning_rate_schedule
    from model import FCN

    torch.set_num_threads(1)
    pin_to_cores()  # as the DNI pipeline's stages are
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_mnist("data", torch.device("cpu"), args.train_size)
    torch.manual_seed(0)
    net = FCN(depth=args.depth, width=args.width)
    steps = args.epochs * (len(data.train_x) // BATCH)
    generator = torch.Generator().manual_seed(0)
    if args.worker == "ddp":
        model = nn.parallel.DistributedDataParallel(net)
        params, step = model.parameters(), None
    else:
        step, params = _schedule(args, net, rank, world)
        # the schedules' first step also runs a stage on an unfilled buffer, which poisons
        # BatchNorm's running statistics: take that step untimed, then start them afresh
        step(data.train_x[:BATCH], data.train_y[:BATCH])
        for module in net.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()
        net.zero_grad(set_to_none=True)
    optimizer = adam(params, lr=1e-3)   # as the scripts train
    scheduler = learning_rate_schedule(optimizer, steps)
    train_seconds = 0.0
    for _ in range(args.epochs):
        order = batch_order(len(data.train_x), generator, torch.device("cpu"))
        dist.barrier()
        start = time.perf_counter()
        for x, y in batches(data.train_x, data.train_y, BATCH, order):
            optimizer.zero_grad(set_to_none=True)
            if step is None:  # DDP: each rank takes its share of the global batch
                share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
                F.cross_entropy(model(x[share]), y[share]).backward()
            else:
                step(x, y)
            optimizer.step()
            scheduler.step()
        dist.barrier()
        train_seconds += time.perf_counter() - start
    states = [None] * world
    dist.all_gather_object(states, net.state_dict())
    if rank == world - 1:
        full = FCN(depth=args.depth, width=args.width)
        merged = dict(states[-1])  # DDP: every rank holds the same whole network
        if args.worker != "ddp":   # a schedule: each rank trained only its own blocks
            for r, state in enumerate(states):
                owned = {str(i) for i in _rank_blocks(args, r, world)}
                merged.update({k: v for k, v in state.items() if k.split(".")[0] in owned})
        full.load_state_dict(merged)
        _, accuracy = evaluate(full, data.test_x, data.test_y)
        samples = args.epochs * (len(data.train_x) // BATCH) * BATCH
        Path(args.result).write_text(json.dumps({
            "samples_per_s": samples / train_seconds, "test_acc": accuracy,
            "train_seconds": train_seconds}))
    end_worker()


def _rank_blocks(args: argparse.Namespace, rank: int, world: int) -> list[int]:
    """The blocks rank `rank` trains under args.worker's schedule."""
    return rank_blocks(args.worker, args.stage_blocks, rank, world)


def _schedule(args: argparse.Namespace, net: nn.Sequential, rank: int, world: int):
    """This rank's part of `net` under a torch.distributed.pipelining schedule: returns
    (step(x, y), parameters)."""
    return schedule_step(args.worker, net, args.stage_blocks, rank, world, args.microbatches,
                         torch.zeros(BATCH // args.microbatches, 1, 28, 28), F.cross_entropy,
                         torch.device("cpu"))


# -- the table ----------------------------------------------------------------------------
def measured_split(depth: int, width: int, stages: int
                   ) -> tuple[list[int], list[float], list[float]]:
    """The split balanced by measured step times on one thread, edge synthesizers included
    (`bench.timing.measured_costs`), with the block and synthesizer times."""
    from dni.pipeline import balanced_stages
    from dni.wrapper import synthesizer_factory
    from model import FCN

    with one_pinned_thread():   # as each stage runs
        costs, synth = measured_costs(list(FCN(depth=depth, width=width).children()),
                                      torch.randn(BATCH, 784), synthesizer_factory("linear"))
    return balanced_stages(costs, stages, edge_costs=synth), costs, synth


def stage_trainer(blocks: list[nn.Module], x: torch.Tensor, labels: torch.Tensor, *,
                  last: bool, inner: bool, steps: int):
    """A function that times `steps` training steps of one stage's blocks alone, as the stage
    runs them, and returns seconds a step: random activations in (the input gradient is
    computed when x requires it), an interface after every block but the stage's last when
    `inner`, and a linear edge synthesizer (prediction, refit, Adam) unless `last`."""
    from dni import LinearSynthesizer, synthesizer_loss
    from experiment.networks import attach_dni, dni_defaults

    synth_lr = dni_defaults("mlp", conditioned=False)["synth_lr"]
    net = nn.Sequential(*blocks)
    optimizer = adam(net.parameters(), lr=1e-3)
    if inner and len(blocks) > 1:
        net = attach_dni(net, optimizer, x[:2].detach(), synthesizer_lr=synth_lr)
    edge = target = None
    if not last:
        with torch.no_grad():
            target = torch.zeros_like(net(x))
        edge = LinearSynthesizer(target.shape[1])
        optimizer.add_param_group({"params": list(edge.parameters()), "lr": synth_lr})

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        h = net(x)
        if edge is None:
            F.cross_entropy(h, labels).backward()
        else:
            with torch.no_grad():
                g = edge(h.detach())[0]
            h.backward(g / len(h))
            synthesizer_loss(edge(h.detach())[0], target).backward()
        optimizer.step()

    return seconds_per_step(step, steps)


def seconds_per_step(step, steps: int):
    """A function that runs `step` `steps` times and returns the seconds of one."""
    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    return run


def stages_alone(depth: int, width: int, counts: list[int], interfaces: str, rounds: int = 7,
                 steps: int = 10) -> tuple[float, list[float]]:
    """Milliseconds of one training step, on one pinned core, of the one-process twin (DNI
    with interfaces where `interfaces` puts them) on the whole network, and of each stage's
    blocks alone (`stage_trainer`), timed in turns, medians over `rounds`. whole / slowest
    stage is what the split allows with every stage's real per-step work and no pipeline
    around it: no messages, no waiting."""
    from model import FCN

    with one_pinned_thread(), torch.random.fork_rng(devices=[]):
        blocks = list(FCN(depth=depth, width=width).children())
        labels = torch.randint(0, 10, (BATCH,))
        cuts = [sum(counts[:s]) for s in range(len(counts) + 1)]
        inner = interfaces == "all"
        whole_net = copy.deepcopy(blocks)
        twin = [copy.deepcopy(blocks[cuts[s]:cuts[s + 1]]) for s in range(len(counts))]
        runners = [whole_trainer(whole_net, interfaces, counts, labels, steps)]
        for s, part in enumerate(twin):
            x = torch.randn(BATCH, 784) if s == 0 else torch.randn(BATCH, width,
                                                                   requires_grad=True)
            runners.append(stage_trainer(part, x, labels, last=s == len(counts) - 1,
                                         inner=inner, steps=steps))
        times: list[list[float]] = [[] for _ in runners]
        for r in range(rounds + 1):          # the first round warms up
            for i, run in enumerate(runners):
                elapsed = run()
                if r:
                    times[i].append(elapsed)
    medians = [1e3 * statistics.median(t) for t in times]
    return medians[0], medians[1:]


def whole_trainer(blocks: list[nn.Module], interfaces: str, counts: list[int],
                  labels: torch.Tensor, steps: int):
    """Times one-process DNI on the whole network: interfaces after every hidden block, or
    (edges) only after each stage's last block."""
    from experiment.networks import attach_dni, dni_defaults

    net = nn.Sequential(*blocks)
    optimizer = adam(net.parameters(), lr=1e-3)
    after = None if interfaces == "all" else [sum(counts[:s + 1]) for s in range(len(counts) - 1)]
    x = torch.randn(BATCH, 784)
    model = attach_dni(net, optimizer, x[:2], after=after,
                       synthesizer_lr=dni_defaults("mlp", conditioned=False)["synth_lr"])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()

    return seconds_per_step(step, steps)


def run_variant(args: argparse.Namespace, width: int, train_size: int, rows: list[str], work: Path,
                depth: int = 3, split: list[int] | None = None) -> dict:
    """Every row for one network (depth hidden blocks of width units); returns {row: result}
    and, under "bound", the split's measured costs, caps and the pipeline's overhead."""
    n = args.stages
    measured, costs, synth = measured_split(depth, width, n)
    if split is not None:
        try:
            check_counts(split, depth + 1, n)
        except ValueError as exc:
            raise SystemExit(f"error: the split of the {depth}x{width} MLP: {exc}") from None
    args.stage_blocks = split or measured   # every row uses the same split
    print(f"# MLP {depth}x{width}: stages {args.stage_blocks}; measured step times on one "
          f"thread (ms): blocks {' '.join(f'{1e3 * c:.2f}' for c in costs)}, a synthesizer "
          f"after each {' '.join(f'{1e3 * c:.2f}' for c in synth)}", flush=True)
    bound = {"costs_ms": [1e3 * c for c in costs], "synth_ms": [1e3 * c for c in synth]}
    for mode in ("edges", "all"):
        whole_ms, stage_ms = stages_alone(depth, width, args.stage_blocks, mode)
        bound[mode] = {"whole_ms": whole_ms, "stage_ms": stage_ms,
                       "cap": whole_ms / max(stage_ms)}
        print(f"# {mode}: one-process twin on one core {whole_ms:.2f} ms/step; each stage's "
              f"blocks alone {' / '.join(f'{t:.2f}' for t in stage_ms)} ms, so the split "
              f"allows {whole_ms / max(stage_ms):.2f}x the twin, the fastest stage idle "
              f"{100 * (1 - min(stage_ms) / max(stage_ms)):.0f}%", flush=True)
    common = ["--epochs", str(args.epochs), "--batch-size", str(BATCH),
              "--train-size", str(train_size), "--width", str(width), "--depth", str(depth)]
    dni = ["main.py", "--model_type", "mlp", *common]
    stages = ["--stages", *map(str, args.stage_blocks)]
    twin = ["--interfaces-at", *map(str, [sum(args.stage_blocks[:s + 1])
                                          for s in range(n - 1)])]
    results = {}
    sub = argparse.Namespace(**{**vars(args), "width": width, "train_size": train_size,
                                "depth": depth})

    def run(row: str, out: Path) -> dict:
        if row == "bp":
            return script_run(["mlp.py", *common], cores(), out)
        if row == "dni-1core":
            return script_run(dni, 1, out)
        if row == "dni-allcores":
            return script_run(dni, cores(), out)
        if row == "dni-pipeline":
            return script_run([*dni, *stages, "--interfaces", "all"], 1, out, torchrun=n)
        if row == "edges-1core":
            return script_run([*dni, *twin], 1, out)
        if row == "edges-pipeline":
            return script_run([*dni, *stages], 1, out, torchrun=n)
        if row == "edges-bf16":
            return script_run([*dni, *stages, "--message-dtype", "bfloat16"], 1, out,
                              torchrun=n)
        if row == "edges-lowrank-bf16":
            return script_run([*dni, *stages, "--message-dtype", "bfloat16", "--synth-layers",
                               "2", "--synth-hidden", "32"], 1, out, torchrun=n)
        if row == "edges-4stages":
            return script_run([*dni, "--stages", *["1"] * (depth + 1)], 1, out,
                              torchrun=depth + 1)
        return worker_run(row, sub, n, out)

    for row in rows:
        if row == "edges-4stages" and depth != 3:
            continue   # the MLP's row: one block a stage, two processes a core
        results[row] = run(row, work / f"{width}-{row}")
        print(f"  {row}: {results[row].get('samples_per_s', 0):.0f} samples/s", flush=True)
    pairs = []
    if "bp" in results and "edges-pipeline" in results:
        pairs.append((results["bp"]["samples_per_s"], results["edges-pipeline"]["samples_per_s"]))
        for r in range(1, args.repeats):   # more pairs, one right after the other, against drift
            bp = run("bp", work / f"{width}-bp-{r}")["samples_per_s"]
            pipe = run("edges-pipeline", work / f"{width}-edges-pipeline-{r}")["samples_per_s"]
            pairs.append((bp, pipe))
            print(f"  pair {r + 1}: bp {bp:.0f}, edges-pipeline {pipe:.0f} samples/s", flush=True)
    bound["pairs"] = pairs
    results["bound"] = bound
    return results


def stage_columns(result: dict) -> str:
    """A pipeline row's stage times: compute / wait / comm, % of each stage's wall time."""
    cells = []
    for t in result.get("stage_times", []):
        total = t["total_s"] or 1.0
        cells.append(f"s{t['rank']} {100 * t['compute_s'] / total:.0f}/"
                     f"{100 * t['wait_s'] / total:.0f}/{100 * t['comm_s'] / total:.0f}")
    return ", ".join(cells)


def print_table(title: str, results: dict) -> None:
    """Markdown table of samples/s, ratio to backprop, accuracy and stage times, then the
    split's caps, the pipeline's own overhead and the paired ratio to backprop."""
    base = results.get("bp", {}).get("samples_per_s")
    print(f"\n{title}\n")
    print("| row | samples/s | vs bp (all cores) | test acc | stage time: compute / wait / "
          "comm (% of wall) |")
    print("|---|---|---|---|---|")
    for row, r in results.items():
        if row == "bound":
            continue
        if "failed" in r:
            print(f"| {row} | failed: {r['failed']} | | | |")
            continue
        ratio = f"{r['samples_per_s'] / base:.2f}x" if base else ""
        print(f"| {row} | {r['samples_per_s']:.0f} | {ratio} | {100 * r['test_acc']:.2f}% | "
              f"{stage_columns(r)} |")
    bound = results.get("bound", {})
    for mode, row, twin in (("edges", "edges-pipeline", "edges-1core"),
                            ("all", "dni-pipeline", "dni-1core")):
        if mode not in bound or row not in results or "failed" in results[row]:
            continue
        caps, pipe = bound[mode], results[row]
        step_ms = 1e3 * BATCH / pipe["samples_per_s"]
        slowest = max(caps["stage_ms"])
        against = (f"{pipe['samples_per_s'] / results[twin]['samples_per_s']:.2f}x the "
                   f"{twin} row, " if twin in results and "failed" not in results[twin] else "")
        print(f"\n{row}: {step_ms:.2f} ms a step (the script's whole loop, its data path "
              f"included) against {slowest:.2f} ms for the slowest stage's blocks alone "
              f"(no data path): the pipeline's own overhead is "
              f"{100 * (step_ms / slowest - 1):.0f}%; it runs {against}"
              f"{caps['whole_ms'] / step_ms:.2f}x the twin timed in-process "
              f"(the split allows {caps['cap']:.2f}x)")
    pairs = bound.get("pairs", [])
    if pairs:
        ratios = sorted(pipe / bp for bp, pipe in pairs)
        print(f"\nedges-pipeline / bp on all cores: {statistics.median(ratios):.2f}x (median "
              f"of {len(ratios)} pair(s), each run one right after the other: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")
    for rival in ("gpipe", "1f1b", "zero-bubble"):
        if rival in results and "failed" not in results[rival] and "edges-pipeline" in results:
            print(f"edges-pipeline / {rival}: "
                  f"{results['edges-pipeline']['samples_per_s'] / results[rival]['samples_per_s']:.2f}x")


def main() -> None:
    """Parse flags; run as a worker under torchrun, or run every row and print the tables."""
    parser = Parser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=positive_int, default=2,
                        help="processes (pipeline stages)")
    parser.add_argument("--epochs", type=positive_int, default=1, help="epochs per row")
    parser.add_argument("--width", type=positive_int, default=256, help="MLP width")
    parser.add_argument("--train-size", type=positive_int, default=59904,
                        help="training examples, a multiple of 256 so every batch is full")
    parser.add_argument("--wide-width", type=nonnegative_int, default=2048,
                        help="width of the wide variant (0: skip)")
    parser.add_argument("--wide-depth", type=positive_int, default=6,
                        help="hidden blocks of the wide variant")
    parser.add_argument("--wide-train-size", type=positive_int, default=10240,
                        help="training examples of the wide variant")
    parser.add_argument("--microbatches", type=positive_int, default=4,
                        help="microbatches per batch for the pipelining schedules")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                        help="rows to run (default: all)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="pairs of bp and edges-pipeline runs, one right after the other; "
                             "the median ratio is reported")
    parser.add_argument("--split", type=positive_int, nargs="+", default=None,
                        help="blocks per stage of the MLP (default: balanced by measured step "
                             "times, edge synthesizers included)")
    parser.add_argument("--wide-split", type=positive_int, nargs="+", default=None,
                        help="blocks per stage of the wide variant (default: as --split)")
    parser.add_argument("--depth", type=int, default=3, help=argparse.SUPPRESS)  # a worker's
    parser.add_argument("--stage-blocks", type=int, nargs="+", default=None,
                        help=argparse.SUPPRESS)  # a worker's split, set by the runner
    parser.add_argument("--worker", choices=[*SCHEDULES, "ddp"], default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    print(f"# {platform.machine()}, {cores()} cores, torch {torch.__version__}, "
          f"{platform.python_version()}; batch {BATCH}, {args.epochs} epoch(s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = run_variant(args, args.width, args.train_size, args.rows, work,
                              split=args.split)
        print_table(f"MLP 3x{args.width}, stages {args.stage_blocks}, {args.train_size} examples, {args.epochs} epoch(s)",
                    results)
        if args.wide_width:
            wide = run_variant(args, args.wide_width, args.wide_train_size, args.rows, work,
                               depth=args.wide_depth, split=args.wide_split)
            print_table(f"Wide MLP {args.wide_depth}x{args.wide_width}, stages {args.stage_blocks}, {args.wide_train_size} examples, "
                        f"{args.epochs} epoch(s)", wide)


if __name__ == "__main__":
    run(main)

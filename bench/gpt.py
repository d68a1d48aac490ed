"""One character GPT (lm.py --model gpt) trained by each way of spreading it over two cores,
in one run on the same text split, seed (the same initial weights), random windows at each
step and global batch: tokens per second, each process's peak memory, validation bits per
character at equal steps, and the training seconds to reach a target validation BPC.

Usage: python bench/gpt.py [--steps 1500] [--eval-every 100] [--eval-chars 32768]
       [--rows ...] [--target BPC] [--results DIR] [--table-only] [--device auto]
Rows: bp: one process, backprop, every core (lm.py's training); gpipe, 1f1b, zero-bubble:
torch.distributed.pipelining, one core each, the GPT cut after block --layers // 2 (as the
edge pipeline cuts it; zero-bubble interleaves one block a virtual stage), --microbatches per
batch; ddp: DistributedDataParallel over 2 processes, one core each, half the batch each;
dni, cdni, cdni-lossgrad (cDNI, S shaped as a softmax loss's gradient, synthesizer rate 3e-4),
frozen: the edge pipeline, lm.py under torchrun, one core a stage (frozen: the lower stage never
trains).
Every row validates every --eval-every steps (and at its last) on the first --eval-chars
characters of the validation split, as lm.py does; evaluation is not training time. The
target (default: bp's BPC at its last step) is reached at the first validation at or below it.
Peak memory: each process's peak resident set (ru_maxrss), or on CUDA the peak memory torch
allocated. Each row's run folder and its record
(ROW.json) live under --results: a finished row is read back, not rerun; the table goes to
RESULTS/table.md, the figure to RESULTS/gpt_bpc_time.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from bench.script_runs import failure_line
from experiment.cli import (
    Parser,
    RawDescriptionHelpFormatter,
    learning_rate,
    nonnegative_int,
    positive_float,
    positive_int,
    run,
)
from experiment.errors import UserError
from experiment.figures import draw_time_curves
from experiment.records import peak_memory_mb, write_json, write_text_whole

ROWS = ("bp", "gpipe", "1f1b", "zero-bubble", "ddp", "dni", "cdni", "cdni-lossgrad", "frozen")
WORKER_ROWS = ("bp", "gpipe", "1f1b", "zero-bubble", "ddp")   # this file's own workers
EDGE_ROWS = {"dni": ["--method", "dni"], "cdni": ["--method", "dni", "--conditioned", "True"],
             "cdni-lossgrad": ["--method", "dni", "--conditioned", "True", "--synthesizer",
                               "loss_gradient", "--synth-lr", "3e-4"],
             "frozen": ["--method", "frozen"]}
PROCESSES = 2
# the flags that define a row's run: a record made with others is not this bench's row
RUN_FLAGS = ("steps", "eval_every", "eval_chars", "corpus", "width", "layers", "heads",
             "context", "batch_size", "lr", "seed", "microbatches", "device")
SHOWN_STEPS = 4          # validation columns of the table
FOREVER = str(10 ** 9)   # lm.py's --epochs and --patience: the bench stops by --steps alone


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def stage_counts(layers: int) -> list[int]:
    """Children of the GPT per stage, cut after block layers // 2: [embedding + the lower
    blocks, the upper blocks + head]."""
    return [1 + layers // 2, layers - layers // 2 + 1]


def lm_flags(args: argparse.Namespace) -> list[str]:
    """lm.py's flags for the bench's GPT, data, budget and validation (the method apart)."""
    return ["--model", "gpt", "--corpus", str(args.corpus), "--width", str(args.width),
            "--layers", str(args.layers), "--heads", str(args.heads),
            "--context", str(args.context), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--seed", str(args.seed), "--steps", str(args.steps),
            "--eval-every", str(args.eval_every), "--eval-chars", str(args.eval_chars),
            "--epochs", FOREVER, "--patience", FOREVER]


def worker_flags(args: argparse.Namespace) -> list[str]:
    """This file's flags for a worker of the same run."""
    return ["--corpus", str(args.corpus), "--width", str(args.width), "--layers",
            str(args.layers), "--heads", str(args.heads), "--context", str(args.context),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed",
            str(args.seed), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
            "--eval-chars", str(args.eval_chars), "--microbatches", str(args.microbatches),
            "--device", args.device]


def row_command(row: str, args: argparse.Namespace, out: Path) -> tuple[list[str], int]:
    """The command of one row (run from the repository root) and its threads per process."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(PROCESSES)]
    if row == "bp":
        return [sys.executable, __file__, "--worker", "bp", "--result", str(out),
                *worker_flags(args)], cores()
    if row in WORKER_ROWS:
        return [*torchrun, __file__, "--worker", row, "--result", str(out),
                *worker_flags(args)], 1
    return [*torchrun, "lm.py", *lm_flags(args), *EDGE_ROWS[row], "--out", str(out),
            "--device", args.device], 1


# -- workers ------------------------------------------------------------------------------
def memory_kind(device: torch.device) -> str:
    """What peak_memory_mb measures on `device`."""
    return "CUDA allocated" if device.type == "cuda" else "RSS"


def _bp_worker(args: argparse.Namespace) -> None:
    """The bp row: lm.py's own training in this process on every core, then its peak memory
    added to lm.py's summary.json."""
    from experiment.cli import resolve_device
    from experiment.lm_flags import parse_args
    from experiment.lm_train import train
    from experiment.records import write_json

    lm_args = parse_args([*lm_flags(args), "--method", "bp", "--threads", str(cores()),
                          "--out", args.result, "--device", args.device])
    summary = train(lm_args)
    device = resolve_device(args.device)
    summary.update(peak_mb=[peak_memory_mb(device)], memory=memory_kind(device))
    write_json(Path(args.result) / "summary.json", summary)


def _worker(args: argparse.Namespace) -> None:
    """One rank of a pipelining-schedule or DDP run of the GPT; the rank that scores (the last
    stage; rank 0 under DDP) writes metrics.csv and summary.json to --result."""
    import torch.distributed as dist
    from torch import nn

    from bench.pipeline_schedules import end_worker, rank_blocks, schedule_step
    from experiment.cli import resolve_device
    from experiment.data import load_text
    from experiment.lm_train import evaluate_gpt_bpc, random_windows, token_loss
    from experiment.pipeline_train import pin_to_cores
    from experiment.records import MetricsLog, write_json
    from experiment.train import adam
    from model import GPT

    device = resolve_device(args.device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
        pin_to_cores()   # as the edge pipeline's stages are
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    text = load_text(args.corpus)
    torch.manual_seed(args.seed)     # lm.py's order: the seed, then the model
    net = GPT(text.vocab_size, width=args.width, layers=args.layers, heads=args.heads,
              context=args.context).to(device)
    generator = torch.Generator().manual_seed(args.seed)   # lm.py's window stream
    train_ids = text.train.to(device)
    valid = text.valid[:args.eval_chars or None].to(device)
    kind, batch = args.worker, args.batch_size
    scorer = 0 if kind == "ddp" else world - 1
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None)
        params, step, owned = list(net.parameters()), None, None
    else:
        example = torch.zeros(batch // args.microbatches, args.context, dtype=torch.int64,
                              device=device)
        step, params = schedule_step(kind, net, stage_counts(args.layers), rank, world,
                                     args.microbatches, example, token_loss, device)
        owned = {str(i) for i in rank_blocks(kind, stage_counts(args.layers), rank, world)}
    evaluator = copy.deepcopy(net) if rank == scorer and kind != "ddp" else net
    optimizer = adam(params, lr=args.lr)   # as lm.py's bp
    out = Path(args.result)
    log = MetricsLog(out / "metrics.csv", ["train_seconds", "valid_bpc"]) \
        if rank == scorer else None

    def synchronized() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        return time.perf_counter()

    def validation_bpc() -> float | None:
        """The scorer's BPC of the whole GPT (each stage's trained blocks gathered)."""
        if owned is not None:
            mine = {k: v.cpu() for k, v in net.state_dict().items()
                    if k.split(".")[0] in owned}
            states = [None] * world
            dist.all_gather_object(states, mine)
            if rank == scorer:
                merged = {k: v for state in states for k, v in state.items()}
                evaluator.load_state_dict(merged)
        return evaluate_gpt_bpc(evaluator, valid, args.context) if rank == scorer else None

    train_seconds, last_bpc = 0.0, None
    run_start = start = synchronized()
    for number in range(1, args.steps + 1):
        windows = random_windows(train_ids, batch, args.context, generator)
        # contiguous: a schedule checks each microbatch's strides against its example's
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        optimizer.zero_grad(set_to_none=True)
        if step is None:   # DDP: each rank its share of the global batch
            share = slice(rank * batch // world, (rank + 1) * batch // world)
            token_loss(model(x[share]), y[share]).backward()
        else:
            step(x, y)
        optimizer.step()
        if number % args.eval_every == 0 or number == args.steps:
            train_seconds += synchronized() - start
            last_bpc = validation_bpc()
            if log is not None:
                log.write({"kind": "step", "step": number, "train_seconds": train_seconds,
                           "valid_bpc": last_bpc,
                           "wall_seconds": time.perf_counter() - run_start})
                print(f"{kind} step {number}: valid {last_bpc:.3f} bpc, "
                      f"{train_seconds:.1f} s training", flush=True)
            start = synchronized()
    peaks = [None] * world
    dist.all_gather_object(peaks, peak_memory_mb(device))
    if rank == scorer:
        write_json(out / "summary.json", {
            "method": kind, "valid_bpc": last_bpc, "steps": args.steps,
            "train_seconds": train_seconds, "peak_mb": peaks, "memory": memory_kind(device),
            "stage_counts": None if kind == "ddp" else stage_counts(args.layers),
            "device": str(device), "argv": sys.argv})
    end_worker()



# -- rows, records and the table ----------------------------------------------------------
def run_config(args: argparse.Namespace) -> dict:
    """The flags that define a row's run."""
    return {name: (str(getattr(args, name)) if name == "corpus" else getattr(args, name))
            for name in RUN_FLAGS}


def read_record(results: Path, row: str) -> dict | None:
    """A row's record under `results`, or None when it has none."""
    path = results / f"{row}.json"
    return json.loads(path.read_text()) if path.exists() else None


def row_record(row: str, out: Path, batch_tokens: int) -> dict:
    """A finished run folder's record: tokens/s, peak memory per process and the validation
    curve [(step, training seconds, BPC)], from its summary.json and metrics.csv."""
    from experiment.figures import load_run

    summary = json.loads((out / "summary.json").read_text())
    stage_times = summary.get("stage_times")
    if row in EDGE_ROWS and not stage_times:
        return {"failed": "lm.py under torchrun wrote no stage_times: it ran no edge "
                          "pipeline"}
    if "peak_mb" in summary:
        peaks, memory = summary["peak_mb"], memory_kind(torch.device(summary.get("device", "cpu")))
    else:
        peaks, memory = [t["peak_memory_mb"] for t in stage_times], memory_kind(torch.device(summary.get("device", "cpu")))
    curve = [(int(r["step"]), r["train_seconds"], r["valid_bpc"])
             for r in load_run(out).steps if "valid_bpc" in r and "train_seconds" in r]
    record = {"tokens_per_s": summary["steps"] * batch_tokens / summary["train_seconds"],
              "steps": summary["steps"], "train_seconds": summary["train_seconds"],
              "peak_mb": peaks, "memory": memory, "curve": curve}
    if stage_times:
        record["stage_times"] = stage_times
    return record


def run_row(row: str, args: argparse.Namespace) -> dict:
    """Run one row in its own folder under --results and return its record (a failed run's
    is {"failed": its error line})."""
    out = args.results / row
    shutil.rmtree(out, ignore_errors=True)     # an unfinished run starts afresh
    out.mkdir(parents=True)
    cmd, threads = row_command(row, args, out)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    print(f"\n$ OMP_NUM_THREADS={threads}", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                          check=False)
    if done.returncode != 0:
        return {"failed": failure_line(done.stderr)}
    try:
        return row_record(row, out, args.batch_size * args.context)
    except (OSError, ValueError, KeyError, UserError) as exc:
        return {"failed": f"unreadable records in {out}: {exc}"[:200]}


def time_to_target(curve: list, target: float) -> float | None:
    """Training seconds at the first validation at or below `target` (None: never)."""
    return next((seconds for _, seconds, bpc in curve if bpc <= target), None)


def default_target(records: dict[str, dict]) -> float | None:
    """bp's validation BPC at its last step, when bp has a curve."""
    bp = records.get("bp", {})
    return bp["curve"][-1][2] if bp.get("curve") else None


def shown_steps(records: dict[str, dict]) -> list[int]:
    """Up to SHOWN_STEPS validation steps, spread evenly, the last among them."""
    steps = sorted({s for r in records.values() for s, _, _ in r.get("curve", [])})
    if len(steps) <= SHOWN_STEPS:
        return steps
    picks = {round(i * (len(steps) - 1) / (SHOWN_STEPS - 1)) for i in range(SHOWN_STEPS)}
    return [steps[i] for i in sorted(picks)]


def render_table(records: dict[str, dict], target: float | None) -> str:
    """The markdown table: tokens/s (and against bp), peak memory per process, validation BPC
    at equal steps, training seconds to the target BPC (and against bp), stage times."""
    from bench.parallel import stage_columns

    steps = shown_steps(records)
    base = records.get("bp", {}).get("tokens_per_s")
    base_time = time_to_target(records["bp"]["curve"], target) \
        if target is not None and "curve" in records.get("bp", {}) else None
    reach = f"s to {target:.3f} BPC" if target is not None else "s to target"
    head = ["row", "tokens/s", "vs bp", "peak MiB per process",
            *(f"valid BPC @{s}" for s in steps), reach, "vs bp",
            "stage time: compute / wait / comm (% of wall)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, r in records.items():
        if "failed" in r:
            lines.append(f"| {row} | failed: {r['failed']} |" + " |" * (len(head) - 2))
            continue
        at = {s: bpc for s, _, bpc in r["curve"]}
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
        peaks = " / ".join(f"{p:.0f}" for p in r["peak_mb"])
        if r.get("memory", "RSS") != "RSS":
            peaks += f" ({r['memory']})"
        seconds = time_to_target(r["curve"], target) if target is not None else None
        reached = ("" if target is None else "not reached" if seconds is None
                   else f"{seconds:.1f}")
        against = f"{seconds / base_time:.2f}x" if seconds is not None and base_time else ""
        cells = [row, f"{r['tokens_per_s']:.0f}", ratio, peaks,
                 *(f"{at[s]:.3f}" if s in at else "-" for s in steps), reached, against,
                 stage_columns(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gather_records(args: argparse.Namespace) -> dict[str, dict]:
    """Each asked row's record: read back when finished with these flags, else run (unless
    --table-only); a row finished with other flags is refused (another --results)."""
    config, records = run_config(args), {}
    for row in args.rows:
        record = read_record(args.results, row)
        if record is not None and "failed" not in record and record["config"] != config:
            changed = sorted(k for k in config if record["config"].get(k) != config[k])
            raise UserError(f"--results {args.results}: its {row} row ran with other "
                            f"{', '.join('--' + k.replace('_', '-') for k in changed)}; "
                            "give another --results")
        if args.table_only or (record is not None and "failed" not in record):
            if record is not None:
                records[row] = record
            continue
        # other work on the cores slows most the rows that use them all (threads wait on
        # each other): each row keeps the load it started under
        load = os.getloadavg()[0]
        record = {"row": row, **run_row(row, args), "config": config, "load_average": load}
        write_json(args.results / f"{row}.json", record)
        records[row] = record
        shown = (f"failed: {record['failed']}" if "failed" in record
                 else f"{record['tokens_per_s']:.0f} tokens/s")
        print(f"  {row}: {shown}", flush=True)
    return records


def build_parser() -> Parser:
    """The bench's flags, each with its default in --help."""
    p = Parser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=1500, help="optimizer steps per row")
    p.add_argument("--eval-every", type=positive_int, default=100,
                   help="steps between validations, the same for every row")
    p.add_argument("--eval-chars", type=nonnegative_int, default=32768,
                   help="validate on the first N characters of the validation split (0: all)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="rows to run (default: all)")
    p.add_argument("--target", type=positive_float, default=None,
                   help="target validation BPC (default: bp's at its last step)")
    p.add_argument("--results", type=Path, default=ROOT / "runs" / "bench-gpt",
                   help="folder of the rows' runs and records, kept between invocations")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: the table and figure of the finished rows")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="cuda: a GPU per process, NCCL between them; auto: cuda when "
                        "available (default: cpu)")
    model = p.add_argument_group("the GPT and its training, as lm.py --model gpt")
    model.add_argument("--corpus", default="kjv", help="kjv, or the path of a UTF-8 text")
    model.add_argument("--width", type=positive_int, default=128, help="features per position")
    model.add_argument("--layers", type=positive_int, default=4, help="transformer blocks")
    model.add_argument("--heads", type=positive_int, default=4, help="heads per block")
    model.add_argument("--context", type=positive_int, default=64, help="characters per window")
    model.add_argument("--batch-size", type=positive_int, default=32,
                       help="windows per step (the global batch of every row)")
    model.add_argument("--lr", type=learning_rate, default=1e-3, help="Adam rate")
    model.add_argument("--seed", type=int, default=0, help="initial weights and windows")
    model.add_argument("--microbatches", type=positive_int, default=4,
                       help="microbatches per batch for the pipelining schedules")
    p.add_argument("--worker", choices=WORKER_ROWS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def main() -> None:
    """Parse flags; run as a worker, or run the missing rows and print the table."""
    parser = build_parser()
    args = parser.parse_args()
    if args.width % args.heads:
        parser.error(f"argument --heads: --width {args.width} is not a multiple of {args.heads}")
    if args.batch_size % args.microbatches or args.batch_size % PROCESSES:
        parser.error(f"argument --batch-size: {args.batch_size} must divide into "
                     f"--microbatches {args.microbatches} and {PROCESSES} processes")
    if args.worker == "bp":
        _bp_worker(args)
        return
    if args.worker:
        _worker(args)
        return
    args.results = args.results.resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    hardware = f"{platform.machine()}, {cores()} cores, torch {torch.__version__}"
    print(f"# {hardware}", flush=True)
    records = gather_records(args)
    target = args.target if args.target is not None else default_target(records)
    table = render_table(records, target)
    note = ("target: " + ("none (no bp row and no --target)" if target is None else
                          f"{target:.3f} BPC ({'--target' if args.target else 'bp at its last step'})"))
    text = (f"{hardware}\n\nGPT {args.layers}x{args.width}, context {args.context}, batch "
            f"{args.batch_size}, {args.steps} steps, validation on "
            f"{args.eval_chars or 'all'} characters every {args.eval_every} steps; {note}"
            f"\n\n{table}\n\nload average (1 min) at each row's start: "
            + ", ".join(f"{row} {r['load_average']:.1f}" for row, r in records.items()
                        if "load_average" in r) + "\n")
    print("\n" + text)
    write_text_whole(args.results / "table.md", text)
    curves = {f"{row} (failed)" if "failed" in r else row:
              [(seconds, bpc) for _, seconds, bpc in r.get("curve", [])]
              for row, r in records.items()}
    print(draw_time_curves(curves, args.results / "gpt_bpc_time.png", target,
                           title=f"GPT {args.layers}x{args.width}, {args.steps} steps"))


if __name__ == "__main__":
    run(main)

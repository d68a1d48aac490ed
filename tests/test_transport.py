"""dni.pipeline.transport between two processes (gloo, spawned here): a stage that sent its
last messages and left must not cost its neighbour those messages."""

import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dni.pipeline.transport import PipelineError, Receiver, Sender, StageTimes
from tests.conftest import free_port

SENT = 3


def _worker(rank: int, port: int, out: str) -> None:
    """Rank 0 sends SENT messages, waits until they have left and leaves; rank 1 takes all
    but the last while rank 0 is there, the last once it has gone, then asks for one more."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    gone = Path(out, "gone")
    if rank == 0:
        sender = Sender(1, 4, 7, torch.device("cpu"), 30, StageTimes())
        for k in range(SENT):
            sender.send(lambda buffer, k=k: buffer.fill_(k + 1))
        sender.flush()
        dist.destroy_process_group()
        gone.write_text("")
        return
    got, error = [], None
    try:
        receiver = Receiver(0, 4, 7, torch.device("cpu"), 30, StageTimes())
        got += [int(receiver.receive()[0]) for _ in range(SENT - 1)]
        while not gone.exists():
            time.sleep(0.02)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:     # until rank 1 sees rank 0's connection closed
            try:
                dist.irecv(torch.empty(1, dtype=torch.uint8), 0, tag=99)
            except RuntimeError:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("rank 0's connection still open a minute after it left")
        got.append(int(receiver.receive()[0]))
        try:
            receiver.receive()
        except PipelineError as exc:
            error = str(exc)
    except Exception:  # noqa: BLE001 (reported to the test through the file)
        error = traceback.format_exc()
    Path(out, "rank1.json").write_text(json.dumps({"got": got, "error": error}))
    dist.destroy_process_group()


def test_messages_sent_before_a_stage_left_still_arrive_and_the_next_one_names_it(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    result = json.loads((tmp_path / "rank1.json").read_text())
    assert result["got"] == list(range(1, SENT + 1)), result
    assert result["error"] == ("stage 0 is not answering: its connection closed (the process "
                               "died or stopped)"), result

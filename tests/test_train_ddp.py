"""Two CPU processes (gloo) train as one DDP job: the ranks stay in sync, rank 0 checkpoints."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from semires import distributed
from semires.data import ExpressionDataset
from semires.model.build import prepare, preset
from semires.refer import read_refer
from semires.synth import SynthOptions, write_dataset
from semires.train import LoopConfig, load_checkpoint, train_supervised


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    info = distributed.init(prefer_cuda=False)
    try:
        anns = read_refer(root, "synthref", "unc")
        torch.manual_seed(0)  # the same initial weights on every rank, as from one checkpoint
        spec, model = prepare(preset("tiny"), corpus=[s for r in anns.refs for s in r.sentences])
        data = ExpressionDataset(
            anns.in_split("train"),
            f"{root}/images/synthref",
            spec.make_tokenizer(),
            image_size=64,
            max_tokens=20,
        )
        cfg = LoopConfig(steps=3, batch_size=2, lr=1e-3, checkpoint_every=100)
        train_supervised(model, spec, data, None, cfg, scratch=f"{out}/last.pt", run_key="k", dist_info=info)
        torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    write_dataset(tmp_path / "refer", SynthOptions(num_images=8, seed=5))
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "refer"), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in a:
        if "running" not in k and "num_batches" not in k:  # BatchNorm statistics are per rank
            torch.testing.assert_close(a[k], b[k], msg=k)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt.step == 3 and len(ckpt.rng["ranks"]) == 2  # each rank's RNG, for an exact resume

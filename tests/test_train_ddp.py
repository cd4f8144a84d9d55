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


def _semi_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    """An unbroken teacher-student run of 4 steps, and one killed after 2 and resumed."""
    from pathlib import Path

    from semires.data import ColourJitter, HorizontalFlip
    from semires.semi import train_semi

    from .test_semi import _cfg, labeled, tiny, unlabeled

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    info = distributed.init(prefer_cuda=False)
    try:
        anns = read_refer(f"{root}/refer", "synthref", "unc")
        project = (Path(root), anns, Path(root) / "proposals.zarr", None)

        def run(scratch, seed=0, **kw):
            spec, model = tiny(anns, seed=seed)  # the same weights on every rank
            unl = unlabeled(
                project, spec, geometric=HorizontalFlip(), photometric=ColourJitter(0.4, 0.4, 0.4)
            )
            res = train_semi(
                model, spec, labeled(project, spec), unl, None, _cfg(checkpoint_every=100), scratch=scratch,
                run_key="k", dist_info=info, **kw,
            )  # fmt: skip
            return model, res.teacher

        student, teacher = run(f"{out}/a.pt")
        torch.save({"student": student.state_dict(), "teacher": teacher.state_dict()}, f"{out}/a{rank}.pt")
        run(f"{out}/b.pt", stop_after=2)
        student, teacher = run(f"{out}/b.pt", seed=9, resume=True)  # all state from disk
        torch.save({"student": student.state_dict(), "teacher": teacher.state_dict()}, f"{out}/b{rank}.pt")
    finally:
        distributed.shutdown()


def test_two_process_teacher_is_the_same_on_every_rank_and_resumes_exactly(tmp_path):
    from .test_semi import make_project

    make_project(tmp_path)
    mp.spawn(_semi_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    runs = {name: torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("a0", "a1", "b0", "b1")}
    buffers = [k for k in runs["a0"]["teacher"] if "running" in k]
    assert buffers  # the decoder's BatchNorm statistics, which each rank updates from its own share
    for name in ("a1", "b0", "b1"):  # every rank's teacher, unbroken or resumed, is rank 0's unbroken one
        for k, v in runs["a0"]["teacher"].items():
            assert torch.equal(v, runs[name]["teacher"][k]), (name, k)
    for k, v in runs["a0"]["student"].items():
        assert torch.equal(v, runs["b0"]["student"][k]), k  # rank 0 resumed to the unbroken student

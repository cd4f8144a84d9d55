import json
import subprocess

from stages.common import open_live


def test_live_logs_in_a_git_repo_without_commits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    live = open_live(tmp_path / "live", resume=False)
    live.log_metric("val/mIoU", 42.0)
    live.make_summary()
    assert json.loads((tmp_path / "live" / "metrics.json").read_text()) == {"val": {"mIoU": 42.0}}
    assert not (tmp_path / "dvc.yaml").exists()


def test_resuming_drops_the_rows_logged_after_the_checkpoint(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    live = open_live(tmp_path / "live", resume=False)
    for step in range(1, 8):  # a run killed after logging step 7, its last checkpoint at step 4
        live.step = step
        live.log_metric("train/loss", 1.0 / step)
        if step % 3 == 0:
            live.log_metric("val/mIoU", 10.0 * step)
    live.make_summary()
    torch.save({"step": 4, "model": {}}, tmp_path / "last.pt")

    live = open_live(tmp_path / "live", resume=True, checkpoint=tmp_path / "last.pt")
    for step in range(5, 8):  # the resumed run logs steps 5-7 again
        live.step = step
        live.log_metric("train/loss", 2.0 / step)
        if step % 3 == 0:
            live.log_metric("val/mIoU", 20.0 * step)
    live.make_summary()

    def rows(name: str) -> list[tuple[int, float]]:
        lines = (tmp_path / "live" / "plots" / "metrics" / name).read_text().splitlines()[1:]
        return [(int(a), float(b)) for a, b in (line.split("\t") for line in lines)]

    assert rows("train/loss.tsv") == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
        (4, 0.25),
        (5, 0.4),
        (6, 1 / 3),
        (7, 2 / 7),
    ]
    assert rows("val/mIoU.tsv") == [(3, 30.0), (6, 120.0)]

    (tmp_path / "last.pt").write_text("not a checkpoint")  # unreadable: nothing dropped here
    open_live(tmp_path / "live", resume=True, checkpoint=tmp_path / "last.pt")
    assert len(rows("train/loss.tsv")) == 7


def test_resuming_after_a_kill_mid_write_of_the_live_files(tmp_path, monkeypatch):
    """SIGKILL while DVCLive rewrote metrics.json (empty) or appended a row (cut short): the
    resumed run starts anyway, the summary written afresh, the cut row dropped."""
    import torch

    monkeypatch.chdir(tmp_path)
    live = open_live(tmp_path / "live", resume=False)
    for step in range(1, 5):
        live.step = step
        live.log_metric("train/loss", 1.0 / step)
    live.make_summary()
    (tmp_path / "live" / "metrics.json").write_text("")
    tsv = tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.write_text(tsv.read_text() + "5")
    torch.save({"step": 4, "model": {}}, tmp_path / "last.pt")
    live = open_live(tmp_path / "live", resume=True, checkpoint=tmp_path / "last.pt")
    live.step = 5
    live.log_metric("train/loss", 0.1)
    live.make_summary()
    assert [line.split("\t")[0] for line in tsv.read_text().splitlines()[1:]] == ["1", "2", "3", "4", "5"]
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["train"]["loss"] == 0.1


def test_one_run_per_scratch_folder_and_the_lock_goes_with_the_run(tmp_path, monkeypatch):
    import re

    import pytest

    from semires.errors import SemiresError
    from stages.common import exclusive_run

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SEMIRES_AGENT_PID"):
        monkeypatch.delenv(k, raising=False)
    scratch, out = tmp_path / "scratch", tmp_path / "data" / "model.pt"
    with exclusive_run("burn-in", scratch, [out]):
        assert (scratch / ".lock").read_text().startswith("pid ")
        with pytest.raises(SemiresError) as e, exclusive_run("burn-in", scratch, [out]):
            pass
        assert re.fullmatch(
            rf"{re.escape(str(scratch))}: another `semires burn-in` run \(pid \d+ on \S+\) is using this "
            r"scratch folder; wait for it to end or stop it \(or give this run its own --scratch\)",
            str(e.value),
        )
        monkeypatch.setenv("RANK", "1")  # a worker its launcher started: the launcher holds the lock
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("SEMIRES_AGENT_PID", "1")
        with exclusive_run("burn-in", scratch, [out]):
            pass
        monkeypatch.delenv("SEMIRES_AGENT_PID")  # rank 1 on a second machine of a bare torchrun
        monkeypatch.setenv("LOCAL_RANK", "0")
        with exclusive_run("burn-in", scratch, [out]):
            pass
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(k)
    assert list(scratch.iterdir()) == [] and not out.parent.exists()  # checked, not made
    with exclusive_run("burn-in", scratch, [out]):  # the next run
        pass

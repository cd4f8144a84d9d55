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

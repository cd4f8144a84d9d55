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

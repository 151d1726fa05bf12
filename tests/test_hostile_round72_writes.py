"""Files rewritten in place (round 72, left open by round 66): ``python -m bench.report --write`` and
``DiTConfig.to_json`` opened their target with "w" (truncating it) and then wrote: an interrupt or a full
disk part way left a truncated README / config.json. Now whole or not at all; each test fails before."""

from __future__ import annotations

import io
import pathlib

import pytest

from bench import report


class _HalfThenInterrupt(io.StringIO):
    """A file whose write keeps half the text, then raises KeyboardInterrupt; on close the kept half goes
    to the real file (what a process killed part way leaves)."""

    def __init__(self, real):
        super().__init__()
        self.real = real

    def write(self, s):
        self.real.write(s[: len(s) // 2])
        raise KeyboardInterrupt

    def close(self):
        self.real.close()
        super().close()


def _interrupt_writes(monkeypatch):
    real_open = pathlib.Path.open

    def fake_open(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        return _HalfThenInterrupt(f) if "w" in mode else f

    monkeypatch.setattr(pathlib.Path, "open", fake_open)


def test_report_write_interrupted_leaves_the_readme_whole(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    before = f"intro\n{report.START}\nold table\n{report.END}\nrest\n"
    readme.write_text(before)
    assert report.main(["--readme", str(readme), "--check"]) == 1  # the table would change
    _interrupt_writes(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        report.main(["--readme", str(readme), "--write"])
    assert readme.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    monkeypatch.undo()
    assert report.main(["--readme", str(readme), "--write"]) == 0
    assert report.main(["--readme", str(readme), "--check"]) == 0


def test_config_to_json_interrupted_leaves_the_old_file_whole(tmp_path, monkeypatch):
    import builtins

    import longcat_vc.config as config
    from longcat_vc.config import DiTConfig

    path = tmp_path / "config.json"
    cfg = DiTConfig(depth=2)
    cfg.to_json(path)
    before = path.read_text()
    real_open = builtins.open

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return _HalfThenInterrupt(f) if "w" in mode else f

    monkeypatch.setattr(config, "open", fake_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        DiTConfig().to_json(path, fastvideo=True)
    monkeypatch.undo()
    assert path.read_text() == before
    assert DiTConfig.from_json(path) == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]

from pathlib import Path

import pytest

from daemon.cli import main
from daemon.compose import read_config
from daemon.config import ConfigError, parse_duration


def test_defaults_match_the_documented_config_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REELQUEUE_CONFIG", raising=False)
    builtin = read_config()
    documented = read_config(Path(__file__).parent.parent / "config.toml")
    assert builtin.model_dump(exclude={"state", "intake", "models"}) == documented.model_dump(
        exclude={"state", "intake", "models"})
    assert builtin.intake.folder[0].model_dump(exclude={"path"}) == \
        documented.intake.folder[0].model_dump(exclude={"path"})
    assert builtin.worker.job_timeout == 7200
    assert builtin.video.width == 832 and builtin.video.fps == 16


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.toml"
    path.write_text('[state]\ndir = "data"\n[[intake.folder]]\npath = "../drop"\n')
    config = read_config(path)
    assert config.state.dir == tmp_path / "sub" / "data"
    assert config.intake.folder[0].path == tmp_path / "drop"


def test_environment_variable_selects_the_file(tmp_path, monkeypatch):
    path = tmp_path / "env.toml"
    path.write_text('[video]\nfps = 24\n')
    monkeypatch.setenv("REELQUEUE_CONFIG", str(path))
    assert read_config().video.fps == 24


@pytest.mark.parametrize("text, expected", [
    ('[video]\nwidth = 833\n', "video.width = 833: must be even"),
    ('[worker]\njob_timeout = "soon"\n', "worker.job_timeout = 'soon': expected a duration"),
    ('[video]\nfsp = 16\n', "video.fsp = 16: unknown key"),
    ('[redis]\nurl = "http://x"\n', "redis.url = 'http://x': must be empty"),
    ('[[intake.folder]]\nkind = "video"\n', "intake.folder[0].path: Field required"),
    ('[video\n', "not valid TOML"),
    ('[[intake.folder]]\npath = "in"\npriority = 0\n',
     'intake.folder[0].priority = 0: is now a queue class: "batch"'),
])
def test_bad_config_names_key_value_and_reason(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert expected in str(info.value)


def test_cli_exits_2_on_a_bad_config(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[video]\nfps = 0\n')
    assert main(["--config", str(path), "jobs"]) == 2
    assert "video.fps = 0" in capsys.readouterr().err


def test_missing_config_file_is_reported(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.toml"), "jobs"]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("value, seconds", [
    (90, 90), ("90s", 90), ("1.5m", 90), ("2h", 7200), ("7d", 604800), ("250ms", 0.25),
])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds

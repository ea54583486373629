"""Fault injection, part 3: the study's front door and PostgreSQL. A server that cannot be reached, a refused
login and a missing database are one ``error:`` line naming host, port and database, never the password; a
server restarted mid-study is survived (reconnected to, or one line and a rerun that completes the grid);
no output or artifact of a PostgreSQL study holds its password. The matrix is in docs/errors.md."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ablations.runner.storage import STORAGE_ENV, make_storage
from grpo_lab.system.errors import UserError
from tests.conftest import ROOT, process_commands
from tests.test_ablation_studies import _free_port, _postgres_server
from tests.test_faults_study import TINY, ablate, complete_by_point

PASSWORD = "Pw-never-shown-7f3a"


def _with_password(url: str, password: str = PASSWORD) -> str:
    return url.replace("postgres@", f"postgres:{password}@", 1)


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), STORAGE_ENV: url}


# ---- fast: the URL as shown, and a server that is not there ------------------------------------------
def test_an_unreachable_server_is_one_line_naming_host_port_and_database(tmp_path, capsys, monkeypatch):
    from ablations.run import main

    pytest.importorskip("psycopg2")
    port = _free_port()  # nothing listens there
    monkeypatch.setenv(STORAGE_ENV, f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/studies")
    with pytest.raises(SystemExit) as exit_:
        main(["--space", "smoke", "--root", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert f"host 127.0.0.1, port {port}, database studies" in err[0] and "Connection refused" in err[0]
    assert PASSWORD not in err[0] and "postgres:***@" in err[0]


# ---- slow: a real server -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_refused_login_and_a_missing_database_are_one_line():
    with _postgres_server() as url:
        port = url.rsplit(":", 1)[1].split("/")[0]
        for bad, why in [(url.replace("postgres@", f"nobody:{PASSWORD}@"), 'role "nobody" does not exist'),
                         (_with_password(url).rsplit("/", 1)[0] + "/nodb", 'database "nodb" does not exist')]:
            with pytest.raises(UserError) as err:
                make_storage(bad)
            line = str(err.value)
            assert f"host 127.0.0.1, port {port}, database " in line and why in line, line
            assert PASSWORD not in line and "\n" not in line


def _restart(url: str) -> None:
    """Restart the throwaway server behind ``url`` (``pg_ctl restart -m fast``: every connection dies)."""
    storage = make_storage(url)
    with storage.engine.connect() as conn:
        data = conn.exec_driver_sql("SHOW data_directory").scalar_one()
    storage.engine.dispose()
    pg_ctl = str(Path(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1]))
    cmd = [pg_ctl, "-D", data, "-l", str(Path(data).parent / "restart.log"), "-m", "fast", "-w", "restart"]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="tiny", storage=make_storage(url)).get_trials()
    except KeyError:  # not created yet
        return []


def _everything_written(root: Path, logs: list[Path], url: str) -> dict[str, bytes]:
    """Every file under ``root`` (logs, trial.yaml, config.yaml, events, report.md, summary.json ...), the
    runs' console output, and the study's and trials' attributes as stored."""
    out = {str(p): p.read_bytes() for p in [*root.rglob("*"), *logs] if p.is_file()}
    storage = make_storage(url)
    study = optuna.load_study(study_name="tiny", storage=storage)
    system = storage.get_study_system_attrs(storage.get_study_id_from_name("tiny"))
    out["study attrs"] = json.dumps([study.user_attrs, system], default=str).encode()
    for t in study.get_trials():
        out[f"trial {t.number}"] = json.dumps([t.user_attrs, t.system_attrs, t.params], default=str).encode()
    return out


@pytest.mark.slow
def test_a_server_restart_mid_study_is_survived_and_the_password_is_never_shown(tmp_path):
    """The tiny study on PostgreSQL, its URL (with a password) in ``GRPO_LAB_STORAGE``; the server is
    restarted while a trial runs. The runner either finishes (it reconnected) or stops with one ``error:``
    line; rerunning the command completes the grid with one COMPLETE trial per point. No process's command
    line, no console output, file or stored attribute of the study holds the password."""
    with _postgres_server() as plain:
        url, root = _with_password(plain), tmp_path / "runs"
        logs = [tmp_path / f"{name}.{i}" for i in (1, 2) for name in ("out", "err")]
        with open(logs[0], "w") as out, open(logs[1], "w") as err:
            runner = subprocess.Popen(ablate(root), cwd=tmp_path, env=_env(url), stdout=out, stderr=err)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and runner.poll() is None:
                states = [t.state for t in _trials(url)]
                if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                    break
                time.sleep(0.5)
            assert runner.poll() is None, "the study ended before the restart"
            assert not [cmd for _, cmd in process_commands() if PASSWORD in cmd]
            _restart(plain)
            status = runner.wait(timeout=300)
        finally:
            runner.kill()
        first_err = logs[1].read_text()
        if status != 0:  # it stopped: one line, no traceback
            assert status == 2 and "Traceback" not in first_err, first_err[-3000:]
            assert first_err.strip().splitlines()[-1].startswith("error: lost the connection to the study's")
        with open(logs[2], "w") as out, open(logs[3], "w") as err:
            assert subprocess.run(ablate(root), cwd=tmp_path, env=_env(url), stdout=out, stderr=err,
                                  timeout=300).returncode == 0, logs[3].read_text()[-3000:]
        done = complete_by_point(url)
        assert len(done) == len(TINY.points()) and set(done.values()) == {1}, done
        assert (root / "ablate" / "tiny" / "report.md").is_file()
        written = _everything_written(root, logs, url)
        assert "postgres:***@" in logs[1].read_text()  # the banner (on stderr) names the database, masked
        assert not [name for name, data in written.items() if PASSWORD.encode() in data]

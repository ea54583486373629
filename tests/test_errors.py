"""A user's mistake is one ``error:`` line and exit status 2 at every entry point; ``--debug`` (or
GRPO_LAB_DEBUG=1) shows the traceback; a bug keeps its traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ablations.run import main as ablate_main
from ablations.spaces.space import Space
from grpo_lab import cli
from grpo_lab.data.datamodule import QueryDataModule
from grpo_lab.system.entry import run_cli
from grpo_lab.system.errors import DEBUG_ENV, UserError, UserFileNotFoundError, UserRuntimeError, error_line
from grpo_lab.variance import main as probe_main
from tests.conftest import CONFIGS, ROOT

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    """GRPO_LAB_DEBUG off, and restored after a test whose ``--debug`` sets it."""
    monkeypatch.setenv(DEBUG_ENV, "0")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """One warm-start cache for the module: the fits that reach training build it once."""
    return tmp_path_factory.mktemp("ws")


# ---- run_cli itself ----------------------------------------------------------------------------------
def _fails_with(err: BaseException):
    def main(argv):
        raise err

    return main


def test_a_user_error_is_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(_fails_with(UserError("temperature must be > 0,\n  got 0.0")), [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: temperature must be > 0, got 0.0\n"


def test_a_wrapped_cause_gets_a_hint_and_a_bug_keeps_its_traceback(capsys):
    try:
        {}["x"]
    except KeyError as cause:
        wrapped = UserRuntimeError("reward function 'boom' raised KeyError: 'x'")
        wrapped.__cause__ = cause
    assert error_line(wrapped) == ("error: reward function 'boom' raised KeyError: 'x' "
                                   "(rerun with --debug for the traceback)")
    with pytest.raises(ZeroDivisionError):  # not the user's input: no translation
        run_cli(_fails_with(ZeroDivisionError("bug")), [])
    with pytest.raises(KeyError):
        run_cli(_fails_with(KeyError("bug")), [])
    assert capsys.readouterr().err == ""


def test_debug_flag_and_env_let_the_traceback_through(monkeypatch):
    seen = []

    def main(argv):
        seen.append(argv)
        raise UserError("bad")

    with pytest.raises(UserError):
        run_cli(main, ["fit", "--debug", "--x", "1"])
    assert seen == [["fit", "--x", "1"]] and os.environ[DEBUG_ENV] == "1"  # children inherit it
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError):
        run_cli(main, ["fit"])


def test_debug_is_taken_out_of_sys_argv_when_main_reads_it(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["grpo-lab", "fit", "--debug", "--config", "x.yaml"])
    assert run_cli(lambda argv: (argv, list(sys.argv))) == (None, ["grpo-lab", "fit", "--config", "x.yaml"])


def test_user_errors_are_still_the_builtin_kinds():
    assert issubclass(UserFileNotFoundError, FileNotFoundError)
    assert issubclass(UserFileNotFoundError, ValueError)
    assert issubclass(UserRuntimeError, RuntimeError) and issubclass(UserError, ValueError)


def test_every_entry_point_documents_debug(capsys):
    from ablations.run import build_parser as ablate_parser
    from grpo_lab.variance import build_parser as probe_parser

    assert "--debug" in ablate_parser().format_help() and "--debug" in probe_parser().format_help()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # as wrapped for any terminal width
    assert exit_.value.code == 0 and "--debug (anywhere on the command line) or GRPO_LAB_DEBUG=1" in help_text


def test_prompts_per_step_not_divisible_is_one_line(capsys):
    """(Found under DDP, which cannot start inside pytest; the data module's check with a stand-in
    trainer.)"""
    dm = QueryDataModule(prompts_per_step=3, num_train=16)
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(SystemExit):
        run_cli(lambda argv: dm.per_process_prompts(), [])
    assert capsys.readouterr().err == ("error: prompts_per_step=3 is not divisible across 2 processes; "
                                       "use a multiple of 2\n")


# ---- grpo-lab, in process: each class of mistake -----------------------------------------------------
def _grpo_lab(tmp: Path, ws: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "smoke.yaml"), "--trainer.logger.init_args.save_dir",
            str(tmp / "runs"), "--model.warm_start.cache_dir", str(ws), "--trainer.enable_progress_bar",
            "false", *extra]


def nan_reward(completions, **_):
    return [float("nan")] * len(completions)


def one_short(completions, **_):
    return [1.0] * (len(completions) - 1)


def raises(completions, **_):
    return [{}["missing"] for _ in completions]


CASES = {
    "bad_jsonl_line": (["--data.dataset", "{tmp}/bad.jsonl"],
                       r"error: .*bad\.jsonl:2: invalid JSON \(Expecting"),
    "missing_dataset": (["--data.dataset", "{tmp}/nope.jsonl"],
                        r"error: dataset file .*nope\.jsonl does not exist"),
    "reward_column": (["--data.dataset", "{tmp}/no_answer.jsonl"],
                      r"error: reward function 'exact_match' needs the column 'answer', which "
                      r".*no_answer\.jsonl:3 lacks"),
    "unknown_dataset": (["--data.dataset", "arithmetik"],
                        r"error: unknown dataset 'arithmetik': use a built-in task"),
    "unknown_estimator": (["--model.advantage", "nope"],
                          r"error: unknown advantage estimator 'nope'; known: .*group_norm"),
    "bad_estimator_path": (["--model.advantage", "no_such_module:fn"],
                           r"error: advantage estimator 'no_such_module:fn': cannot import module "
                           r"'no_such_module'"),
    "unknown_aggregation": (["--model.aggregation", "nope"],
                            r"error: unknown aggregation 'nope'; known: constant"),
    "unknown_kl": (["--model.kl_estimator", "k9"], r"error: unknown KL estimator 'k9'; known: k1, k2, k3"),
    "unknown_reward": (["--model.rewards", "[nope]"], r"error: unknown reward 'nope'; known: .*exact_match"),
    "reward_nan": (["--model.rewards", "[tests.test_errors:nan_reward]"],
                   r"error: reward function 'nan_reward' returned nan for completion .*; rewards must be "
                   r"finite"),
    "reward_count": (["--model.rewards", "[tests.test_errors:one_short]"],
                     r"error: reward function 'one_short' returned 15 values for 16 completions$"),
    "reward_raises": (["--model.rewards", "[tests.test_errors:raises]"],
                      r"error: reward function 'raises' raised KeyError: 'missing' \(rerun with --debug"),
    "clip_low": (["--model.clip_low", "1.0"],
                 r"error: need 0 <= clip_low < 1 and clip_high >= 0, got clip_low=1.0, "),
    "temperature": (["--model.temperature", "0"], r"error: temperature must be > 0, got 0.0$"),
    "num_heads": (["--model.policy.num_heads", "3"], r"error: num_heads=3 must divide hidden_size=32$"),
    "accumulate": (["--trainer.accumulate_grad_batches", "2"],
                   r"error: trainer.accumulate_grad_batches > 1 .*micro_batches"),
    "ckpt_path": (["--ckpt_path", "{tmp}/none.ckpt"], r"error: --ckpt_path .*none\.ckpt: no such checkpoint"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grpo_lab_user_error_is_one_line(case, tmp_path, ws, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{bad\n')
    (tmp_path / "no_answer.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n' * 2
                                              + '{"prompt": "2+2="}\n'
                                              + '{"prompt": "3+3=", "answer": "6"}\n' * 20)
    extra, pattern = CASES[case]
    with pytest.raises(SystemExit) as exit_:
        cli.main(_grpo_lab(tmp_path, ws, *[a.format(tmp=tmp_path) for a in extra]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    assert err.rstrip("\n").endswith(errors[0])  # the last thing printed


def test_grpo_lab_parse_errors_keep_the_usage(tmp_path, ws, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(_grpo_lab(tmp_path, ws, "--model.no_such_option", "1"))
    assert exit_.value.code == 2 and "usage:" in capsys.readouterr().err


def test_grpo_lab_keeps_the_traceback_of_a_bug(tmp_path, ws, capsys):
    """An estimator that divides by zero is a bug in code (the user's here), not a wrong input: it propagates
    as itself, so the command prints its traceback."""
    (tmp_path / "buggy.py").write_text("def est(rewards, eps):\n    return 1 // 0\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ZeroDivisionError):
            cli.main(_grpo_lab(tmp_path, ws, "--model.advantage", "buggy:est"))
    finally:
        sys.path.remove(str(tmp_path))
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "pattern"), [
    (["--space", "smoke", "--study", "absent", "--report-only"],
     r"^error: no study 'absent' in sqlite:///.*absent\.db: run "),
    (["--space", "smoke", "--storage", "not a url"], r"^error: --storage 'not a url' is not a database URL"),
    (["--space", "no_such_module:SPACE"],
     r"^error: space 'no_such_module:SPACE': cannot import module 'no_such_module'"),
    (["--space", "smoke", "--snr-precision", "0.1"], r"^error: --snr-precision 0.1 needs --until-decisive"),
    (["--space", "smoke", "--until-decisive", "--snr-precision", "10"],
     r"^error: --snr-precision 10 needs --until-decisive and a fraction in \(0, 1\)"),
    (["--space", "smoke", "--until-decisive", "--round-seeds", "0"],
     r"^error: --round-seeds must be >= 1 and --max-seeds >= 2, got 0 and 64"),
])
def test_ablate_user_errors(argv, pattern, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        ablate_main([*argv, "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and re.search(pattern, err), err


def test_ablate_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
        ablate_main(["--space", "no_such_module:SPACE", "--root", str(tmp_path), "--debug"])


BAD_SPACE = Space(name="bad_temperature", description="a space whose config is wrong", grid={"seed": [0]},
                  base_config="configs/ablate_smoke.yaml", overrides={"model.temperature": 0.0}, probe=None)


@pytest.mark.slow
def test_ablate_space_with_a_bad_config_value_is_one_line(tmp_path, capsys):
    """The warm start's ``grpo-lab warmstart`` fit ends in its own error line; the runner says it in one."""
    with pytest.raises(SystemExit) as exit_:
        ablate_main(["--space", "tests.test_errors:BAD_SPACE", "--root", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and err[-1].startswith(
        "error: building the warm start failed: temperature must be > 0, got 0.0 (see "), err[-5:]


def test_probe_user_errors(tmp_path, capsys):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for ckpt, message in [(tmp_path / "missing.ckpt", "no such checkpoint file"),
                          (tmp_path / "notes.ckpt", "not a checkpoint")]:
        with pytest.raises(SystemExit) as exit_:
            probe_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "probe.json")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"error: --ckpt {ckpt}: {message}")
        assert len(err.splitlines()) == 1


# ---- the real commands, as subprocesses (the entry points are wired to run_cli) ------------------------
def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    full.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_commands_print_one_line_and_exit_2(tmp_path):
    res = _run([str(BIN / "grpo-lab-ablate"), "--space", "nope", "--root", str(tmp_path)], tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: unknown space 'nope'; known: ")
    assert "(or give 'module:attribute')" in res.stderr
    assert all(name in res.stderr for name in ("default", "smoke", "controls", "field"))
    res = _run([sys.executable, "-m", "grpo_lab.variance", "--ckpt", "missing.ckpt"], tmp_path)
    assert (res.returncode, res.stderr) == (2, "error: --ckpt missing.ckpt: no such checkpoint file\n")


@pytest.mark.slow
def test_grpo_lab_command_one_line_then_traceback_with_debug(tmp_path, ws):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"answer": "3"}\n')
    cmd = [str(BIN / "grpo-lab"), *_grpo_lab(tmp_path, ws, "--data.dataset", "bad.jsonl")]
    res = _run(cmd, tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    want = "error: bad.jsonl:3: missing a non-empty string field 'prompt' (or 'question')"
    assert res.stderr.splitlines()[-1] == want
    assert "Traceback" not in res.stderr
    res = _run([*cmd, "--debug"], tmp_path)  # taken out before LightningCLI parses: not an unknown option
    assert res.returncode == 1 and "Traceback" in res.stderr
    assert "grpo_lab.system.errors.UserError: bad.jsonl:3" in res.stderr

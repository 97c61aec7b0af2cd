from typer.testing import CliRunner

from agent.cli import app

GROUPS = ["run", "ingest", "triage", "teacher", "retrain", "eval", "simulate", "review",
          "serve", "status", "report", "db", "config", "dataset"]


def test_help_lists_every_command_group():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for g in GROUPS:
        assert f"  {g} " in r.output or f"  {g}\n" in r.output, g


def test_subgroup_help():
    for g, subs in {"db": ["upgrade", "downgrade"], "config": ["validate"],
                    "review": ["list", "show", "approve", "edit", "reject"],
                    "dataset": ["import", "export"], "teacher": ["label"]}.items():
        r = CliRunner().invoke(app, [g, "--help"])
        assert r.exit_code == 0
        for s in subs:
            assert s in r.output


def test_run_without_accounts_says_there_is_nothing_to_watch(state_dir, tmp_path):
    """A daemon started before any [[accounts]] is configured says so, then stops cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    assert CliRunner().invoke(app, ["db", "upgrade"]).exit_code == 0
    log = tmp_path / "daemon.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", "from agent.cli import main; main()",
                                 "run", "--no-scheduler"],
                                stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            deadline = time.monotonic() + 60
            while "daemon started" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
    out = log.read_text()
    assert rc == 0, out
    assert "no mailbox to watch" in out and "[[accounts]]" in out

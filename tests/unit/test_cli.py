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

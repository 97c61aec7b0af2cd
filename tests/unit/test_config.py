from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app
from config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "example.toml"


def test_example_config_validates():
    r = CliRunner().invoke(app, ["config", "validate", str(EXAMPLE)])
    assert r.exit_code == 0, r.output
    assert "ok:" in r.output


def test_validate_warns_about_secrets_this_environment_lacks(tmp_path, monkeypatch,
                                                              state_dir):
    import json

    cfg = tmp_path / "c.toml"
    cfg.write_text('[[accounts]]\nname = "support"\nhost = "h"\nuser = "u"\n'
                   'password_env = "SUPPORT_PW"\n')
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY_FILE", raising=False)
    r = CliRunner().invoke(app, ["config", "validate", str(cfg)])
    assert r.exit_code == 0, r.output       # a warning, not an error: the daemon may run elsewhere
    assert "accounts.support.password_env: $SUPPORT_PW is not set" in r.output
    assert "teacher.api_key_env: $ANTHROPIC_API_KEY" in r.output
    monkeypatch.setenv("SUPPORT_PW_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    r = CliRunner().invoke(app, ["config", "validate", "--json", str(cfg)])
    assert r.exit_code == 0 and json.loads(r.stdout)["unset_secrets"] == []


def test_three_mistakes_are_all_reported_with_key_paths(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[router]\ntarget_risk = 1.5\n'                        # out of range
        '[scheduler]\nretrain_cron = "every day"\n'            # not cron
        '[[accounts]]\nname = "a"\nhost = "h"\nuser = "u"\npassword = "hunter2"\n'  # inline secret
    )
    r = CliRunner().invoke(app, ["config", "validate", str(bad)])
    assert r.exit_code == 2
    out = r.output
    assert "router.target_risk" in out
    assert "scheduler.retrain_cron" in out
    assert "accounts.0.password" in out
    assert "hunter2" not in out


def test_json_output_lists_problems(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[taxonomy]\nalways_escalate = ["nope"]\n[student]\nbatch_size = 0\n')
    r = CliRunner().invoke(app, ["config", "validate", "--json", str(bad)])
    assert r.exit_code == 2
    import json

    doc = json.loads(r.stdout)
    keys = sorted(p["key"] for p in doc["problems"])
    assert keys == ["student.batch_size", "taxonomy"]


def test_toml_syntax_error_is_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[router\n")
    with pytest.raises(ConfigError) as e:
        load_settings(bad)
    assert "not valid TOML" in str(e.value)


def test_env_overrides_toml_and_cli_overrides_env(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text("[router]\ntarget_risk = 0.05\naudit_fraction = 0.1\n")
    assert load_settings(f).router.target_risk == 0.05
    monkeypatch.setenv("UNDERSTUDY_ROUTER__TARGET_RISK", "0.01")
    s = load_settings(f)
    assert s.router.target_risk == 0.01
    assert s.router.audit_fraction == 0.1          # untouched keys keep the file's value
    assert load_settings(f, state_dir=str(tmp_path / "x")).state_dir == tmp_path / "x"


def test_threshold_start_takes_a_share_or_auto_and_names_a_bad_value(tmp_path):
    f = tmp_path / "c.toml"
    assert load_settings(None).router.threshold_start == 0.4
    f.write_text('[router]\nthreshold_start = "auto"\n')
    assert load_settings(f).router.threshold_start == "auto"
    f.write_text("[router]\nthreshold_start = 0.25\n")
    assert load_settings(f).router.threshold_start == 0.25
    for bad in ('"deep"', "1.5"):
        f.write_text(f"[router]\nthreshold_start = {bad}\n")
        with pytest.raises(ConfigError, match="router.threshold_start"):
            load_settings(f)


def test_config_env_var_names_the_file(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text('log_level = "debug"\n')
    monkeypatch.setenv("UNDERSTUDY_CONFIG", str(f))
    assert load_settings(None).log_level == "debug"


def test_default_database_is_sqlite_in_state_dir(state_dir):
    s = load_settings(None)
    assert s.db_url == f"sqlite:///{state_dir / 'understudy.db'}"


def test_relative_state_dir_is_anchored_once(tmp_path, monkeypatch, state_dir):
    """From the CLI or the environment: the working directory at load time (from a TOML
    file: the file's directory), so child processes and stored paths agree."""
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, state_dir="st")
    assert s.state_dir == tmp_path / "st" and s.db_url == f"sqlite:///{tmp_path}/st/understudy.db"
    monkeypatch.setenv("UNDERSTUDY_STATE_DIR", "~/us")
    assert load_settings(None).state_dir == Path.home() / "us"
    cfg = tmp_path / "conf"
    cfg.mkdir()
    (cfg / "c.toml").write_text('state_dir = "st"\n')
    monkeypatch.delenv("UNDERSTUDY_STATE_DIR")
    assert load_settings(cfg / "c.toml").state_dir == cfg / "st"


def test_price_table_defaults_follow_the_model():
    s = load_settings(None, teacher={"model": "claude-haiku-4-5-20251001"})
    assert s.teacher.price_table.input == 1.0 and s.teacher.price_table.output == 5.0
    assert s.teacher.price_table.cache_read == pytest.approx(0.1)


def test_secret_comes_from_env_or_file(tmp_path, monkeypatch):
    from config import MissingSecret, read_secret

    with pytest.raises(MissingSecret, match="export IMAP_PW_TEST"):
        read_secret("IMAP_PW_TEST")
    (tmp_path / "pw").write_text("from-file-secret\n")
    monkeypatch.setenv("IMAP_PW_TEST_FILE", str(tmp_path / "pw"))
    assert read_secret("IMAP_PW_TEST") == "from-file-secret"
    monkeypatch.setenv("IMAP_PW_TEST", "from-env")
    assert read_secret("IMAP_PW_TEST") == "from-env"


def test_assistant_weight_reaches_the_trainer_and_rejects_zero(tmp_path):
    from distill.pipeline import retrain_kwargs

    f = tmp_path / "c.toml"
    f.write_text("[student]\nassistant_weight = 0.5\n")
    assert retrain_kwargs(load_settings(f))["assistant_weight"] == 0.5
    assert retrain_kwargs(load_settings(None))["assistant_weight"] == 1.0
    f.write_text("[student]\nassistant_weight = 0\n")
    with pytest.raises(ConfigError, match="student.assistant_weight"):
        load_settings(f)

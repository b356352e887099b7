"""Settings: defaults < TOML file < environment < explicit overrides, and clear errors for mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fhir_server.cli import cli
from fhir_server.config import load_settings


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "fhir.toml"
    config.write_text('default_count = 7\nmax_count = 70\ndatabase = "from_file"\n')
    monkeypatch.setenv("FHIR_MAX_COUNT", "80")
    monkeypatch.setenv("MONGODB_URI", "mongodb://example.invalid:1")
    settings = load_settings(config, database="explicit")
    assert settings.default_count == 7  # from the file
    assert settings.max_count == 80  # the environment beats the file
    assert settings.database == "explicit"  # an override beats both
    assert settings.mongodb_uri == "mongodb://example.invalid:1"


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_MAX_COUNT", "lots")
    with pytest.raises(ValueError, match="FHIR_MAX_COUNT='lots'"):
        load_settings()


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "fhir.toml"
    config.write_text("bogus = 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_settings(config)


def test_serve_reports_bad_settings_without_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "mongodb://127.0.0.1:1")
    monkeypatch.setenv("FHIR_DEFAULT_COUNT", "many")
    result = CliRunner().invoke(cli, ["serve", "--port", "1"])
    assert result.exit_code != 0
    assert "FHIR_DEFAULT_COUNT='many'" in result.output
    assert "Traceback" not in result.output

"""Settings: qant.toml, environment overrides, secrets kept out, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from qant_mail.authoring.render import Renderer
from qant_mail.base.config import find_config, load_settings
from qant_mail.base.errors import ConfigError


def test_repository_settings_are_french_by_default(project: Path) -> None:
    settings = load_settings(project / "qant.toml", env={})
    assert settings.newsletter.locale == "fr"
    assert settings.labels.event == "L’ÉVÉNEMENT"
    assert settings.labels.separator == "\u00a0: "


def test_environment_overrides_a_setting(project: Path) -> None:
    env = {"QANT_NEWSLETTER_BASE_URL": "https://autre.example/lettre/"}
    settings = load_settings(project / "qant.toml", env=env)
    assert settings.newsletter.base_url == "https://autre.example/lettre"


def test_invalid_environment_value_names_the_variable(project: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(project / "qant.toml", env={"QANT_NEWSLETTER_WORDS_PER_MINUTE": "vite"})
    assert "QANT_NEWSLETTER_WORDS_PER_MINUTE (environment)" in str(caught.value)


def test_an_unknown_time_zone_is_named(project: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(project / "qant.toml", env={"QANT_NEWSLETTER_TIMEZONE": "Mars/Olympus"})
    message = str(caught.value)
    assert "QANT_NEWSLETTER_TIMEZONE" in message
    assert "'Mars/Olympus' is not a time zone" in message


def test_missing_setting_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "qant.toml"
    path.write_text('[newsletter]\nname = "N"\n[sender]\nname = "N"\naddress = "a@b.fr"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    message = str(caught.value)
    for key in ("newsletter.title", "newsletter.byline", "newsletter.base_url"):
        assert f"{path}: {key}: required, but missing" in message


def test_unknown_setting_gets_a_suggestion(project: Path) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text().replace("tagline =", "tagilne ="))
    with pytest.raises(ConfigError, match="did you mean 'tagline'"):
        load_settings(path, env={})


def test_secrets_are_refused_in_the_settings_file(project: Path) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text().replace("[smtp]\n", '[smtp]\npassword = "hunter2"\n'))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert "QANT_SMTP_PASSWORD" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_toml_syntax_error_is_located(project: Path) -> None:
    path = project / "qant.toml"
    path.write_text("[newsletter\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_settings(path, env={})


def test_labels_can_be_overridden(project: Path) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text() + '\n[labels]\nevent = "À LA UNE"\n')
    assert load_settings(path, env={}).labels.event == "À LA UNE"


def test_english_locale_has_english_labels(project: Path) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text().replace('locale = "fr"', 'locale = "en"'))
    settings = load_settings(path, env={})
    assert settings.labels.event == "THE EVENT"
    assert Renderer(settings).format_date(__import__("datetime").date(2023, 11, 20)) == (
        "Monday, November 20, 2023"
    )


def test_locale_without_labels_requires_them(project: Path) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text().replace('locale = "fr"', 'locale = "de"'))
    with pytest.raises(ConfigError, match=r"labels\.event: required"):
        load_settings(path, env={})


def test_settings_file_is_found_in_a_parent_folder(project: Path) -> None:
    assert find_config(project / "issues", env={}) == project / "qant.toml"


def test_no_settings_file_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        find_config(tmp_path, env={})


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ('name = "Qant"', 'name = "Qant\\u0007"', "newsletter.name: the text 'Qant\\x07' contains"),
        ('name = "Qant"', 'name = "Qant\\r\\nBcc: x@evil.example"', "contains a line break"),
        ("[newsletter]\n", '[newsletter]\nlist_id = "qant news <x>"\n', "newsletter.list_id"),
    ],
    ids=["control character", "line break", "list id"],
)
def test_a_value_that_would_reach_a_header_is_one_clean_line(
    project: Path, setting: str, value: str, says: str
) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text().replace(setting, value, 1))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert says in str(caught.value)

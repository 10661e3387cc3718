"""The local configuration file, its IAS_* twins, and repository identity from real checkouts."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
import setup_support as sx
from setup_support import checkout

from worker.config import (
    ConfigError,
    LocalConfig,
    RepoMapping,
    checkout_root,
    config_path,
    load_config,
    normalise_remote_url,
    repo_identity,
    save_config,
)

isolated_git = sx.isolated_git

SAME_REPO = [
    "git@github.com:org/repo.git",
    "git@github.com:org/repo",
    "github.com:org/repo.git",
    "https://github.com/org/repo",
    "https://github.com/org/repo.git",
    "https://github.com/org/repo/",
    "https://github.com/org/repo.git/",
    "https://user:secret@GitHub.COM:443/org/repo",
    "http://github.com//org/repo",
    "ssh://git@github.com/org/repo.git",
    "ssh://git@github.com:22/org/repo.git",
    "git+ssh://git@github.com/org/repo.git",
    "git://github.com/org/repo.git",
    "git@github.com-work:org/repo.git",
    "ssh://git@github.com-personal/org/repo",
    "git@github.com:/org/repo.git",
    "  https://github.com/org/repo \n",
]


@pytest.mark.parametrize("url", SAME_REPO)
def test_every_spelling_of_one_remote_normalises_to_host_and_path(url: str) -> None:
    assert normalise_remote_url(url) == "github.com/org/repo"


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("git@gitlab.example.com-work:group/sub/app.git", "gitlab.example.com/group/sub/app"),
        ("git@my-server:org/repo.git", "my-server/org/repo"),  # no dot: a host name, not an alias
        ("https://xn--80ak6aa92e.xn--p1ai/org/repo", "xn--80ak6aa92e.xn--p1ai/org/repo"),
        ("https://github.com/Org/Repo", "github.com/Org/Repo"),  # only the host is case-insensitive
        ("https://[::1]:8080/org/repo.git", "::1/org/repo"),
        ("/srv/git/app.git", "/srv/git/app"),
        ("file:///srv/git/app.git", "/srv/git/app"),
    ],
)
def test_hosts_aliases_and_local_paths(url: str, normalised: str) -> None:
    assert normalise_remote_url(url) == normalised


@pytest.mark.parametrize("url", ["", "   ", "https:///org/repo", "git@github.com:", "https://github.com/"])
def test_a_url_naming_no_repository_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="git remote set-url"):
        normalise_remote_url(url)


def test_a_missing_file_gives_the_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path / "config.json", env={})
    assert config == LocalConfig()
    assert (config.control_plane, config.token, config.slots, config.repos) == ("127.0.0.1:50051", "", 1, ())
    assert config.worker_name == socket.gethostname()


def test_the_file_lives_in_ias_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IAS_HOME", str(tmp_path / "home"))
    assert config_path() == tmp_path / "home" / "config.json"


def test_corrupt_json_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"token": "ias_x",')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert str(path) in message and "not valid JSON" in message and "ias setup" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"slots": "2"}, "'slots' must be an integer"),
        ({"slots": True}, "'slots' must be an integer"),
        ({"slots": 0}, "'slots' must be an integer from 1 to 256"),
        ({"token": 42}, "'token' must be a string"),
        ({"control_plane": "no-port"}, "'control_plane'"),
        ({"worker_name": ""}, "'worker_name'"),
        ({"repos": {}}, "'repos' must be a list"),
        ({"repos": [{"repo_id": "r_1", "path": "/x", "label": "x"}]}, "'repos[0].repo_id'"),
        ({"repos": [{"repo_id": "r_" + "0" * 32, "path": 3, "label": "x"}]}, "'repos[0].path'"),
        ({"slot": 2}, "'slot' is not a setting"),
        ({"version": 2}, "'version'"),
    ],
)
def test_a_wrong_value_names_the_field(tmp_path: Path, content: dict[str, object], field: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match="field " + field.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, env={})


def test_env_twins_override_the_file(tmp_path: Path) -> None:
    path = save_config(LocalConfig(control_plane="file:1", token="ias_file", slots=2), tmp_path / "c.json")
    env = {
        "IAS_CONTROL_PLANE": "cp.example.com:443",
        "IAS_TOKEN": "ias_env",
        "IAS_TLS_CA": str(tmp_path / "ca.pem"),
        "IAS_WORKER_NAME": "ci-runner",
        "IAS_WORKER_SLOTS": "8",
        "IAS_UNRELATED": "x",
    }
    config = load_config(path, env=env)
    assert (config.control_plane, config.token, config.worker_name, config.slots) == (
        "cp.example.com:443",
        "ias_env",
        "ci-runner",
        8,
    )
    assert config.tls_ca == tmp_path / "ca.pem"
    assert load_config(path, env={"IAS_TOKEN": ""}).token == "ias_file"  # empty counts as unset


def test_a_bad_env_twin_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match="IAS_WORKER_SLOTS must be an integer from 1 to 256, not 'many'; fix IAS_WORKER_SLOTS",
    ):
        load_config(tmp_path / "none.json", env={"IAS_WORKER_SLOTS": "many"})


def test_load_reads_the_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IAS_WORKER_NAME", "from-env")
    assert load_config(tmp_path / "none.json").worker_name == "from-env"


def test_save_is_private_atomic_and_round_trips(tmp_path: Path) -> None:
    home = tmp_path / "ias"
    config = LocalConfig(
        control_plane="10.0.0.5:50051",
        token="ias_abc",
        tls_ca=tmp_path / "ca.pem",
        worker_name="laptop",
        slots=3,
        repos=(RepoMapping(repo_id="r_" + "a" * 32, path=tmp_path / "app", label="app"),),
    )
    path = save_config(config, home / "config.json")
    assert load_config(path, env={}) == config
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert sorted(os.listdir(home)) == ["config.json"]  # no temporary file left behind
    save_config(LocalConfig(worker_name="again"), path)
    assert load_config(path, env={}).worker_name == "again"


def test_every_clone_of_a_repository_has_one_identity(tmp_path: Path) -> None:
    checkout(tmp_path / "a", ("origin", "git@github.com-me:acme/widgets.git"))
    checkout(tmp_path / "b", ("origin", "https://github.com/acme/widgets"))
    checkout(tmp_path / "c", ("origin", "https://github.com/acme/gadgets"))
    repo_id, label = repo_identity(tmp_path / "a")
    assert repo_id.startswith("r_") and len(repo_id) == 34 and label == "widgets"
    assert repo_identity(tmp_path / "b") == (repo_id, "widgets")
    assert repo_identity(tmp_path / "c")[0] != repo_id


def test_origin_wins_and_a_single_remote_of_another_name_counts(tmp_path: Path) -> None:
    both = checkout(
        tmp_path / "both", ("upstream", "https://github.com/x/up"), ("origin", "https://h.io/x/mine")
    )
    assert repo_identity(Path(both.workdir))[1] == "mine"
    checkout(tmp_path / "one", ("upstream", "https://github.com/x/up"))
    assert repo_identity(tmp_path / "one")[1] == "up"
    checkout(tmp_path / "two", ("a", "https://h.io/x/a"), ("b", "https://h.io/x/b"))
    with pytest.raises(ConfigError, match="git remote rename NAME origin"):
        repo_identity(tmp_path / "two")


def test_a_subdirectory_belongs_to_its_checkout(tmp_path: Path) -> None:
    checkout(tmp_path / "app", ("origin", "https://github.com/acme/app"))
    (tmp_path / "app" / "src").mkdir()
    assert checkout_root(tmp_path / "app" / "src") == (tmp_path / "app").resolve()
    assert repo_identity(tmp_path / "app" / "src") == repo_identity(tmp_path / "app")


def test_identity_errors_say_what_to_do(tmp_path: Path) -> None:
    checkout(tmp_path / "lonely")
    with pytest.raises(ConfigError, match="git remote add origin URL"):
        repo_identity(tmp_path / "lonely")
    checkout(tmp_path / "empty", ("origin", "https://github.com/acme/empty"), commit=False)
    with pytest.raises(ConfigError, match="no commits yet"):
        repo_identity(tmp_path / "empty")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="not a git repository"):
        repo_identity(tmp_path / "plain")
    with pytest.raises(ConfigError, match="does not exist"):
        repo_identity(tmp_path / "missing")


def test_one_checkout_per_repository_and_one_repository_per_checkout(tmp_path: Path) -> None:
    def m(n: str, path: str, label: str = "") -> RepoMapping:
        return RepoMapping(repo_id=f"r_{n * 32}", path=tmp_path / path, label=label or path)

    config = LocalConfig(repos=(m("a", "x"), m("b", "y"), m("c", "z")))
    assert config.linked(m("d", "w")).repos == (m("a", "x"), m("b", "y"), m("c", "z"), m("d", "w"))
    assert config.linked(m("b", "y", "new")).repos == (m("a", "x"), m("b", "y", "new"), m("c", "z"))
    assert config.linked(m("b", "moved")).repos == (m("a", "x"), m("b", "moved"), m("c", "z"))
    assert config.linked(m("d", "z")).repos == (m("a", "x"), m("b", "y"), m("d", "z"))  # remote changed
    assert config.linked(m("a", "z")).repos == (m("a", "z"), m("b", "y"))  # both at once
    assert config.unlinked("r_" + "b" * 32).repos == (m("a", "x"), m("c", "z"))
    assert config.unlinked(str(tmp_path / "z")).repos == (m("a", "x"), m("b", "y"))
    assert config.unlinked("r_nothing") == config
    assert config.repo_paths == {
        "r_" + "a" * 32: tmp_path / "x",
        "r_" + "b" * 32: tmp_path / "y",
        "r_" + "c" * 32: tmp_path / "z",
    }


def test_save_tightens_an_open_directory(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    save_config(LocalConfig(), tmp_path / "open" / "config.json")
    assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o700

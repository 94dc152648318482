"""`--ray-address` against real clusters started with `ray start --head`, with token authentication and
without: a token the run can find is used so that it just works; a cluster that wants a token the run
lacks (or refuses the one it has) is one line saying what to set, with Ray's reason; a cluster without
authentication works even when a token lies in the user's `~/.ray`, where always turning token mode on
would kill every actor unstarted.

Every `caprl` runs with a HOME of its own (never the real `~/.ray`) and only the token variables each
case names; the clusters (`ray_nodes`) are shared by the module and leave no process behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from contract import read_rows
from PIL import Image
from ray_nodes import RayNodes, free_gcs_port
from ray_nodes import ray_nodes as cluster_of_nodes

from caprl_cli.errors import CaprlError
from caprl_cli.execute.ray_cluster import choose_auth_mode, token_source

pytest.importorskip("ray")

FAST = ("--engine", "transformers", "--max-tokens", "6", "--batch-size", "1", "--no-progress", "--executor", "ray")
TOKEN_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


@pytest.fixture(scope="module")
def open_cluster() -> Iterator[RayNodes]:
    """A head started with authentication off (RAY_AUTH_MODE=disabled, as `ray start` does without a token)."""
    with cluster_of_nodes(auth=False) as cluster:
        cluster.start(num_cpus=1)
        yield cluster


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("images")
    names = [f"img{number}.jpg" for number in range(3)]
    for number, name in enumerate(names):
        Image.new("RGB", (40 + number, 36), (number * 60, 90, 160)).save(folder / name)
    return folder, names


def user_env(home: Path, cluster: RayNodes | None, **token: str) -> dict[str, str]:
    """A user's shell: a HOME of its own, no Ray variable but the ones given, this tree's caprl_cli."""
    env = {name: value for name, value in os.environ.items() if name not in TOKEN_VARIABLES}
    home.mkdir(parents=True, exist_ok=True)
    if cluster is not None:
        env["PYTHONPATH"] = cluster.client_env()["PYTHONPATH"]
    return {**env, "HOME": str(home), **token}


def caption(run_caprl, cluster: RayNodes, images: tuple[Path, list[str]], output: Path, env: dict[str, str]):
    folder, _ = images
    return run_caprl(
        "caption", folder, "-o", output, "--model", env["CAPRL_TEST_MODEL"], *FAST, "--ray-address", cluster.address,
        env=env, timeout=900,
    )  # fmt: skip


def assert_captioned(result, output: Path, names: list[str]) -> None:
    assert result.returncode == 0, result.stderr
    rows = read_rows(output)
    assert sorted(row["key"] for row in rows) == names
    assert all(row["status"] == "ok" for row in rows)


def test_token_in_the_users_ray_folder_just_works(
    ray_nodes: RayNodes, images: tuple[Path, list[str]], tiny_model: Path, tmp_path: Path, run_caprl
) -> None:
    """The issue's case: a token cluster, the token in ~/.ray/auth_token, RAY_AUTH_MODE unset."""
    assert ray_nodes.token_path is not None
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(ray_nodes.token_path.read_text())
    env = {**user_env(home, ray_nodes), "CAPRL_TEST_MODEL": str(tiny_model)}
    output = tmp_path / "out.parquet"
    assert_captioned(caption(run_caprl, ray_nodes, images, output, env), output, images[1])


@pytest.mark.parametrize("variable", ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"])
def test_token_variables_choose_token_mode(ray_nodes: RayNodes, tmp_path: Path, variable: str) -> None:
    """Either variable Ray reads a token from is enough: the probes pass with it and choose token mode."""
    assert ray_nodes.token_path is not None
    value = ray_nodes.token_path.read_text() if variable == "RAY_AUTH_TOKEN" else str(ray_nodes.token_path)
    env = user_env(tmp_path / "home", ray_nodes, **{variable: value})
    assert choose_auth_mode(ray_nodes.address, env) == "token"


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ({}, "wants an authentication token and none is set"),
        ({"RAY_AUTH_TOKEN": "not-the-token"}, "refused the authentication token from RAY_AUTH_TOKEN"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, "refused the authentication token"),
        ({"RAY_AUTH_MODE": "disabled"}, "RAY_AUTH_MODE=disabled is set"),
    ],
    ids=["no-token", "wrong-token", "wrong-token-token-mode", "mode-disabled"],
)
def test_token_cluster_without_its_token_is_one_line(
    ray_nodes: RayNodes,
    images: tuple[Path, list[str]],
    tiny_model: Path,
    tmp_path: Path,
    run_caprl,
    token: dict[str, str],
    says: str,
) -> None:
    """Exit 1, one error line (after the run's own "connecting" line): the cluster wants a token, what to
    set, and Ray's own reason; nothing written."""
    env = {**user_env(tmp_path / "home", ray_nodes, **token), "CAPRL_TEST_MODEL": str(tiny_model)}
    output = tmp_path / "out.parquet"
    result = caption(run_caprl, ray_nodes, images, output, env)
    assert result.returncode == 1, result.stderr
    *before, line = result.stderr.strip().splitlines()
    assert before == [f"caprl: connecting to the Ray cluster at {ray_nodes.address}"], result.stderr  # no Ray noise
    assert line.startswith(f"caprl: error: the Ray cluster at {ray_nodes.address} ")
    assert says in line and "RAY_AUTH_TOKEN_PATH" in line
    assert "Authentication token is missing or incorrect" in line  # Ray's reason
    assert not output.exists()


def test_a_token_file_that_is_not_there_is_named(ray_nodes: RayNodes, tmp_path: Path) -> None:
    """RAY_AUTH_TOKEN_PATH naming a missing file: Ray looks no further, and the line says which file."""
    missing = tmp_path / "no-such-token"
    env = user_env(tmp_path / "home", ray_nodes, RAY_AUTH_TOKEN_PATH=str(missing))
    with pytest.raises(CaprlError, match=f"RAY_AUTH_TOKEN_PATH names {missing}, which cannot be read"):
        choose_auth_mode(ray_nodes.address, env)


def test_cluster_without_authentication_works_with_a_token_at_hand(
    open_cluster: RayNodes, images: tuple[Path, list[str]], tiny_model: Path, tmp_path: Path, run_caprl
) -> None:
    """A token in ~/.ray (left by an earlier local cluster) must not put the run in token mode here."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-token-of-another-cluster")
    env = {**user_env(home, open_cluster), "CAPRL_TEST_MODEL": str(tiny_model)}
    assert choose_auth_mode(open_cluster.address, env) == "disabled"
    output = tmp_path / "out.parquet"
    assert_captioned(caption(run_caprl, open_cluster, images, output, env), output, images[1])


def test_an_address_nothing_answers_at_is_one_line(tmp_path: Path) -> None:
    """No cluster at the address: "cannot reach" once Ray's GCS client gives up (about 40 s), not after
    the many minutes of `ray.init`'s own retries."""
    address = f"127.0.0.1:{free_gcs_port()}"
    with pytest.raises(CaprlError, match=f"^cannot reach the Ray cluster at {address}: .*GCS"):
        choose_auth_mode(address, user_env(tmp_path / "home", None))


def test_token_source_follows_rays_order(tmp_path: Path) -> None:
    """RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names (and no further), else ~/.ray/auth_token."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    named = tmp_path / "token"
    assert token_source({"HOME": str(home)}) is None
    (home / ".ray" / "auth_token").write_text("t1\n")
    assert token_source({"HOME": str(home)}) == "~/.ray/auth_token"
    assert token_source({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named)}) is None  # set, unreadable
    named.write_text("t2")
    assert token_source({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named)}) == f"RAY_AUTH_TOKEN_PATH ({named})"
    both = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named), "RAY_AUTH_TOKEN": "t3"}
    assert token_source(both) == "RAY_AUTH_TOKEN"
    assert token_source({"HOME": str(home), "RAY_AUTH_TOKEN": "  "}) == "~/.ray/auth_token"

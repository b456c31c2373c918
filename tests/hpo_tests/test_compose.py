"""docker-compose.yml, Dockerfile and .env.example, checked as far as a machine without a Docker
engine allows: they parse, the services, health check, volumes, GPU reservation and localhost
bindings are there, and the worker's command is an `hpo run` that the real CLI parser accepts.
Nothing here builds an image or starts a container (README, "Docker", says what was not run)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import typer
import yaml

from hpo.cli import app

ROOT = Path(__file__).resolve().parents[2]
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}; $$ is a literal $."""

    def one(match: re.Match[str]) -> str:
        value = env.get(match["name"], "")
        if value:
            return value
        if match["op"] == ":?":
            raise KeyError(f"{match['name']} is required: {match['arg']}")
        return match["arg"] or ""

    return _VARIABLE.sub(one, text.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def rendered(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), env))


def test_services_volumes_and_health_check(compose):
    services = compose["services"]
    assert {"postgres", "dashboard", "worker"} <= set(services)
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:\d+", postgres["image"])  # a pinned major version
    data = [v for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data")]
    assert data and data[0].split(":")[0] in compose["volumes"]  # a named volume
    health = postgres["healthcheck"]
    assert "pg_isready" in " ".join(health["test"])
    assert health["interval"] and health["retries"] >= 3
    for name in ("dashboard", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["build"] == "." and services["dashboard"]["build"] == "."


def test_the_password_comes_from_the_environment_and_is_required(compose):
    postgres = compose["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    for name in ("dashboard", "worker"):
        url = compose["services"][name]["environment"]["HPO_STORAGE"]
        assert "${POSTGRES_PASSWORD}" in url and "@postgres:5432/" in url
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        rendered({})
    assert "POSTGRES_PASSWORD" in env_example()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()  # never baked into an image


def test_ports_are_bound_to_localhost_by_default(compose):
    for env in ({"POSTGRES_PASSWORD": "x"}, {**env_example()}):
        services = rendered(env)["services"]
        for name in ("postgres", "dashboard"):
            [port] = services[name]["ports"]
            assert port.startswith("127.0.0.1:"), (name, port)
        assert "ports" not in services["worker"]


def test_the_worker_reserves_nvidia_gpus(compose):
    worker = compose["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == "all" or int(device["count"]) >= 1
    assert worker["environment"]["HPO_CHECKPOINT_DIR"] in {
        v.split(":")[1] for v in worker["volumes"]
    }  # checkpoints outlive the container
    assert worker["restart"] == "on-failure" and worker["init"] is True


def test_the_worker_command_is_a_real_hpo_run(compose):
    services = rendered(env_example())["services"]
    argv = services["worker"]["command"]
    assert argv[:2] == ["hpo", "run"]
    cli = typer.main.get_command(app)
    context = cli.make_context("hpo", list(argv[1:]), resilient_parsing=False)
    run = cli.get_command(context, "run")
    params = run.make_context("run", list(argv[2:]), parent=context).params
    assert params["trials"] == int(env_example()["HPO_TRIALS"]) >= 1
    assert params["study"] == env_example()["HPO_STUDY"] and params["device"] == "cuda"
    # The dashboard reads the same database as the workers.
    dashboard = services["dashboard"]
    assert (
        dashboard["environment"]["HPO_STORAGE"] == services["worker"]["environment"]["HPO_STORAGE"]
    )
    # ... through `hpo dashboard` (a real invocation of our parser), which reads $HPO_STORAGE.
    assert dashboard["command"][:2] == ["hpo", "dashboard"]
    serve = cli.get_command(context, "dashboard")
    serve_params = serve.make_context("dashboard", list(dashboard["command"][2:]),
                                      parent=context).params
    assert serve_params["port"] == 8080 and serve_params.get("storage") is None
    # Read-only: whoever reaches the published port cannot delete a study or change a trial.
    assert serve_params["allow_edit"] is False


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_the_dockerfile_installs_the_project_and_runs_unprivileged():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "CMD", "ENTRYPOINT"}
    assert set(keywords) <= known
    assert keywords[0] in ("FROM", "ARG")
    [base] = [rest for k, rest in instructions if k == "FROM"]
    assert base.startswith("python:3.11")
    copied = {shlex.split(rest)[0] for k, rest in instructions if k == "COPY"}
    assert {"pyproject.toml", "pipeline", "storage", "hpo"} <= copied
    runs = " ".join(rest for k, rest in instructions if k == "RUN")
    assert "pip install . " in runs and "torch==" in runs and "optuna-dashboard" in runs
    users = [rest for k, rest in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["hpo"] == "hpo.cli:main"  # what `hpo` in the worker's command runs

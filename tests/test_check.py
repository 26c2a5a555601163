"""`swapd check` as an operator runs it (the real CLI), and commands that must run the same
from any working directory and with systemd's PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from tests.support import FAKE_ENGINE, Swapd, free_port, http, port_block, wait_until

ROOT = Path(__file__).resolve().parent.parent
# What systemd gives a service (systemd.exec(5), "Environment variables in spawned processes").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def check(config: Path, *args: str, path: str | None = None,
          cwd: Path | str = "/") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path} if path is not None else None
    return subprocess.run(
        [sys.executable, "-m", "swapd", "check", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
    )


def warnings(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stdout.splitlines() if line.startswith("warning: ")]


# -- misspelled keys -----------------------------------------------------------------------


def test_misspelled_keys_get_a_suggestion_and_strict_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        healthcheckTimeout: 300
        logRequests: true          # a llama-swap key with no effect here: says why
        models:
          m:
            cmd: {sys.executable} -c pass --port ${{PORT}}
            aliasses: [chat]
            checkEndpont: /v1/models
            ttll: 60
    """))
    done = check(config)
    assert done.returncode == 0, done.stderr  # usable: the misspelled keys are ignored
    assert warnings(done) == [
        "warning: healthcheckTimeout: unknown key, ignored; "
        "did you mean healthCheckTimeout?",
        "warning: models.m.aliasses: unknown key, ignored; did you mean aliases?",
        "warning: models.m.checkEndpont: unknown key, ignored; "
        "did you mean checkEndpoint?",
        "warning: models.m.ttll: unknown key, ignored; did you mean ttl?",
        "warning: logRequests: swapd counts every request in /metrics and logs failed ones; "
        "it writes no line per request",
    ]

    strict = check(config, "--strict")
    assert strict.returncode == 2
    assert "did you mean healthCheckTimeout?" in strict.stdout
    assert "5 warning(s) and --strict" in strict.stderr


def test_strict_passes_a_clean_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"models:\n  m:\n    cmd: {sys.executable} -c pass --port ${{PORT}}\n")
    done = check(config, "--strict")
    assert done.returncode == 0, done.stdout + done.stderr
    assert warnings(done) == []


# -- commands: relative paths, PATH ----------------------------------------------------------


def test_relative_paths_in_cmd_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    (folder / "bin").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "models" / "a.gguf").write_bytes(b"")
    engine = folder / "bin" / "engine"
    engine.write_text("#!/bin/sh\n")
    engine.chmod(0o755)
    config = folder / "config.yaml"
    config.write_text(
        "models:\n  m:\n    cmd: ./bin/engine --model models/a.gguf --draft models/none.gguf"
        " --repo Qwen/Qwen3-8B --cache=models/c --port ${PORT}\n"
        "    cmdStop: bin/engine stop\n"
    )
    done = check(config, "--strict", cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr
    # cmd[0] always; another argument only where it names something beside the config.
    assert (f"argv:     {folder}/bin/engine --model {folder}/models/a.gguf "
            "--draft models/none.gguf --repo Qwen/Qwen3-8B --cache=models/c --port 5800"
            ) in done.stdout
    assert f"cmdStop:  {folder}/bin/engine stop" in done.stdout


def test_check_reports_a_command_it_cannot_exec(tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        "models:\n"
        "  bare:\n    cmd: python examples/x.py --port ${PORT}\n"
        "  rel:\n    cmd: ./engines/missing --port ${PORT}\n"
        "  ok:\n    cmd: ${PYTHON} -c pass --port ${PORT}\n"
    )
    done = check(config, path=str(empty))
    assert done.returncode == 0, done.stderr  # a warning: it may be installed later
    assert warnings(done) == [
        f"warning: models.bare.cmd: 'python' is not on the PATH engines run with ({empty}); "
        "the engine cannot start",
        f"warning: models.rel.cmd: {tmp_path}/engines/missing does not exist; "
        "the engine cannot start",
    ]
    assert check(config, "--strict", path=str(empty)).returncode == 2


def test_the_example_config_passes_strict_check_as_systemd_runs_it(tmp_path: Path) -> None:
    # systemd/README.md: config.example.yaml as /etc/swapd/config.yaml, the launcher beside
    # it; swapd with WorkingDirectory=/ and systemd's PATH (no virtualenv on it).
    etc = tmp_path / "etc" / "swapd"
    (etc / "examples").mkdir(parents=True)
    (etc / "recipes").mkdir()
    shutil.copy(ROOT / "config.example.yaml", etc / "config.yaml")
    shutil.copy(ROOT / "examples" / "cpu_llama_server.py", etc / "examples")
    done = check(etc / "config.yaml", "--strict", path=SYSTEMD_PATH, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"argv:     {sys.executable} {etc}/examples/cpu_llama_server.py" in done.stdout


def test_an_engine_with_relative_paths_starts_from_any_directory(tmp_path: Path) -> None:
    # The systemd case end to end: swapd runs in / with systemd's PATH; the recipe names its
    # launcher relative to the config and its interpreter as ${PYTHON}.
    etc = tmp_path / "etc"
    (etc / "engines").mkdir(parents=True)
    (etc / "engines" / "fake_engine.py").symlink_to(FAKE_ENGINE)
    port = free_port()
    config = etc / "config.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}",
        "stateDir": str(tmp_path / "state"),
        "startPort": port_block(),
        "models": {"m": {"cmd": "${PYTHON} engines/fake_engine.py --port ${PORT}"}},
    }))
    log = tmp_path / "swapd.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "swapd", "serve", "--config", str(config)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd="/",
        env={"PATH": SYSTEMD_PATH, "HOME": str(tmp_path)},
    )
    daemon = Swapd(config, port, proc, log, tmp_path / "state")
    try:
        def up() -> bool:
            assert proc.poll() is None, daemon.log()
            try:
                return http("GET", daemon.url + "/health", timeout=1)[0] == 200
            except OSError:
                return False

        wait_until(up, timeout=20, message="swapd /health")
        code, body = daemon.post("/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert code == 200, (body, daemon.log())
        assert "cannot exec" not in daemon.log()
    finally:
        daemon.stop()

"""``tureen serve``: its options, and the real entry point serving until interrupted."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from service.serve import add_serve_command, settings_from_args
from service.settings import ConfigFileError


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tureen")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_options_override_the_config_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tureen.yaml"
    config.write_text("port: 9001\nworkers: 3\napi_tokens: [from-file]\n")
    monkeypatch.setenv("TUREEN_WORKERS", "2")
    args = _parse(
        [
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "data"),
            "--allow-root",
            str(tmp_path / "a"),
            "--allow-root",
            str(tmp_path / "b"),
        ]
    )
    settings = settings_from_args(args)
    assert settings.host == "127.0.0.1"
    assert settings.port == 9001
    assert settings.workers == 2
    assert settings.api_tokens == ["from-file"]
    assert settings.data_dir == (tmp_path / "data").resolve()
    assert settings.allow_roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert "from-file" not in repr(settings)


def test_invalid_settings_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="workers"):
        settings_from_args(_parse(["--workers", "0", "--data-dir", str(tmp_path)]))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start_serve(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Run ``tureen serve`` (tokens tok-1, tok-2) on a free port until it is ready."""
    port = _free_port()
    script = textwrap.dedent(
        """
        import argparse, sys
        from service.serve import add_serve_command
        parser = argparse.ArgumentParser(prog="tureen")
        add_serve_command(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(sys.argv[1:])
        sys.exit(args.handler(args))
        """
    )
    command = [sys.executable, "-c", script, "serve", "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data")]
    environment = {**os.environ, "TUREEN_API_TOKENS": "tok-1,tok-2"}
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output, _ = process.communicate(timeout=30)
            raise AssertionError(f"tureen serve did not start: {output.decode()}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> str:
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    return output.decode()


def test_serve_runs_until_interrupted(tmp_path: Path) -> None:
    process, url = _start_serve(tmp_path)
    try:
        assert httpx.get(f"{url}/v1/methods").status_code == 401
        authorized = {"Authorization": "Bearer tok-2"}
        assert httpx.get(f"{url}/v1/methods", headers=authorized).status_code == 200
    finally:
        log = _stop(process)
    assert "tok-1" not in log and "tok-2" not in log
    assert "Application shutdown complete" in log


def test_the_access_log_keeps_no_query_string_credentials(tmp_path: Path) -> None:
    process, url = _start_serve(tmp_path)
    secrets = ["tok-1", "leaked-secret-a", "leaked-secret-b", "leaked-secret-c"]
    try:
        for query in (
            "?token=tok-1",
            "?access_token=leaked-secret-a&limit=5",
            "?leaked-secret-b",
            "?api_key=x&offset=leaked-secret-c",
        ):
            assert httpx.get(f"{url}/v1/merges{query}").status_code == 401
        authorized = {"Authorization": "Bearer tok-2"}
        assert httpx.get(f"{url}/v1/merges?limit=7", headers=authorized).status_code == 200
    finally:
        log = _stop(process)
    assert not [secret for secret in secrets if secret in log], log
    assert '"GET /v1/merges?*** HTTP/1.1" 401' in log
    assert '"GET /v1/merges?***&limit=5 HTTP/1.1" 401' in log
    assert '"GET /v1/merges?limit=7 HTTP/1.1" 200' in log


def _start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    command += ["--data-dir", str(data_dir)]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TUREEN_")}
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    return process, f"http://127.0.0.1:{port}"


def _wait_ready(process: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)


def test_a_second_server_on_the_same_data_dir_refuses_to_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first, first_url = _start_server(data_dir)
    try:
        _wait_ready(first, first_url)
        second, second_url = _start_server(data_dir)
        try:
            output, _ = second.communicate(timeout=60)
        finally:
            second.kill()  # a second server that did start must not outlive the test
            second.wait()
        message = output.decode()
        assert second.returncode != 0, message
        assert str(data_dir.resolve()) in message
        assert "another tureen server" in message
        assert f"process {first.pid}" in message
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{second_url}/readyz")
        assert httpx.get(f"{first_url}/readyz").status_code == 200
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=30)
    assert first.returncode == 0
    # The lock goes with the server that held it: the data dir can be served again.
    third, third_url = _start_server(data_dir)
    try:
        _wait_ready(third, third_url)
    finally:
        third.send_signal(signal.SIGINT)
        third.communicate(timeout=30)

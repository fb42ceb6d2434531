"""``tureen serve`` on a port another server holds fails at once, in one line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service.listen_check import ListenAddressError, check_can_listen


def test_a_taken_port_fails_before_the_service_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: the address is already in use (another "
        "tureen serve, or another program); stop it, or choose another --port"
    ]
    assert not (tmp_path / "data").exists()  # the service never started


def test_a_free_port_and_an_unknown_host() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_can_listen("127.0.0.1", port)
    with pytest.raises(ListenAddressError, match="check --host"):
        check_can_listen("no-such-host.invalid", port)

"""Whether ``tureen serve`` can listen where it is asked to, checked before the service starts."""

from __future__ import annotations

import errno
import socket

from merge_kernels.errors import TureenError


class ListenAddressError(TureenError):
    """The service cannot listen on its host and port."""

    code = "cannot_listen"


def check_can_listen(host: str, port: int) -> None:
    """Bind ``host:port`` once, as the server will, and release it at once.

    Done before the service starts, so that a port another server holds fails the command
    at once with its reason, instead of after the service has started up.

    Raises:
        ListenAddressError: the address is in use, not this machine's, or not allowed.
    """
    if port == 0:
        return  # any free port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ListenAddressError(
            f"cannot listen on {host}:{port}: {error.strerror}; check --host",
            details={"field": "host"},
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                message = (
                    f"cannot listen on {host}:{port}: the address is already in use (another "
                    "tureen serve, or another program); stop it, or choose another --port"
                )
            else:
                message = (
                    f"cannot listen on {host}:{port}: {error.strerror}; check --host and --port"
                )
            raise ListenAddressError(message, details={"field": "port"}) from None

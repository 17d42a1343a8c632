"""A TCP proxy in front of a real redis-server that loses one reply on request: it forwards the
client's next request that contains given bytes, and when the server answers, closes the client's
connection instead of passing the answer on. Redis applied the command; the client cannot know,
and sends it again: the case a MULTI/EXEC cannot make exactly-once. Or it loses the request
itself (`arm(..., request=True)`): the connection closes and Redis never sees it."""

from __future__ import annotations

import contextlib
import socket
import threading


class ReplyDropper:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._match: bytes | None = None
        self._lose_request = False
        self._lock = threading.Lock()
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def arm(self, match: bytes, request: bool = False) -> None:
        """Loses the reply to the next request (on any connection) that contains `match`, or
        with `request` that request itself."""
        with self._lock:
            self._match, self._lose_request = match, request

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"drop": False}
            for pump in (self._requests, self._replies):
                threading.Thread(target=pump, args=(client, server, state), daemon=True).start()

    def _requests(self, client, server, state) -> None:
        try:
            while data := client.recv(1 << 20):
                with self._lock:
                    if self._match is not None and self._match in data:
                        self._match, state["drop"] = None, True  # before the server can answer
                        if self._lose_request:
                            self.dropped += 1
                            break
                server.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def _replies(self, client, server, state) -> None:
        try:
            while data := server.recv(1 << 20):
                if state["drop"]:
                    with self._lock:
                        self.dropped += 1
                    break
                client.sendall(data)
        except OSError:
            pass
        _close(client, server)


def _close(*sockets) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

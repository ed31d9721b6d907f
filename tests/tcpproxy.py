"""A TCP proxy on loopback that can cut the network: after `cut_after` bytes towards the server
it drops every open connection and refuses new ones until `heal()`; `delay` slows each chunk."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FlakyProxy:
    def __init__(self, target_port: int, cut_after: int | None = None, delay: float = 0.0):
        self.target_port, self.cut_after, self.delay = target_port, cut_after, delay
        self.sent = 0  # bytes forwarded towards the server
        self.down = False
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def heal(self) -> None:
        with self.lock:
            self.down, self.cut_after = False, None

    def close(self) -> None:
        self.listener.close()
        self._drop()

    def _drop(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                if to_server:
                    with self.lock:
                        if self.cut_after is not None and self.sent + len(data) > self.cut_after:
                            data = data[: max(self.cut_after - self.sent, 0)]
                            self.down = True
                        self.sent += len(data)
                    if data:
                        dst.sendall(data)
                    if self.down:
                        self._drop()
                        return
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

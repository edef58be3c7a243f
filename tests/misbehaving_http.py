"""An HTTP server on 127.0.0.1 that serves one file and misbehaves on purpose, counting the
requests it receives, so that tests can prove which failures are retried and how often."""

from __future__ import annotations

import http.server
import socket
import struct
import threading

FAULTS = ("timeout", "http 404", "http 500", "reset mid-file", "short body", "wrong content", "redirect loop")
# Sends half the file, then nothing until the server stops: a download to kill halfway.
STALL_MID_FILE = "stall mid-file"
# Sends the file a byte at a time, one every TRICKLE_SECONDS: never a stall, never an end.
TRICKLE = "trickle"
TRICKLE_SECONDS = 0.05


class MisbehavingServer:
    """Serves `payload` at every path (any query is ignored), except that the first `failures`
    requests (all of them when None) suffer `fault`; `heal()` makes every later request succeed."""

    def __init__(self, payload: bytes, fault: str | None, failures: int | None = None):
        if fault is not None and fault not in (*FAULTS, STALL_MID_FILE, TRICKLE):
            raise ValueError(f"unknown fault {fault!r}")
        self.payload = payload
        self.fault = fault
        self.failures = failures
        self.hits = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"

    def heal(self) -> None:
        with self._lock:
            self.failures = self.hits

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()

    def _next_fault(self) -> str | None:
        with self._lock:
            self.hits += 1
            failing = self.failures is None or self.hits <= self.failures
            return self.fault if failing else None


def _handler_for(server: MisbehavingServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            fault = server._next_fault()
            payload = server.payload
            if fault == "timeout":
                server._stopped.wait(60)  # accepts, then never answers
            elif fault in ("http 404", "http 500"):
                self.send_error(int(fault.split()[1]))
            elif fault == "redirect loop":
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif fault in ("reset mid-file", "short body", STALL_MID_FILE):
                self._send_headers(len(payload))
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                if fault == STALL_MID_FILE:
                    server._stopped.wait(60)
                elif fault == "reset mid-file":
                    # Closing with a zero linger time sends a TCP reset instead of a normal end.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
            elif fault == TRICKLE:
                self._send_headers(len(payload))
                for byte in payload:
                    if server._stopped.wait(TRICKLE_SECONDS):
                        break
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            elif fault == "wrong content":
                wrong = bytes(byte ^ 0xFF for byte in payload[:64]) + payload[64:]
                self._send_headers(len(wrong))
                self.wfile.write(wrong)
            else:
                self._send_headers(len(payload))
                self.wfile.write(payload)

        def _send_headers(self, length: int) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.end_headers()

    return Handler

"""A small IMAP4rev1 server on loopback, enough for a client that logs in, selects a
folder, searches unseen messages, fetches them and marks them seen (RFC 3501)."""

from __future__ import annotations

import re
import socketserver
import threading
from dataclasses import dataclass, field


@dataclass
class ImapState:
    """The folder's messages (uid → bytes), which are seen, and the one account."""

    user: str
    password: str
    messages: dict[int, bytes] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Session(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        state = self.server.state
        self.out(b"* OK IMAP4rev1 test server ready")
        logged_in = False
        while line := self.rfile.readline(65536):
            tag, _, rest = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
            command, _, args = rest.partition(" ")
            command = command.upper()
            if command == "CAPABILITY":
                self.out(b"* CAPABILITY IMAP4rev1")
                self.ok(tag)
            elif command == "LOGIN":
                user, password = (a.strip('"') for a in args.split(" ", 1))
                logged_in = (user, password) == (state.user, state.password)
                if logged_in:
                    self.ok(tag)
                else:
                    self.out(f"{tag} NO [AUTHENTICATIONFAILED] wrong".encode())
            elif not logged_in and command != "LOGOUT":
                self.out(f"{tag} BAD log in first".encode())
            elif command == "SELECT":
                with state.lock:
                    self.out(f"* {len(state.messages)} EXISTS".encode())
                self.out(b"* FLAGS (\\Seen)")
                self.out(f"{tag} OK [READ-WRITE] SELECT completed".encode())
            elif command == "UID":
                self.uid(tag, args)
            elif command == "LOGOUT":
                self.out(b"* BYE")
                self.ok(tag)
                return
            else:
                self.out(f"{tag} BAD unknown command".encode())

    def uid(self, tag: str, args: str) -> None:
        state = self.server.state
        verb, _, rest = args.partition(" ")
        verb = verb.upper()
        with state.lock:
            if verb == "SEARCH":
                unseen = [str(u) for u in sorted(state.messages) if u not in state.seen]
                self.out(("* SEARCH " + " ".join(unseen)).rstrip().encode())
            elif verb == "FETCH":
                uid = int(rest.split(" ", 1)[0])
                data = state.messages[uid]
                self.out(f"* {uid} FETCH (UID {uid} BODY[] {{{len(data)}}}".encode())
                self.wfile.write(data + b")\r\n")
            elif verb == "STORE":
                uid = int(rest.split(" ", 1)[0])
                if re.search(r"\+FLAGS.*\\Seen", rest, re.IGNORECASE):
                    state.seen.add(uid)
                self.out(f"* {uid} FETCH (UID {uid} FLAGS (\\Seen))".encode())
        self.ok(tag)

    def out(self, line: bytes) -> None:
        self.wfile.write(line + b"\r\n")

    def ok(self, tag: str) -> None:
        self.out(f"{tag} OK done".encode())


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, state: ImapState) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _Session)
        state.port = self.server_address[1]


class ImapServer:
    """A running server; a context manager that stops it."""

    def __init__(self, state: ImapState) -> None:
        self.state = state
        self.server = _Server(state)

    def __enter__(self) -> ImapState:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self.state

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

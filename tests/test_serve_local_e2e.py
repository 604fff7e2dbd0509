"""`python -m serve.local` as a user runs it: nothing it starts listens beyond loopback, and
SIGTERM leaves no Ray process, port or temp dir behind (the temp dir honours RAY_TMPDIR)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from serve.local import descendants, free_port, processes_using, stop_processes
from tests.e2e import make_dense_and_pruned, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _address(hex_address: str, ipv6: bool) -> str:
    raw = bytes.fromhex(hex_address)
    if not ipv6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # /proc prints each 32-bit word host-endian
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_sockets() -> dict[int, tuple[str, str, int]]:
    """inode -> (protocol, address, port) of every listening TCP socket and bound UDP socket."""
    found = {}
    for protocol in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{protocol}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if (protocol.startswith("tcp") and state != "0A") or inode == 0:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            found[inode] = (protocol, _address(address, protocol.endswith("6")), int(port, 16))
    return found


def sockets_of(pids: list[int]) -> dict[int, list[tuple[str, str, int]]]:
    listening, owned = listening_sockets(), {}
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes = [int(link[8:-1]) for link in links if link.startswith("socket:[")]
        owned[pid] = [listening[i] for i in inodes if i in listening]
    return owned


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombies have exited
    except OSError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_serve_local_listens_on_loopback_only_and_stops_clean(tmp_path):
    _, pruned = make_dense_and_pruned(tmp_path)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port, metrics_port = free_port(), free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "serve.local", "--pruned", pruned, "--port", str(port), "--metrics-port",
         str(metrics_port), "--max-tokens", "8"], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp)}, cwd=Path(__file__).resolve().parents[1])
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(healthy, 600, "serve.local to answer /healthz")
        request = urllib.request.Request(base + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": "sinkserve", "prompt": "Hi", "max_tokens": 4,
                                                          "steps": 4}).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
        sessions = list(ray_tmp.iterdir())
        assert len(sessions) == 1 and sessions[0].name.startswith("sinkserve-")  # Ray's files went to RAY_TMPDIR
        ours = sorted({server.pid, *descendants(server.pid), *processes_using(sessions[0])})
        owned = sockets_of(ours)
        bound = [s for sockets in owned.values() for s in sockets]
        ports = {p for _, _, p in bound}
        assert {port, metrics_port} <= ports, owned  # the check sees the sockets that matter
        assert len([pid for pid, sockets in owned.items() if sockets]) >= 4  # GCS, raylet, replicas, ...
        exposed = {pid: [s for s in sockets if s[1] not in LOOPBACK] for pid, sockets in owned.items()}
        assert not any(exposed.values()), f"listening beyond loopback: {exposed}"

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        wait_until(lambda: not any(alive(pid) for pid in ours), 30, "every Ray process to exit")
        assert not list(ray_tmp.iterdir()), "the Ray temp dir was left behind"
        assert not port_open(port) and not port_open(metrics_port)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
        for leftover in ray_tmp.glob("sinkserve-*"):
            stop_processes(processes_using(leftover))
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)

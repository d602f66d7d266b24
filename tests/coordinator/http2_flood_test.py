"""HTTP/2 floods from a client without a certificate (issue #34, row 4), with a real HTTP/2 client (h2).

Starts a real coordinator on loopback and, while sampling its resident memory every 50 ms:
  1. half-open streams: 4 connections each open 20,000 streams (HEADERS, never the message, never a
     reset), ignoring the server's SETTINGS_MAX_CONCURRENT_STREAMS. Before the per-connection limit the
     coordinator held them all (0.95 GB from 23 MiB); now each connection is closed once it passes 32.
  2. rapid reset (CVE-2023-44487): 4 connections each open and at once reset 25,000 streams (before:
     1.68 GB at the peak; now under 100 MiB).
Each must leave the coordinator's memory within 256 MiB of where it started, and an operator's call
must still be answered afterwards. Then the limit is the operator's: with `"streams-per-connection": 8`
in --config a connection with 20 half-open streams is closed (with the default 32 it is not), and
--streams-per-connection 0 is refused with exit code 2, as are limits in --config that are not
whole numbers from 1 to 2^20.
Usage: http2_flood_test.py FLEXFED_COORDINATOR FLEXFEDCTL
"""
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import h2.config
import h2.connection
import h2.errors
import h2.events

BOUND_MIB = 256
HEADERS = [(":method", "POST"), (":scheme", "https"), (":path", "/flexfed.v1.Owner/GetAnchor"),
           (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")]


class Unlimited(h2.connection.H2Connection):
    """A client that ignores the server's stream limit, as an attacker would."""
    open_outbound_streams = property(lambda self: 0)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def connect(port, ca):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False  # the attacker does not care who answers
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    conn = Unlimited(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    # The server's SETTINGS, acknowledged: from here its stream limit holds for this connection.
    settings = False
    while not settings:
        data = tls.recv(1 << 16)
        if not data:
            raise ConnectionError("closed before its SETTINGS")
        settings = any(isinstance(e, h2.events.RemoteSettingsChanged) for e in conn.receive_data(data))
    tls.sendall(conn.data_to_send())
    return tls, conn


def drain(tls, conn, outcome):
    """Reads what has arrived; False once the server closed the connection or sent GOAWAY."""
    tls.setblocking(False)
    try:
        while True:
            try:
                data = tls.recv(1 << 20)
            except (ssl.SSLWantReadError, BlockingIOError):
                return True
            if not data:
                outcome["closed"] += 1
                return False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    outcome["goaway"] += 1
                    return False
            tls.sendall(conn.data_to_send())
    except (ssl.SSLError, OSError):
        outcome["closed"] += 1
        return False
    finally:
        tls.setblocking(True)


def flood(port, ca, streams, reset, outcome):
    try:
        tls, conn = connect(port, ca)
        sent, open_ = 0, True
        while sent < streams:
            for _ in range(200):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, HEADERS)
                if reset:
                    conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                sent += 1
            tls.sendall(conn.data_to_send())
            if not drain(tls, conn, outcome):
                open_ = False
                break
        outcome["sent"] += sent
        if open_ and not reset:  # give the server the time to refuse what it has read
            deadline = time.time() + 10
            while time.time() < deadline and drain(tls, conn, outcome):
                time.sleep(0.1)
        tls.close()
    except (ssl.SSLError, OSError):
        outcome["closed"] += 1


def half_open_closes(port, ca, streams):
    """Whether the server closes a connection that opens `streams` half-open streams (within 3 s)."""
    outcome = {"sent": 0, "closed": 0, "goaway": 0}
    tls, conn = connect(port, ca)
    for _ in range(streams):
        conn.send_headers(conn.get_next_available_stream_id(), HEADERS)
    tls.sendall(conn.data_to_send())
    deadline = time.time() + 3
    while time.time() < deadline and drain(tls, conn, outcome):
        time.sleep(0.1)
    tls.close()
    return outcome["closed"] + outcome["goaway"] > 0


def start(coordinator, work, name, *flags):
    """A coordinator on loopback with its own data folder; returns (process, port)."""
    log = open(f"{work}/{name}.log", "w")
    server = subprocess.Popen([coordinator, "--ca-dir", f"{work}/ca", "--data-dir", f"{work}/{name}", "--listen",
                               "127.0.0.1:0", "--metrics-listen", "", "--port-file", f"{work}/{name}.port", *flags],
                              stderr=log)
    for _ in range(100):
        if os.path.exists(f"{work}/{name}.port") and open(f"{work}/{name}.port").read().strip():
            break
        if server.poll() is not None:
            sys.exit(f"the coordinator ({' '.join(flags)}) exited with {server.returncode}: "
                     f"{open(f'{work}/{name}.log').read().strip()}")
        time.sleep(0.1)
    return server, int(open(f"{work}/{name}.port").readline())


def main():
    coordinator, ctl = sys.argv[1], sys.argv[2]
    failures = []
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([ctl, "ca", "init", "--dir", f"{work}/ca"], check=True, stdout=subprocess.DEVNULL)
        server, port = start(coordinator, work, "data")
        try:
            env = dict(os.environ, FLEXFED_COORDINATOR=f"127.0.0.1:{port}", FLEXFED_IDENTITY=f"{work}/ca/admin")
            status = lambda: subprocess.run([ctl, "status"], env=env, stdout=subprocess.DEVNULL, timeout=60).returncode
            if status() != 0:
                sys.exit("the coordinator does not answer before any flood")
            base = rss_kib(server.pid)
            for name, streams, reset in (("half-open streams", 20000, False), ("rapid reset", 25000, True)):
                peak = [base]
                done = threading.Event()

                def sample():
                    while not done.is_set():
                        peak[0] = max(peak[0], rss_kib(server.pid))
                        time.sleep(0.05)

                sampler = threading.Thread(target=sample)
                sampler.start()
                outcome = {"sent": 0, "closed": 0, "goaway": 0}
                attackers = [threading.Thread(target=flood, args=(port, f"{work}/ca/ca.crt", streams, reset, outcome))
                             for _ in range(4)]
                t0 = time.time()
                for a in attackers:
                    a.start()
                for a in attackers:
                    a.join()
                done.set()
                sampler.join()
                grown = (peak[0] - base) / 1024
                print(f"{name}: {outcome['sent']} streams in {time.time() - t0:.1f} s, {outcome['closed']} connections "
                      f"closed, {outcome['goaway']} GOAWAY; coordinator {base / 1024:.0f} MiB -> peak {peak[0] / 1024:.0f} MiB")
                if grown > BOUND_MIB:
                    failures.append(f"{name}: the coordinator grew by {grown:.0f} MiB (bound {BOUND_MIB} MiB)")
                if not reset and outcome["closed"] + outcome["goaway"] < 4:
                    failures.append(f"{name}: a connection past the stream limit was left open")
                if server.poll() is not None:
                    sys.exit(f"{name}: the coordinator exited with {server.returncode}")
                if status() != 0:
                    failures.append(f"{name}: the coordinator no longer answers an operator")
            ca = f"{work}/ca/ca.crt"
            if half_open_closes(port, ca, 20):
                failures.append("20 half-open streams closed a connection under the default limit of 32")
            with open(f"{work}/limits.json", "w") as f:
                f.write('{"streams-per-connection": 8}')
            limited, limited_port = start(coordinator, work, "limited", "--config", f"{work}/limits.json")
            try:
                if not half_open_closes(limited_port, ca, 20):
                    failures.append("with streams-per-connection 8 in --config, 20 half-open streams kept their connection")
            finally:
                limited.terminate()
                limited.wait(timeout=30)
            bad = subprocess.run([coordinator, "--ca-dir", f"{work}/ca", "--data-dir", f"{work}/bad",
                                  "--streams-per-connection", "0"], capture_output=True, text=True, timeout=60)
            if bad.returncode != 2 or "streams-per-connection" not in bad.stderr:
                failures.append(f"--streams-per-connection 0: exit {bad.returncode}, {bad.stderr.strip()!r}")
            for setting in ('0', '8.5', '"8"', '2097152'):
                with open(f"{work}/bad.json", "w") as f:
                    f.write('{"streams-per-caller": %s}' % setting)
                bad = subprocess.run([coordinator, "--ca-dir", f"{work}/ca", "--data-dir", f"{work}/bad", "--config",
                                      f"{work}/bad.json"], capture_output=True, text=True, timeout=60)
                if bad.returncode == 0 or "must be a whole number from 1 to 1048576" not in bad.stderr:
                    failures.append(f"streams-per-caller {setting} in --config: exit {bad.returncode}, {bad.stderr.strip()!r}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""Raw TLS throughput on loopback: the baseline for bench/run_transfer_bench.sh. One client sends
SIZE MiB to one server over TLS 1.3 with the coordinator's own certificates (ECDSA P-256), plain
socket reads and writes in 4 MiB pieces; prints {"raw_tls_mib_s": ...}."""
import json
import socket
import ssl
import sys
import threading
import time

cert, key, ca, size_mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_ctx.load_cert_chain(cert, key)
client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client_ctx.load_verify_locations(ca)
client_ctx.check_hostname = False
listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
received = [0]


def serve():
    conn, _ = listener.accept()
    with server_ctx.wrap_socket(conn, server_side=True) as tls:
        while received[0] < size_mib << 20:
            try:
                data = tls.recv(4 << 20)
            except (ssl.SSLError, OSError):
                break
            if not data:
                break
            received[0] += len(data)


thread = threading.Thread(target=serve)
thread.start()
block = bytes(range(256)) * (4 << 12)  # 4 MiB
with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as tls:
    start = time.perf_counter()
    for _ in range(size_mib // 4):
        tls.sendall(block)
    thread.join()
elapsed = time.perf_counter() - start
print(json.dumps({"raw_tls_mib_s": received[0] / (1 << 20) / elapsed, "bytes": received[0]}))

"""Send raw bytes to a TCP server and report how it reacted, as JSON.

  tcp_probe.py HOST PORT PAYLOAD_HEX TIMEOUT

Reports whether the connection was accepted, whether the peer closed it
(EOF or reset) within TIMEOUT seconds, and what it sent back meanwhile.
"""

import json
import socket
import sys
import time


def probe(host, port, payload, timeout):
    result = {"connected": False, "closed": False, "reset": False, "received_hex": "", "elapsed": None}
    start = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        result["error"] = str(e)
        return result
    result["connected"] = True
    received = b""
    with sock:
        try:
            sock.sendall(payload)
            deadline = start + timeout
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    result["closed"] = True
                    break
                received += chunk
        except socket.timeout:
            pass
        except (ConnectionResetError, BrokenPipeError):
            result["closed"] = result["reset"] = True
    result["received_hex"] = received.hex()
    result["elapsed"] = round(time.monotonic() - start, 3)
    return result


if __name__ == "__main__":
    host, port, payload_hex, timeout = sys.argv[1:5]
    print(json.dumps(probe(host, int(port), bytes.fromhex(payload_hex), float(timeout))))

"""An adversarial HTTP/1.1 client: what a client trying to go uncounted or unidentified can do
with an ordinary socket, and with a raw one.

Usage: evasion_client.py SPEC_JSON | @SPEC_FILE

SPEC: {"host": "127.0.0.1" or "::1", "port": N, "hold": bool, "dstopts": bool,
       "ip_options": bool, "requests": [REQUEST, ...]}
  dstopts: every packet the client sends carries an IPv6 destination-options header.
  ip_options: every packet the client sends carries 40 bytes of IPv4 options (the most an IPv4
  header holds).
REQUEST: {"pieces": [TEXT, ...], "forge": FORGE?, "answers": N?, "continue_after": K?,
          "times": T?, "then_closed": bool?}
  pieces are sent one write each on a TCP_NODELAY socket, each after the previous one has left
  (the socket's send queue is empty and a moment has passed), so every piece is its own TCP
  segment; TEXT is latin-1 (bytes 0-255). Then N responses (default 1: pieces holding several
  requests are pipelined) are read in full (Content-Length). With continue_after, the client
  reads the server's interim `100 Continue` after the first K pieces before it sends the rest
  (`Expect: 100-continue`). With times, each piece is its text T times over (one write).
  With then_closed, the server closes the connection after those responses: the client reads
  to the end of the stream (the last request).
FORGE: {"seq_offset": N, "ack_offset": N, "payload": TEXT}
  before the request, a segment is injected through a raw socket on the connection's 4-tuple:
  sequence number = the client's next one + seq_offset, acknowledgment = the server's next one
  + ack_offset. TCP drops it (out of its window, or acknowledging data never sent): the sensor
  must count none of it. The handshake is sniffed on loopback to learn both initial sequence
  numbers.

Prints one JSON line: {"local_port", "sent", "received", "requests", "segments"} (bytes the
client sent and received, requests answered, data segments written), then, with "hold",
keeps the connection open until stdin closes.
"""

import json
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
IPV6_DSTOPTS = 59
TIOCOUTQ = 0x5411


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(src, dst, sport, dport, seq, ack, payload):
    """A TCP segment (header and payload) with PSH|ACK and a correct checksum."""
    header = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                         5 << 4, 0x18, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(
        "!BBH", 0, socket.IPPROTO_TCP, len(header) + len(payload))
    csum = checksum(pseudo + header + payload)
    return header[:16] + struct.pack("!H", csum) + header[18:] + payload


def handshake_isns(sniffer, client_port, server_port, deadline):
    """(client ISN, server ISN) from the SYN and SYN-ACK seen on loopback."""
    client_isn = server_isn = None
    while (client_isn is None or server_isn is None) and time.time() < deadline:
        ready, _, _ = select.select([sniffer], [], [], 0.2)
        if not ready:
            continue
        frame = sniffer.recv(65535)
        ip = frame[14:]
        if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
            continue
        tcp = ip[(ip[0] & 0x0F) * 4:]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        flags = tcp[13]
        if flags & 0x02 and not flags & 0x10 and (sport, dport) == (client_port, server_port):
            client_isn = seq
        if flags & 0x12 == 0x12 and (sport, dport) == (server_port, client_port):
            server_isn = seq
    if client_isn is None or server_isn is None:
        raise SystemExit("handshake not seen on loopback")
    return client_isn, server_isn


def send_piece(sock, data):
    """Sends `data` as its own segment: waits until everything before it has left the socket."""
    deadline = time.time() + 5
    while time.time() < deadline:
        pending = struct.unpack("i", __import__("fcntl").ioctl(sock, TIOCOUTQ, b"\0" * 4))[0]
        if pending == 0:
            break
        time.sleep(0.001)
    time.sleep(0.002)
    sock.sendall(data)


def read_interim(sock, buf):
    """Reads one interim (1xx) response head; returns (bytes read for it, rest)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed before the interim response")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 100"):
        raise SystemExit("expected 100 Continue, got %r" % head[:40])
    return len(head) + 4, rest


def read_response(sock, buf):
    """Reads one response with a Content-Length body; returns (bytes read for it, rest)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed before the response head")
        buf += chunk
    head, _, _ = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    total = len(head) + 4 + length
    while len(buf) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed inside the response body")
        buf += chunk
    return total, buf[total:]


def main():
    arg = sys.argv[1]
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            arg = f.read()
    spec = json.loads(arg)
    host, port = spec["host"], spec["port"]
    forging = any("forge" in r for r in spec["requests"])
    sniffer = None
    if forging:
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sniffer.bind(("lo", 0))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if spec.get("dstopts"):
        # An IPv6 destination-options header (PadN, 8 bytes) on every packet the client sends.
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
    if spec.get("ip_options"):
        # 39 NOPs and an end-of-options: a 60-byte IPv4 header on every packet the client sends.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([1] * 39 + [0]))
    sock.bind((host, 0))
    client_port = sock.getsockname()[1]
    sock.connect((host, port))
    client_isn = server_isn = None
    if forging:
        client_isn, server_isn = handshake_isns(sniffer, client_port, port, time.time() + 5)
        sniffer.close()
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    sent = received = answered = segments = 0
    rest = b""
    for request in spec["requests"]:
        forge = request.get("forge")
        if forge:
            payload = forge["payload"].encode("latin-1")
            segment = tcp_segment(host, host, client_port, port,
                                  client_isn + 1 + sent + forge["seq_offset"],
                                  server_isn + 1 + received + forge["ack_offset"], payload)
            raw.sendto(segment, (host, 0))
        for k, piece in enumerate(request["pieces"]):
            if k > 0 and k == request.get("continue_after"):
                n, rest = read_interim(sock, rest)
                received += n
            data = piece.encode("latin-1") * request.get("times", 1)
            send_piece(sock, data)
            sent += len(data)
            segments += 1
        for _ in range(request.get("answers", 1)):
            n, rest = read_response(sock, rest)
            received += n
            answered += 1
        if request.get("then_closed"):
            received += len(rest)
            rest = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
    print(json.dumps({"local_port": client_port, "sent": sent, "received": received,
                      "requests": answered, "segments": segments}), flush=True)
    if spec.get("hold"):
        sys.stdin.read()
    sock.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Idle check: N logged-in idle iSCSI sessions, target CPU% of one core over a window.

  idle.py --iqn IQN --target NAME:PID:PORT [--target ...] [--sessions 100] [--window 10]
          [--out idle.json]

Each session is a raw TCP connection with a full-feature login (one Login Request,
CSG=1 -> NSG=3, T=1; continued if the target answers T=0). Then the sockets are only held;
NOP-In pings (ITT 0xffffffff) are answered with a NOP-Out echoing the TTT. CPU% comes from
/proc/PID/stat (utime+stime, clock ticks) and, finer, the sum of /proc/PID/task/*/schedstat.
Targets are checked one after the other; exit status 1 if any is >= --bar percent.
"""
import argparse
import glob
import json
import os
import selectors
import socket
import struct
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
INITIATOR = "iqn.2026-11.io.iscsi-tgt.bench:idle"


def die(msg):
    print(f"idle.py: ERROR: {msg}", file=sys.stderr)
    sys.exit(2)


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def sched_ns(pid):
    total = 0
    for p in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(p) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the target")
        buf += chunk
    return buf


def recv_pdu(sock):
    bhs = recv_exact(sock, 48)
    ahs = bhs[4] * 4
    dsl = int.from_bytes(bhs[5:8], "big")
    rest = recv_exact(sock, ahs + ((dsl + 3) & ~3))
    return bhs, rest[ahs:ahs + dsl]


def kv(data):
    out = {}
    for item in data.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out[k.decode()] = v.decode()
    return out


class Session:
    def __init__(self, port, iqn, idx, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        isid = bytes([0x80, 0, 0, 0, (idx >> 8) & 0xFF, idx & 0xFF])
        keys = {"InitiatorName": INITIATOR, "TargetName": iqn, "SessionType": "Normal",
                "HeaderDigest": "None", "DataDigest": "None"}
        itt, cmdsn, expstatsn = idx + 1, 1, 0
        for _ in range(8):  # a few rounds at most if the target wants to keep negotiating
            data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
            bhs = bytearray(48)
            bhs[0] = 0x43
            bhs[1] = 0x87  # T=1, CSG=1 (operational), NSG=3 (full feature)
            bhs[5:8] = len(data).to_bytes(3, "big")
            bhs[8:14] = isid
            struct.pack_into(">IHxxII", bhs, 16, itt, 0, cmdsn, expstatsn)
            self.sock.sendall(bytes(bhs) + data + b"\0" * (-len(data) % 4))
            rb, rdata = recv_pdu(self.sock)
            if rb[0] & 0x3F != 0x23:
                raise ConnectionError(f"expected a Login Response, got opcode 0x{rb[0] & 0x3F:02x}")
            if rb[36] != 0:
                raise ConnectionError(f"login rejected: status class {rb[36]} detail {rb[37]} "
                                      f"{kv(rdata)}")
            self.statsn = struct.unpack_from(">I", rb, 24)[0]
            self.cmdsn = struct.unpack_from(">I", rb, 28)[0]  # ExpCmdSN
            expstatsn = (self.statsn + 1) & 0xFFFFFFFF
            if rb[1] & 0x80 and rb[1] & 0x03 == 3:
                break
            keys = {}  # T=0: answer with an empty request until the target transits
        else:
            raise ConnectionError("login did not reach full-feature phase")
        self.sock.settimeout(None)
        self.sock.setblocking(False)
        self.nops = 0
        self.buf = b""

    def on_readable(self):
        """Drain the socket; answer NOP-In pings."""
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        if not chunk:
            raise ConnectionError("target closed an idle session")
        self.buf += chunk
        while len(self.buf) >= 48:
            ahs = self.buf[4] * 4
            dsl = int.from_bytes(self.buf[5:8], "big")
            total = 48 + ahs + ((dsl + 3) & ~3)
            if len(self.buf) < total:
                return
            bhs, self.buf = self.buf[:48], self.buf[total:]
            op = bhs[0] & 0x3F
            if op == 0x20:  # NOP-In
                ttt = bhs[20:24]
                statsn = struct.unpack_from(">I", bhs, 24)[0]
                if ttt != b"\xff\xff\xff\xff":
                    out = bytearray(48)
                    out[0] = 0x40  # immediate NOP-Out
                    out[1] = 0x80
                    out[8:16] = bhs[8:16]  # LUN
                    out[16:20] = b"\xff\xff\xff\xff"
                    out[20:24] = ttt
                    struct.pack_into(">II", out, 24, self.cmdsn, statsn)
                    self.sock.setblocking(True)
                    self.sock.sendall(bytes(out))
                    self.sock.setblocking(False)
                    self.nops += 1
            elif op == 0x32 or op == 0x3F:  # Async message / reject: note it
                print(f"idle.py: note: target sent opcode 0x{op:02x}", file=sys.stderr)


def measure(name, pid, port, iqn, n, window):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        die(f"{name}: pid {pid} not running")
    sessions = []
    t0 = time.time()
    try:
        for i in range(n):
            sessions.append(Session(port, iqn, i))
    except (OSError, ConnectionError) as e:
        die(f"{name}: session {len(sessions) + 1}/{n} login failed: {e}")
    print(f"  {name}: {n} sessions logged in ({time.time() - t0:.1f} s); idle {window} s ...",
          file=sys.stderr)
    sel = selectors.DefaultSelector()
    for s in sessions:
        sel.register(s.sock, selectors.EVENT_READ, s)

    def pump(seconds):
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for key, _ in sel.select(timeout=left):
                try:
                    key.data.on_readable()
                except (OSError, ConnectionError) as e:
                    die(f"{name}: {e}")

    pump(1.0)  # settle: let login-related work finish
    c0, s0, w0 = cpu_ticks(pid), sched_ns(pid), time.monotonic()
    pump(window)
    c1, s1, w1 = cpu_ticks(pid), sched_ns(pid), time.monotonic()
    nops = sum(s.nops for s in sessions)
    for s in sessions:
        sel.unregister(s.sock)
        s.sock.close()
    wall = w1 - w0
    r = dict(name=name, sessions=n, window_s=wall,
             cpu_pct=100.0 * (c1 - c0) / CLK_TCK / wall,
             cpu_pct_schedstat=100.0 * (s1 - s0) / 1e9 / wall, nops=nops)
    print(f"  {name}: CPU {r['cpu_pct']:.2f} % (stat), {r['cpu_pct_schedstat']:.2f} % "
          f"(schedstat) of one core over {wall:.1f} s; {nops} NOP-In answered", file=sys.stderr)
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iqn", required=True)
    p.add_argument("--target", action="append", required=True, help="NAME:PID:PORT")
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--bar", type=float, default=2.0)
    p.add_argument("--out")
    a = p.parse_args()
    results = []
    for t in a.target:
        name, pid, port = t.split(":")
        results.append(measure(name, int(pid), int(port), a.iqn, a.sessions, a.window))
        time.sleep(1)
    out = dict(sessions=a.sessions, window_s=a.window, bar_pct=a.bar, results=results)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)
    bad = [r["name"] for r in results if r["cpu_pct"] >= a.bar]
    if bad:
        print(f"idle.py: FAIL: {', '.join(bad)} above {a.bar} % CPU while idle", file=sys.stderr)
        sys.exit(1)
    print(f"idle.py: PASS: every target below {a.bar} % CPU with {a.sessions} idle sessions",
          file=sys.stderr)


if __name__ == "__main__":
    main()

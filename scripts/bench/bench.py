#!/usr/bin/env python3
"""fio matrix runner and report writer for scripts/bench/run.sh.

  bench.py run    --fio FIO --targets tgtd:PID:PORT:LUN ours:PID:PORT:LUN --iqn IQN
                  --runtime S --reps N --fio-cpu C --out RAW.json [--meta k=v ...]
  bench.py report --raw RAW.json --md OUT.md --json OUT.json --png OUT.png [--idle IDLE.json]

Each case runs against every target alternately (the order flips every repetition), fio
pinned to --fio-cpu, JSON output. Per run: IOPS, MB/s, mean and p99 completion latency,
and the target's CPU time (utime+stime of all its threads, /proc/PID/stat fields 14+15)
per completed I/O.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")

# name, description, fio options
CASES = [
    ("randread-4k-qd1", "4K random read, QD1", dict(rw="randread", bs="4k", iodepth=1, numjobs=1)),
    ("randread-4k-qd32", "4K random read, QD32", dict(rw="randread", bs="4k", iodepth=32, numjobs=1)),
    ("randwrite-4k-qd1", "4K random write, QD1", dict(rw="randwrite", bs="4k", iodepth=1, numjobs=1)),
    ("randwrite-4k-qd32", "4K random write, QD32", dict(rw="randwrite", bs="4k", iodepth=32, numjobs=1)),
    ("read-128k-qd8", "128K seq read, QD8", dict(rw="read", bs="128k", iodepth=8, numjobs=1)),
    ("write-128k-qd8", "128K seq write, QD8", dict(rw="write", bs="128k", iodepth=8, numjobs=1)),
    ("randread-4k-qd8-1s", "4K rand read, 1 session x QD8", dict(rw="randread", bs="4k", iodepth=8, numjobs=1)),
    ("randread-4k-qd8-2s", "4K rand read, 2 sessions x QD8", dict(rw="randread", bs="4k", iodepth=8, numjobs=2)),
    ("randread-4k-qd8-4s", "4K rand read, 4 sessions x QD8", dict(rw="randread", bs="4k", iodepth=8, numjobs=4)),
    ("randread-4k-qd8-8s", "4K rand read, 8 sessions x QD8", dict(rw="randread", bs="4k", iodepth=8, numjobs=8)),
]

METRICS = [
    # key, label, unit, higher_is_better
    ("iops", "IOPS", "", True),
    ("mbps", "MB/s", "", True),
    ("lat_mean_us", "mean lat", "µs", False),
    ("lat_p99_us", "p99 lat", "µs", False),
    ("cpu_us_per_io", "CPU/IO", "µs", False),
]


def die(msg):
    print(f"bench.py: ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


def cpu_ticks(pid):
    """utime + stime (clock ticks) of the whole process, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return int(fields[11]) + int(fields[12])  # fields 14 and 15


def alive(pid):
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return st[st.rindex(")") + 2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def iscsi_url(port, iqn, lun, host="127.0.0.1"):
    return "iscsi\\://%s\\:%d/%s/%d" % (host, port, iqn.replace(":", "\\:"), lun)


NETNS = None  # run fio inside this network namespace (transports benchmark)


def fio_cmd(fio, cpu, name, url, opts, runtime, outfile, extra=()):
    pre = ["ip", "netns", "exec", NETNS] if NETNS else []
    cmd = pre + ["taskset", "-c", str(cpu), fio, f"--name={name}", "--ioengine=libiscsi",
           f"--filename={url}", f"--rw={opts['rw']}", f"--bs={opts['bs']}",
           f"--iodepth={opts['iodepth']}", f"--numjobs={opts['numjobs']}",
           "--group_reporting", "--output-format=json", f"--output={outfile}"]
    if runtime is not None:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if opts["rw"].startswith("rand"):
        cmd += ["--norandommap", "--randrepeat=0"]
    return cmd + list(extra)


CURRENT_FIO = None


def descendants(pid):
    """Pids of all descendants of pid (fio's job processes call setsid(), so a process
    group kill does not reach them)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                children.setdefault(int(st[st.rindex(")") + 2:].split()[1]), []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid):
    """SIGKILL pid's descendants first (before they are re-parented), then pid's group."""
    for c in descendants(pid):
        try:
            os.kill(c, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_current_fio():
    if CURRENT_FIO is not None and CURRENT_FIO.returncode is None:
        kill_tree(CURRENT_FIO.pid)


def on_signal(signum, _frame):
    kill_current_fio()
    print(f"bench.py: interrupted by signal {signum}", file=sys.stderr)
    os._exit(128 + signum)


def run_fio(cmd, timeout, what):
    global CURRENT_FIO
    # Own session, so a terminal's Ctrl-C reaches us, not fio; on a timeout or a signal
    # (on_signal) we kill fio and its job processes ourselves.
    p = CURRENT_FIO = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        p.communicate()
        die(f"{what}: fio did not finish within {timeout} s (killed): {' '.join(cmd)}")
    except BaseException:
        kill_tree(p.pid)
        raise
    if p.returncode != 0:
        die(f"{what}: fio exited {p.returncode}: {' '.join(cmd)}\n{err.strip()}\n{out.strip()}")
    return p


def load_fio_json(path, what):
    try:
        with open(path) as f:
            s = f.read()
        return json.loads(s[s.index("{"):])  # fio may print notes before the JSON
    except (OSError, ValueError) as e:
        die(f"{what}: cannot parse fio JSON {path}: {e}")


def parse(d, rw, what):
    jobs = d.get("jobs") or []
    if not jobs:
        die(f"{what}: no jobs in fio output")
    # --group_reporting gives one entry; sum/average across entries anyway.
    direction = "write" if "write" in rw else "read"
    iops = bw = ios = 0
    means, p99s, weights = [], [], []
    for j in jobs:
        if j.get("error"):
            die(f"{what}: fio job error {j['error']}")
        s = j[direction]
        iops += s["iops"]
        bw += s["bw_bytes"]
        ios += s["total_ios"]
        means.append(s["clat_ns"]["mean"])
        p99s.append(s["clat_ns"].get("percentile", {}).get("99.000000", 0))
        weights.append(max(s["total_ios"], 1))
    if ios == 0:
        die(f"{what}: fio completed no I/O")
    w = sum(weights)
    return dict(
        iops=iops,
        mbps=bw / 1e6,
        lat_mean_us=sum(m * k for m, k in zip(means, weights)) / w / 1000,
        lat_p99_us=max(p99s) / 1000,
        ios=ios,
    )


def cmd_run(a):
    global NETNS
    NETNS = a.netns
    targets = []
    for t in a.targets:
        # name:pid:port:lun[:host]
        name, pid, port, lun, *host = t.split(":")
        targets.append(dict(name=name, pid=int(pid), port=int(port), lun=int(lun),
                            host=host[0] if host else "127.0.0.1"))
    tmp = tempfile.mkdtemp(prefix="fio-", dir=a.workdir)
    timeout = a.runtime + 60
    raw = dict(meta=dict(kv.split("=", 1) for kv in a.meta), runtime=a.runtime, reps=a.reps,
               targets=[t["name"] for t in targets], cases=[])

    # Warm-up: write every LUN once, sequential 1M, so no run pays first-touch costs.
    for t in targets:
        what = f"prewrite {t['name']}"
        out = os.path.join(tmp, f"prewrite-{t['name']}.json")
        cmd = fio_cmd(a.fio, a.fio_cpu, "prewrite", iscsi_url(t["port"], a.iqn, t["lun"], t["host"]),
                      dict(rw="write", bs="1M", iodepth=8, numjobs=1), None, out)
        t0 = time.time()
        run_fio(cmd, 300, what)
        r = parse(load_fio_json(out, what), "write", what)
        print(f"  {what}: {r['ios']} x 1M in {time.time() - t0:.1f} s", file=sys.stderr)
        if not alive(t["pid"]):
            die(f"{t['name']} (pid {t['pid']}) died during the pre-write")

    cases = CASES
    if a.only:
        cases = [c for c in CASES if c[0] in a.only.split(",")]
    for name, desc, opts in cases:
        raw["cases"].append(dict(name=name, desc=desc, opts=opts,
                                 fio_cmd=" ".join(fio_cmd("fio", a.fio_cpu, name, "URL", opts,
                                                          a.runtime, "OUT.json")),
                                 runs={t["name"]: [] for t in targets}))
    total = len(cases) * len(targets) * a.reps
    n = 0
    for rep in range(a.reps):
        order = targets if rep % 2 == 0 else list(reversed(targets))
        for case in raw["cases"]:
            for t in order:
                n += 1
                what = f"[{n}/{total}] rep {rep + 1} {case['name']} {t['name']}"
                if not alive(t["pid"]):
                    die(f"{what}: target {t['name']} (pid {t['pid']}) is not running")
                out = os.path.join(tmp, f"{case['name']}-{t['name']}-{rep}.json")
                cmd = fio_cmd(a.fio, a.fio_cpu, case["name"],
                              iscsi_url(t["port"], a.iqn, t["lun"], t["host"]), case["opts"],
                              a.runtime, out)
                c0 = cpu_ticks(t["pid"])
                run_fio(cmd, timeout, what)
                c1 = cpu_ticks(t["pid"])
                if not alive(t["pid"]):
                    die(f"{what}: target {t['name']} died during the run")
                r = parse(load_fio_json(out, what), case["opts"]["rw"], what)
                r["cpu_s"] = (c1 - c0) / CLK_TCK
                r["cpu_us_per_io"] = r["cpu_s"] * 1e6 / r["ios"]
                r["rep"] = rep
                case["runs"][t["name"]].append(r)
                print(f"  {what}: {r['iops']:.0f} IOPS {r['mbps']:.1f} MB/s mean "
                      f"{r['lat_mean_us']:.1f} µs p99 {r['lat_p99_us']:.1f} µs "
                      f"cpu {r['cpu_us_per_io']:.2f} µs/IO", file=sys.stderr)
    for case in raw["cases"]:
        case["median"] = {tn: {k: statistics.median(r[k] for r in runs)
                               for k in ("iops", "mbps", "lat_mean_us", "lat_p99_us",
                                         "cpu_us_per_io")}
                          for tn, runs in case["runs"].items()}
    with open(a.out, "w") as f:
        json.dump(raw, f, indent=2)


def fmt(v):
    if v >= 100000:
        return f"{v / 1000:.0f}k"
    if v >= 10000:
        return f"{v / 1000:.1f}k"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cmd_report(a):
    with open(a.raw) as f:
        raw = json.load(f)
    idle = raw.pop("idle", None)  # a results.json can be re-rendered
    if a.idle and os.path.exists(a.idle):
        with open(a.idle) as f:
            idle = json.load(f)
    meta = raw["meta"]
    for case in raw["cases"]:
        m = case["median"]
        case["ratio"] = {k: (m["ours"][k] / m["tgtd"][k] if m["tgtd"][k] else None)
                         for k, *_ in METRICS}
    L = []
    L.append("# iscsi-tgt vs tgtd benchmark\n")
    L.append(f"Generated by `scripts/bench/run.sh` on {meta.get('date', '?')}.\n")
    L.append("## Setup\n")
    L.append(f"- Command: `{meta.get('command', '?')}`")
    L.append(f"- Machine: {meta.get('nproc', '?')} CPUs, {meta.get('cpu', '?')}; "
             f"kernel {meta.get('kernel', '?')}; {meta.get('mem', '?')}")
    L.append(f"- iscsi-tgt: `{meta.get('ours_cmd', '?')}` ({meta.get('ours_version', '?')}; "
             f"repo HEAD {meta.get('git', '?')} at run time); 1 GiB malloc bdev, 512-byte blocks, LUN 0")
    L.append(f"- tgtd: `{meta.get('tgtd_cmd', '?')}` ({meta.get('tgtd_version', '?')}); "
             f"LUN 1 = 1 GiB file in /dev/shm (rdwr backing store), pre-written with dd")
    L.append(f"- fio: {meta.get('fio_version', '?')}, libiscsi engine, pinned with "
             f"`taskset -c {meta.get('fio_cpu', '?')}`; targets pinned with "
             f"`taskset -c {meta.get('target_cpu', '?')}`; loopback (127.0.0.1)")
    L.append(f"- Both LUNs pre-written once with fio (sequential 1M writes) before measuring.")
    L.append(f"- {raw['runtime']} s per run, {raw['reps']} repetition(s) per case and target, "
             f"targets alternated (order flipped every repetition); values are medians.")
    L.append("- Latency = fio completion latency (clat). CPU/IO = target's utime+stime "
             "(all threads, /proc/PID/stat) during the fio run / I/Os completed, in µs.")
    L.append("- Shared machine: expect run-to-run noise of several percent.\n")
    L.append("## Results\n")
    L.append("Ratio = ours/tgtd. For IOPS and MB/s **higher is better** (↑); for mean lat, "
             "p99 lat and CPU/IO **lower is better** (↓).\n")
    hdr = ["case"]
    for k, label, unit, hib in METRICS:
        u = f" ({unit})" if unit else ""
        arrow = "↑" if hib else "↓"
        hdr += [f"{label}{u} tgtd", f"{label}{u} ours", f"{label} ratio {arrow}"]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "---|" + "---:|" * (len(hdr) - 1))
    for case in raw["cases"]:
        m = case["median"]
        row = [case["desc"]]
        for k, *_ in METRICS:
            r = case["ratio"][k]
            row += [fmt(m["tgtd"][k]), fmt(m["ours"][k]), f"{r:.2f}" if r is not None else "n/a"]
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    if raw["reps"] > 1:
        L.append("Spread over the repetitions (min–max), to judge the noise:\n")
        L.append("| case | IOPS tgtd | IOPS ours | p99 lat (µs) tgtd | p99 lat (µs) ours | "
                 "CPU/IO (µs) tgtd | CPU/IO (µs) ours |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for case in raw["cases"]:
            row = [case["desc"]]
            for k in ("iops", "lat_p99_us", "cpu_us_per_io"):
                for tn in ("tgtd", "ours"):
                    v = [r[k] for r in case["runs"][tn]]
                    row.append(f"{fmt(min(v))}–{fmt(max(v))}")
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    L.append("Per-run values (every repetition) are in `results.json`; chart: `chart.png`.\n")
    if idle:
        L.append("## Idle check\n")
        L.append(f"{idle['sessions']} logged-in, idle sessions held for {idle['window_s']:.1f} s "
                 f"(full-feature login over raw TCP, `scripts/bench/idle.py`); target CPU as % of "
                 f"one core over that window. Bar: < 2 %.\n")
        L.append("| target | sessions | CPU % (stat ticks) | CPU % (schedstat) | NOP-Ins answered | verdict |")
        L.append("|---|---:|---:|---:|---:|---|")
        for r in idle["results"]:
            verdict = "PASS" if r["cpu_pct"] < 2 else "FAIL"
            L.append(f"| {r['name']} | {r['sessions']} | {r['cpu_pct']:.2f} | "
                     f"{r['cpu_pct_schedstat']:.2f} | {r['nops']} | {verdict} |")
        L.append("")
    md = "\n".join(L)
    with open(a.md, "w") as f:
        f.write(md)
    print(md)
    out = dict(raw)
    if idle:
        out["idle"] = idle
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)
    chart(raw, a.png)


def chart(raw, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = raw["cases"]
    keys = [("iops", "IOPS (↑)"), ("mbps", "MB/s (↑)"), ("lat_mean_us", "mean lat (↓)"),
            ("lat_p99_us", "p99 lat (↓)"), ("cpu_us_per_io", "CPU/IO (↓)")]
    n = len(keys)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(cases)), 5.5))
    vals_all = []
    for i, (k, label) in enumerate(keys):
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(cases))]
        vals = [case["ratio"][k] or 0 for case in cases]
        vals_all += [v for v in vals if v > 0]
        ax.bar(xs, vals, width, label=label)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    if vals_all and max(vals_all) / min(vals_all) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c["desc"].replace(", ", "\n") for c in cases], fontsize=8)
    ax.set_ylabel("ours / tgtd")
    ax.set_title(f"iscsi-tgt / tgtd (medians of {raw['reps']} x {raw['runtime']} s; "
                 f"↑ higher better, ↓ lower better)")
    ax.legend(fontsize=8, ncol=n)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def cmd_transports(a):
    """Kernel TCP vs DPDK on one wire: two `run` outputs (one target each) side by side."""
    with open(a.kernel) as f:
        k = json.load(f)
    with open(a.dpdk) as f:
        d = json.load(f)
    dcases = {c["name"]: c for c in d["cases"]}
    meta = {**k["meta"], **d["meta"]}
    L = ["# iscsi-tgt: kernel TCP vs DPDK (smoltcp) on one wire\n",
         f"Generated by `scripts/bench/transports.sh` on {meta.get('date', '?')}.\n",
         "## Setup\n",
         f"- Command: `{meta.get('command', '?')}`",
         f"- Machine: {meta.get('nproc', '?')} CPUs, {meta.get('cpu', '?')}; "
         f"kernel {meta.get('kernel', '?')}",
         "- Wire: a veth pair in a network namespace (checksum offloads off on both ends, "
         "as AF_PACKET needs); fio (libiscsi engine) on the kernel side, pinned to CPU "
         f"{meta.get('fio_cpu', '?')}.",
         f"- kernel: `{meta.get('kernel_cmd', '?')}`",
         f"- dpdk: `{meta.get('dpdk_cmd', '?')}` (net_af_packet on the other veth end)",
         f"- Each target pinned to CPU {meta.get('target_cpu', '?')}, measured alone "
         "(the other is not running); 1 GiB malloc LUN, pre-written.",
         f"- {k['runtime']} s per run, {k['reps']} repetition(s); medians. CPU/IO: the "
         "target's utime+stime per I/O. The DPDK reactor polls its queue without sleeping "
         "while packets flow (like any poll-mode driver), so its CPU/IO includes that.",
         "",
         "## Results (ratio = dpdk / kernel)\n",
         "| case | IOPS kernel | IOPS dpdk | IOPS ratio ↑ | mean lat (µs) kernel | "
         "mean lat (µs) dpdk | CPU/IO (µs) kernel | CPU/IO (µs) dpdk | CPU/IO ratio ↓ |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    out = []
    for c in k["cases"]:
        dc = dcases.get(c["name"])
        if not dc:
            continue
        km, dm = c["median"]["kernel"], dc["median"]["dpdk"]
        r_iops = dm["iops"] / km["iops"] if km["iops"] else 0
        r_cpu = dm["cpu_us_per_io"] / km["cpu_us_per_io"] if km["cpu_us_per_io"] else 0
        L.append(f"| {c['desc']} | {fmt(km['iops'])} | {fmt(dm['iops'])} | {r_iops:.2f} | "
                 f"{fmt(km['lat_mean_us'])} | {fmt(dm['lat_mean_us'])} | "
                 f"{fmt(km['cpu_us_per_io'])} | {fmt(dm['cpu_us_per_io'])} | {r_cpu:.2f} |")
        out.append(dict(name=c["name"], desc=c["desc"], kernel=km, dpdk=dm,
                        iops_ratio=r_iops, cpu_ratio=r_cpu))
    md = "\n".join(L) + "\n"
    print(md)
    with open(a.md, "w") as f:
        f.write(md)
    with open(a.json, "w") as f:
        json.dump(dict(meta=meta, kernel=k, dpdk=d, cases=out), f, indent=2)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--fio", required=True)
    r.add_argument("--targets", nargs="+", required=True)
    r.add_argument("--iqn", required=True)
    r.add_argument("--runtime", type=int, required=True)
    r.add_argument("--reps", type=int, required=True)
    r.add_argument("--fio-cpu", type=int, default=1)
    r.add_argument("--workdir", default="/tmp")
    r.add_argument("--only", default="")
    r.add_argument("--out", required=True)
    r.add_argument("--meta", nargs="*", default=[])
    r.add_argument("--netns", default=None)
    q = sub.add_parser("report")
    q.add_argument("--raw", required=True)
    q.add_argument("--md", required=True)
    q.add_argument("--json", required=True)
    q.add_argument("--png", required=True)
    q.add_argument("--idle")
    t = sub.add_parser("transports")
    t.add_argument("--kernel", required=True)
    t.add_argument("--dpdk", required=True)
    t.add_argument("--md", required=True)
    t.add_argument("--json", required=True)
    a = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    {"run": cmd_run, "report": cmd_report, "transports": cmd_transports}[a.cmd](a)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The benchmark matrix (scripts/bench/jobs/*.fio) from an initiator host, and its report.

  remote.py --fio FIO --engine libaio|libiscsi --target DEV_OR_URL --jobs DIR
            --runtime S --reps N --out DIR [--only CASE,...] [--baseline RESULTS.json]
            [--meta k=v ...]

Each job file runs `reps` times (FIO_ENGINE, FIO_TARGET, FIO_DIRECT, FIO_RUNTIME in its
environment), JSON output, a timeout of runtime + 60 s. Writes DIR/results.json (every run
and the medians), DIR/results.md (a markdown table; with --baseline, each median beside the
baseline's and their ratio) and DIR/chart.png (IOPS per case, the baseline's beside).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (parse(), run_fio(), load_fio_json(), die())

METRICS = [("iops", "IOPS", True), ("mbps", "MB/s", True),
           ("lat_mean_us", "mean µs", False), ("lat_p99_us", "p99 µs", False)]


def job_cases(jobs_dir, only):
    cases = []
    for f in sorted(os.listdir(jobs_dir)):
        if not f.endswith(".fio"):
            continue
        name = f[:-4]
        if only and name not in only:
            continue
        path = os.path.join(jobs_dir, f)
        with open(path) as fh:
            first = fh.readline().lstrip("# ").strip()
        desc = first.split(" (")[0]
        rw = next(line.split("=", 1)[1].strip() for line in open(path)
                  if line.startswith("rw="))
        cases.append(dict(name=name, desc=desc, path=path, rw=rw))
    if only:
        missing = set(only) - {c["name"] for c in cases}
        if missing:
            bench.die(f"no job file for {', '.join(sorted(missing))} in {jobs_dir}")
    if not cases:
        bench.die(f"no job files in {jobs_dir}")
    return cases


def run(a):
    env = dict(os.environ, FIO_ENGINE=a.engine, FIO_TARGET=a.target,
               FIO_DIRECT="1" if a.engine == "libaio" else "0", FIO_RUNTIME=str(a.runtime))
    os.environ.update(env)
    cases = job_cases(a.jobs, a.only.split(",") if a.only else None)
    tmp = tempfile.mkdtemp(prefix="iscsi-remote-bench.")
    out = []
    for c in cases:
        runs = []
        for rep in range(a.reps):
            what = f"{c['name']} #{rep + 1}"
            js = os.path.join(tmp, f"{c['name']}-{rep}.json")
            cmd = [a.fio, "--output-format=json", f"--output={js}", c["path"]]
            print(f"remote.py: {what}", flush=True)
            bench.run_fio(cmd, a.runtime + 60, what)
            runs.append(bench.parse(bench.load_fio_json(js, what), c["rw"], what))
        median = {k: statistics.median(r[k] for r in runs) for k, _, _ in METRICS}
        out.append(dict(name=c["name"], desc=c["desc"], runs=runs, median=median))
    return out


def report(a, cases):
    meta = dict(kv.split("=", 1) for kv in a.meta)
    meta.update(engine=a.engine, fio_target=a.target, runtime=a.runtime, reps=a.reps)
    base = None
    if a.baseline:
        with open(a.baseline) as f:
            base = {c["name"]: c["median"] for c in json.load(f)["cases"]}
    for c in cases:
        b = (base or {}).get(c["name"])
        c["baseline"] = b
        c["ratio"] = {k: (c["median"][k] / b[k] if b and b.get(k) else None)
                      for k, _, _ in METRICS}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(dict(meta=meta, baseline=a.baseline, cases=cases), f, indent=1)

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"

    head = ["case"] + [label for _, label, _ in METRICS]
    if base:
        head += [f"{label} vs baseline" for _, label, _ in METRICS]
    lines = [f"# Benchmark from the initiator ({a.engine})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    if base:
        lines.append(f"- baseline: {a.baseline} (ratio > 1: more IOPS / MB/s, more latency)")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        row = [c["desc"]] + [fmt(c["median"][k]) for k, _, _ in METRICS]
        if base:
            row += [fmt(c["ratio"][k]) for k, _, _ in METRICS]
        lines.append("| " + " | ".join(row) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    chart(cases, bool(base), os.path.join(a.out, "chart.png"), a)


def chart(cases, with_base, png, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cases)), 5))
    xs = range(len(cases))
    width = 0.4 if with_base else 0.6
    now = [c["median"]["iops"] for c in cases]
    if with_base:
        before = [(c["baseline"] or {}).get("iops", 0) for c in cases]
        ax.bar([x - width / 2 for x in xs], before, width, label="baseline")
        ax.bar([x + width / 2 for x in xs], now, width, label="this run")
        ax.legend()
    else:
        ax.bar(list(xs), now, width)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([c["desc"].replace(", ", "\n") for c in cases], fontsize=8)
    ax.set_ylabel("IOPS")
    ax.set_title(f"{a.engine}: medians of {a.reps} x {a.runtime} s")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fio", required=True)
    p.add_argument("--engine", choices=["libaio", "libiscsi"], required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--jobs", required=True)
    p.add_argument("--runtime", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--baseline")
    p.add_argument("--meta", nargs="*", default=[])
    a = p.parse_args()
    if a.runtime < 1 or a.reps < 1:
        bench.die("--runtime and --reps must be positive")
    report(a, run(a))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Parsers and report writer for scripts/bench (kept out of bash: floats, medians, markdown).

  results.py iperf FILE            iperf3 -J output -> received Gbit/s
  results.py wrk FILE              wrk --latency output -> "req/s p50_ms p99_ms errors"
  results.py proxy-table RAW       raw "metric target rep value" lines -> markdown table (medians)
  results.py proxy-verdict RAW     ratio to HAProxy vs the 1.0x goal, with the spread of the runs
  results.py section MD NAME BODY  replace section NAME of MD with file BODY (append if absent)
"""
import json
import os
import re
import statistics
import sys


def iperf(path):
    with open(path) as f:
        data = json.load(f)
    if "error" in data:
        sys.exit(f"iperf3: {data['error']}")
    # sum_received is what arrived at the receiving end, whichever way (-R) the data flowed.
    print(f"{data['end']['sum_received']['bits_per_second'] / 1e9:.3f}")


UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk(path):
    text = open(path).read()

    def ms(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        if not m:
            sys.exit(f"wrk: no {pct}% latency in {path}")
        return float(m.group(1)) * UNIT_MS[m.group(2)]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not rps:
        sys.exit(f"wrk: no Requests/sec in {path}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    print(f"{float(rps.group(1)):.0f} {ms(50):.3f} {ms(99):.3f} {errors}")


# Rows of the proxy table: metric key, label, format, True if higher is better.
PROXY_ROWS = [
    ("tput_up", "Bulk throughput client→backend (Gbit/s)", "{:.2f}", True),
    ("tput_down", "Bulk throughput backend→client, -R (Gbit/s)", "{:.2f}", True),
    ("cpu_bulk", "Proxy CPU while moving bulk data (% of one core)", "{:.0f}", False),
    ("cps", "New connections/s (1 req per conn, saturated)", "{:.0f}", True),
    ("cps1", "New connections/s, one backend, `wrk -t1 -c32`", "{:.0f}", True),
    ("p50_load", "p50 latency at saturation (ms)", "{:.2f}", False),
    ("p99_load", "p99 latency at saturation (ms)", "{:.2f}", False),
    ("p50_one", "p50 latency, 1 connection at a time (ms)", "{:.3f}", False),
    ("p99_one", "p99 latency, 1 connection at a time (ms)", "{:.3f}", False),
    ("add50", "Added p50 latency vs direct, 1 at a time (ms)", "{:.3f}", False),
    ("add99", "Added p99 latency vs direct, 1 at a time (ms)", "{:.3f}", False),
    ("cpu_conn", "Proxy CPU per connection (µs)", "{:.1f}", False),
    ("cpu_conn1", "Proxy CPU per connection, one backend (µs)", "{:.1f}", False),
    ("pkts_client", "Packets per connection, client side (both ways)", "{:.2f}", False),
    ("pkts_backend", "Packets per connection, backend side (both ways)", "{:.2f}", False),
    ("rss_idle", "RSS idle after start (MiB)", "{:.1f}", False),
    ("rss_load", "RSS peak under connection load (MiB)", "{:.1f}", False),
    ("threads", "Threads", "{:.0f}", None),
    ("nice", "Nice value, control threads (client and backends: 0)", "{:.0f}", None),
    ("nice_proxy", "Nice value, proxy threads", "{:.0f}", None),
    ("rtprio", "Real-time priority (SCHED_RR), control threads (0: none)", "{:.0f}", None),
    ("errors", "wrk errors (socket errors + non-2xx, all runs)", "{:.0f}", None),
]
TARGETS = ["direct", "ours", "nochk", "haproxy"]


def proxy_table(path):
    vals = {}
    for line in open(path):
        parts = line.split()
        if len(parts) != 4:
            continue
        metric, target, _rep, value = parts
        vals.setdefault((metric, target), []).append(float(value))

    def med(metric, target):
        v = vals.get((metric, target))
        if not v:
            return None
        # Errors are a total, everything else the median of the repetitions.
        return sum(v) if metric == "errors" else statistics.median(v)

    # Added latency per repetition would pair unrelated runs; medians minus median is honest.
    for pct in ("50", "99"):
        d = med(f"p{pct}_one", "direct")
        for t in ("ours", "haproxy"):
            x = med(f"p{pct}_one", t)
            if d is not None and x is not None:
                vals[(f"add{pct}", t)] = [x - d]

    out = ["| Metric (median of runs) | direct | ours | ours, checks off | HAProxy | ours / HAProxy |",
           "|---|---:|---:|---:|---:|---:|"]
    for key, label, fmt, higher in PROXY_ROWS:
        cells = []
        for t in TARGETS:
            v = med(key, t)
            cells.append("–" if v is None else fmt.format(v))
        o, h = med(key, "ours"), med(key, "haproxy")
        if higher is None or o is None or not h:
            ratio = "–"
        else:
            ratio = f"{o / h:.2f}×" + ("" if higher else " (lower is better)")
        out.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    print("\n".join(out))


def proxy_verdict(path):
    """One line per target metric: ratio to HAProxy against the 1.0x goal."""
    vals = {}
    for line in open(path):
        parts = line.split()
        if len(parts) == 4:
            vals.setdefault((parts[0], parts[1]), []).append(float(parts[3]))

    def med(m, t):
        v = vals.get((m, t))
        return statistics.median(v) if v else None

    for key, what, me in (("tput_up", "Throughput client→backend", "ours"),
                          ("tput_down", "Throughput backend→client", "ours"),
                          ("cps", "Connections/s", "ours"),
                          ("cps1", "Connections/s, one backend, -t1 -c32", "ours"),
                          ("cps", "Connections/s, health checks off", "nochk"),
                          ("cps1", "Connections/s, one backend, health checks off", "nochk")):
        o, h = med(key, me), med(key, "haproxy")
        if o is None or not h:
            continue
        r = o / h
        verdict = "meets the ≥ 1.0× goal" if r >= 1.0 else f"**{(1 - r) * 100:.0f} % below** the 1.0× goal"
        # Ours and HAProxy run back to back in each repetition: the median of those paired
        # ratios cancels drift on a shared machine better than a ratio of medians.
        pairs = [a / b for a, b in zip(vals[(key, me)], vals[(key, "haproxy")]) if b]
        if len(pairs) > 1:
            verdict += f"; paired per repetition {statistics.median(pairs):.2f}×"
        # Spread of the repetitions, so a few-percent gap can be judged against the noise.
        spread = []
        for t in (me, "haproxy"):
            v = vals[(key, t)]
            if len(v) > 1:
                spread.append(f"{t} {min(v):.4g}–{max(v):.4g}")
        extra = f" (runs: {', '.join(spread)})" if spread else ""
        print(f"- {what}: {me} {r:.2f}× HAProxy, {verdict}{extra}.")


def section(md, name, body_path):
    begin, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    body = open(body_path).read().rstrip("\n")
    block = f"{begin}\n{body}\n{end}"
    try:
        text = open(md).read()
    except FileNotFoundError:
        text = ("# Benchmarks\n\nWritten by `scripts/bench`; each section is rewritten by its own "
                "run (`scripts/bench SECTION`), the others are left alone.\n")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    # Written beside it and renamed over it: an interrupted run never leaves half a file.
    tmp = f"{md}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, md)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"iperf": iperf, "wrk": wrk, "proxy-table": proxy_table, "proxy-verdict": proxy_verdict,
     "section": section}[cmd](*args)

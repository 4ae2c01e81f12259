#!/usr/bin/env python3
"""Plots the key chatgate series of one run from Prometheus's HTTP API (query_range,
1 s steps) into a PNG, with the run's events (reload, revocation, ...) as lines.

    plot.py PROMETHEUS_URL START END EVENTS.tsv OUT.png

EVENTS.tsv: `unix_time<TAB>label` per line, as scripts/metrics_picture.sh writes it.
"""
import json
import sys
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)


def query(base, expr, start, end):
    """[(label dict, [(t, value)])] for a range query."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=10) as reply:
        body = json.load(reply)
    if body["status"] != "success":
        sys.exit(f"{expr}: {body}")
    return [
        (result["metric"], [(float(t), float(v)) for t, v in result["values"]])
        for result in body["data"]["result"]
    ]


def main():
    base, start, end, events_path, out = sys.argv[1:6]
    start, end = float(start), float(end)
    events = []
    with open(events_path) as file:
        for line in file:
            when, label = line.rstrip("\n").split("\t", 1)
            events.append((float(when), label))
    t0 = events[0][0] if events else start

    panels = [
        (
            "Responses by status class (requests/s)",
            [
                (
                    "sum by (class) (rate(chatgate_responses_total[5s]))",
                    # A WebSocket's 101 is counted when its session ends.
                    lambda m: "1xx (WebSockets, at their end)" if m.get("class") == "1xx" else m.get("class"),
                    1,
                )
            ],
        ),
        (
            "Upstream response time (ms)",
            [
                (
                    "histogram_quantile(0.5, sum by (le) (rate(chatgate_upstream_response_seconds_bucket[10s])))",
                    lambda m: "p50",
                    1000,
                ),
                (
                    "histogram_quantile(0.99, sum by (le) (rate(chatgate_upstream_response_seconds_bucket[10s])))",
                    lambda m: "p99",
                    1000,
                ),
            ],
        ),
        (
            "Refusals by reason (requests/s)",
            [
                (
                    "sum by (reason) (rate(chatgate_requests_denied_total[5s]))",
                    lambda m: m.get("reason"),
                    1,
                )
            ],
        ),
        ("Open WebSockets", [("sum(chatgate_websockets_open)", lambda m: "open", 1)]),
        (
            "Config reloads (total)",
            [("sum by (result) (chatgate_config_reloads_total)", lambda m: m.get("result"), 1)],
        ),
    ]

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 10), sharex=True)
    for axis, (title, series) in zip(axes, panels):
        drawn = 0
        for expr, label, scale in series:
            for metric, values in query(base, expr, start, end):
                if not values or (max(v for _, v in values) == 0 and "reload" not in title):
                    continue
                xs = [t - t0 for t, _ in values]
                ys = [v * scale for _, v in values]
                # Equal rates (alice's 2xx, bob's 4xx) would hide one line behind the other.
                style = ["-", "--", ":", "-."][drawn % 4]
                axis.plot(xs, ys, label=label(metric), linewidth=1.4, linestyle=style)
                drawn += 1
        axis.set_title(title, fontsize=10, loc="left")
        axis.grid(True, alpha=0.3)
        axis.set_ylim(bottom=0)
        if drawn:
            axis.legend(fontsize=8, loc="upper right")
        for when, _ in events:
            axis.axvline(when - t0, color="grey", linestyle="--", linewidth=0.8)
    top = axes[0]
    for when, label in events:
        top.annotate(
            label,
            xy=(when - t0, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=7,
            color="dimgrey",
        )
    axes[-1].set_xlabel("seconds since the load started")
    fig.suptitle("chatgate under load, scraped by Prometheus every 1 s", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

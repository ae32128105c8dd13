#!/usr/bin/env python3
"""Writes Gavel's Grafana dashboards (dashboards/*.json) from the compact definitions below.

Edit the panels here, run `python3 scripts/dashboards.py`, commit both. `scripts/test` runs it
with --check and fails when the JSON files are not what this script makes.

Every panel's data source is the dashboard variable `datasource` (type prometheus), so an
import needs no edits: Grafana asks for (or provisioning sets) the Prometheus data source.
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DS = {"type": "prometheus", "uid": "${datasource}"}


class Board:
    def __init__(self, uid, title, description, tags, extra_vars=()):
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.panels = []
        self.y = 0
        self.x = 0
        self.row_height = 0
        self.next_id = 1
        self.extra_vars = list(extra_vars)

    def _place(self, w, h):
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_height
            self.row_height = 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_height = max(self.row_height, h)
        return pos

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def row(self, title):
        if self.x:
            self.x, self.y = 0, self.y + self.row_height
            self.row_height = 0
        self.panels.append({
            "type": "row", "title": title, "id": self._id(), "collapsed": False,
            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": [],
        })
        self.y += 1

    def panel(self, kind, title, targets, unit="short", w=8, h=8, description="", **options):
        panel = {
            "type": kind,
            "title": title,
            "description": description,
            "id": self._id(),
            "datasource": DS,
            "gridPos": self._place(w, h),
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                 **({"format": "heatmap"} if kind == "heatmap" else {})}
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": options or {},
        }
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                                "tooltip": {"mode": "multi"}, **options}
        if kind == "heatmap":
            panel["options"] = {"calculate": False, "yAxis": {"unit": unit},
                                "cellGap": 1, "color": {"scheme": "Oranges", "mode": "scheme"}}
        self.panels.append(panel)

    def ts(self, title, targets, unit="short", **kw):
        self.panel("timeseries", title, targets, unit, **kw)

    def stat(self, title, targets, unit="short", w=4, h=4, **kw):
        self.panel("stat", title, targets, unit, w=w, h=h, **kw)

    def json(self):
        variables = [{
            "name": "datasource", "label": "Prometheus", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1,
        }] + self.extra_vars
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "editable": True,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "5s",
            "time": {"from": "now-30m", "to": "now"},
            "timepicker": {},
            "graphTooltip": 1,
            "templating": {"list": variables},
            "annotations": {"list": []},
            "panels": self.panels,
        }


def quantiles(metric, by="", legend_prefix=""):
    """p50 and p99 of a histogram, over all series (or `by` labels)."""
    group = f"le{', ' + by if by else ''}"
    tag = "{{" + by + "}} " if by else ""
    return [
        (f"histogram_quantile(0.5, sum by ({group}) (rate({metric}_bucket{{instance=~\"$instance\"}}[$__rate_interval])))",
         f"{legend_prefix}{tag}p50"),
        (f"histogram_quantile(0.99, sum by ({group}) (rate({metric}_bucket{{instance=~\"$instance\"}}[$__rate_interval])))",
         f"{legend_prefix}{tag}p99"),
    ]


def broker():
    instance = {
        "name": "instance", "label": "Node", "type": "query", "datasource": DS,
        "query": {"query": "label_values(gavel_connections, instance)", "refId": "instance"},
        "definition": "label_values(gavel_connections, instance)",
        "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0,
    }
    b = Board("gavel-broker", "Gavel broker",
              "Connections, fan-out, bids, durability, disconnects and cluster state of Gavel nodes. "
              "Metrics: docs/metrics.md.", ["gavel"], [instance])
    sel = '{instance=~"$instance"}'
    b.row("At a glance")
    b.stat("Connections", [(f"sum(gavel_connections{sel})", "connections")])
    b.stat("Users online", [(f"sum(gavel_users_online{sel})", "users")],
           description="Distinct identified users per node, summed over the selected nodes.")
    b.stat("Rooms", [(f"sum(gavel_rooms{sel})", "rooms")])
    b.stat("Deliveries / s", [(f"sum(rate(gavel_messages_sent_total{sel}[$__rate_interval]))", "frames/s")])
    b.stat("Nodes ready", [(f"sum(gavel_ready{sel})", "ready"), (f"count(gavel_ready{sel})", "nodes")])
    b.stat("Cluster adapter up", [(f"min(gavel_cluster_up{sel})", "up")],
           description="1 when every selected node is connected to Redis, subscribed and heartbeating "
                       "(cluster mode only; empty on single nodes).")

    b.row("Connections and rooms")
    b.ts("Connections by node", [(f"gavel_connections{sel}", "{{instance}}")])
    b.ts("Users online and rooms", [(f"sum(gavel_users_online{sel})", "users online"),
                                    (f"sum(gavel_rooms{sel})", "rooms")])
    b.ts("Connections opened and upgrades refused", [
        (f"sum(rate(gavel_connections_opened_total{sel}[$__rate_interval]))", "opened/s"),
        (f"sum by (reason) (rate(gavel_upgrades_refused_total{sel}[$__rate_interval]))", "refused: {{reason}}"),
        (f"sum(rate(gavel_connections_shed_total{sel}[$__rate_interval]))", "shed: out of file descriptors"),
    ], unit="ops")
    b.ts("Room histories", [
        (f"gavel_history_bytes{sel}", "bytes {{instance}}"),
    ], unit="bytes",
        description="What the rooms' histories count for against --history-memory (the limit itself "
                    "is not exported: it is the node's flag).")
    b.ts("Histories trimmed and rooms dropped early", [
        (f"sum(rate(gavel_history_evicted_total{sel}[$__rate_interval]))", "events evicted (--history-memory)"),
        (f"sum(rate(gavel_rooms_dropped_early_total{sel}[$__rate_interval]))", "rooms dropped (--max-rooms)"),
    ], unit="ops",
        description="Each shortens what a since can recover (the client gets a snapshot instead). "
                    "A steady rate means a limit is too low, or someone is filling rooms.")

    b.row("Fan-out")
    b.ts("Deliveries by frame type", [
        (f"sum by (type) (rate(gavel_messages_sent_total{sel}[$__rate_interval]))", "{{type}}")], unit="ops")
    b.ts("Fan-out latency (publish to queued for every subscriber)",
         quantiles("gavel_fan_out_duration_seconds"), unit="s")
    b.panel("heatmap", "Fan-out latency heatmap",
            [(f"sum by (le) (increase(gavel_fan_out_duration_seconds_bucket{sel}[$__rate_interval]))", "{{le}}")],
            unit="s")
    b.ts("Delivery delay (frame created to written)", quantiles("gavel_delivery_delay_seconds"), unit="s")
    b.ts("Publishes by type", [
        (f"sum by (type) (rate(gavel_publishes_total{sel}[$__rate_interval]))", "{{type}}")], unit="ops")
    b.ts("Client traffic", [
        (f"sum by (type) (rate(gavel_messages_received_total{sel}[$__rate_interval]))", "in: {{type}}"),
    ], unit="ops")
    b.ts("Bytes", [
        (f"sum(rate(gavel_received_bytes_total{sel}[$__rate_interval]))", "received"),
        (f"sum(rate(gavel_sent_bytes_total{sel}[$__rate_interval]))", "sent"),
    ], unit="Bps")

    b.row("Auctions and bids")
    b.ts("Bids by outcome", [
        (f"sum by (outcome) (rate(gavel_bids_total{{outcome=\"accepted\", instance=~\"$instance\"}}[$__rate_interval]))", "accepted"),
        (f"sum by (outcome) (rate(gavel_bids_total{{outcome!=\"accepted\", instance=~\"$instance\"}}[$__rate_interval]))", "rejected: {{outcome}}"),
    ], unit="ops")
    b.ts("Auctions by status", [(f"max by (status) (gavel_auctions{sel})", "{{status}}")])
    b.ts("Bid-log flush latency (single node)", quantiles("gavel_bid_log_flush_duration_seconds")
         + [(f"sum(rate(gavel_bid_log_flush_errors_total{sel}[$__rate_interval]))", "flush errors/s")],
         unit="s")
    b.ts("Bids per flush (group commit)", quantiles("gavel_bid_log_flush_batch_size"))
    b.ts("Cluster commit and lock wait", quantiles("gavel_cluster_commit_duration_seconds", legend_prefix="commit ")
         + quantiles("gavel_cluster_lock_wait_seconds", legend_prefix="lock wait "), unit="s")

    b.row("Disconnects and errors")
    b.ts("Disconnects by reason", [
        (f"sum by (reason) (rate(gavel_disconnects_total{sel}[$__rate_interval]))", "{{reason}}")], unit="ops")
    b.ts("Slow consumers disconnected", [
        (f"sum by (instance) (rate(gavel_slow_consumer_disconnects_total{sel}[$__rate_interval]))", "{{instance}}")],
        unit="ops")
    b.ts("Error replies by code", [
        (f"sum by (code) (rate(gavel_errors_sent_total{sel}[$__rate_interval]))", "{{code}}")], unit="ops")
    b.ts("HTTP API", [
        (f"sum by (route, status) (rate(gavel_http_requests_total{sel}[$__rate_interval]))", "{{route}} {{status}}")],
        unit="reqps")

    b.row("Process")
    b.ts("Resident memory", [(f"process_resident_memory_bytes{sel}", "{{instance}}")], unit="bytes",
         description="A steady climb with steady load is worth a look: histories are bounded by "
                     "--history-memory, sled's page cache by 64 MiB.")
    b.ts("File descriptors", [(f"process_open_fds{sel}", "open {{instance}}"),
                              (f"process_max_fds{sel}", "limit {{instance}}")],
         description="Each connection holds one; at the limit new connections are refused.")
    b.ts("CPU", [(f"rate(gavel_process_cpu_seconds{sel}[$__rate_interval])", "{{instance}}")], unit="percentunit",
         description="Cores used by each broker process (user + system).")

    b.row("Cluster adapter")
    b.ts("Adapter up and ready, by node", [(f"gavel_cluster_up{sel}", "up {{instance}}"),
                                           (f"gavel_ready{sel}", "ready {{instance}}")])
    b.ts("Pub/sub disconnects and resubscribes", [
        (f"sum by (instance) (increase(gavel_cluster_disconnects_total{sel}[$__rate_interval]))", "disconnects {{instance}}"),
        (f"sum by (instance) (increase(gavel_cluster_resubscribes_total{sel}[$__rate_interval]))", "resubscribes {{instance}}"),
        (f"sum(increase(gavel_cluster_nodes_reaped_total{sel}[$__rate_interval]))", "dead nodes reaped"),
    ])
    b.ts("Redis errors by operation and followed rooms", [
        (f"sum by (op) (rate(gavel_cluster_errors_total{sel}[$__rate_interval]))", "errors: {{op}}"),
        (f"sum(gavel_cluster_rooms{sel})", "rooms followed"),
    ])
    return b


def loadgen():
    b = Board("gavel-loadgen", "Gavel loadgen run",
              "A gavel-loadgen run (--metrics-listen): live latency percentiles, expected vs received "
              "deliveries, bids and errors. Metrics: docs/metrics.md.", ["gavel", "loadgen"])
    b.row("Latency")
    for metric in ["delivery", "bid_ack", "connect", "subscribe", "chat"]:
        b.ts(f"{metric} latency", [
            (f"histogram_quantile({q}, sum by (le) (rate(gavel_loadgen_latency_seconds_bucket{{metric=\"{metric}\"}}[$__rate_interval])))", f"p{label}")
            for q, label in [(0.5, "50"), (0.9, "90"), (0.99, "99"), (0.999, "99.9")]
        ], unit="s", w=12 if metric in ("delivery", "bid_ack") else 8)
    b.row("Deliveries")
    b.ts("Expected vs received deliveries / s", [
        ("sum(rate(gavel_loadgen_deliveries_expected_total[$__rate_interval]))", "expected"),
        ("sum(rate(gavel_loadgen_deliveries_total[$__rate_interval]))", "received"),
    ], unit="ops", w=12)
    b.ts("Missing deliveries (expected minus received, cumulative) and seq gaps", [
        ("sum(gavel_loadgen_deliveries_expected_total) - sum(gavel_loadgen_deliveries_total)", "missing"),
        ("sum(gavel_loadgen_seq_gaps_total)", "seq gaps"),
    ], w=12, description="Deliveries in flight count as missing for a moment; a number that keeps growing is loss.")
    b.row("Bids, viewers, errors")
    b.ts("Bids", [
        ("sum(rate(gavel_loadgen_bids_sent_total[$__rate_interval]))", "sent"),
        ("sum(rate(gavel_loadgen_bids_accepted_total[$__rate_interval]))", "accepted"),
        ("sum by (reason) (rate(gavel_loadgen_bids_rejected_total[$__rate_interval]))", "rejected: {{reason}}"),
    ], unit="ops")
    b.ts("Viewers connected", [("sum(gavel_loadgen_viewers)", "viewers")])
    b.ts("Errors by kind", [("sum by (kind) (increase(gavel_loadgen_errors_total[$__rate_interval]))", "{{kind}}")])
    return b


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for board in (broker(), loadgen()):
        path = ROOT / "dashboards" / f"{board.uid}.json"
        text = json.dumps(board.json(), indent=2, sort_keys=True) + "\n"
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("stale dashboards (run python3 scripts/dashboards.py): " + ", ".join(stale), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks the dashboard's and the alerts' PromQL against a live Prometheus and the
metrics the binary really exports. Run by check.sh; standard library only.

    check_queries.py PROMETHEUS_URL METRICS_FILE... 

- every dashboard target (variables and $__rate_interval substituted) and every
  variable's label_values() metric;
- every alert rule as Prometheus loaded it from alerts.yaml (its health, and its query);
- every metric name in those expressions must be one the scraped /metrics texts
  (METRICS_FILE...) hold, a histogram's _bucket/_sum/_count included, or one of
  FAULT_ONLY below;
- every alert of alerts.yaml is shown both firing and quiet in alerts.test.yaml.
Exits 1 on any problem.
"""

import json
import os
import re
import sys
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# Series born only on a broker fault that check.sh cannot cause cheaply. Each must be
# declared as a string literal somewhere in src/, so a misspelling still fails.
FAULT_ONLY = {"segment_bridge_requeue_fallbacks_total"}

# What the dashboard's variables stand for in the check.
SUBSTITUTIONS = [
    (r"\$__rate_interval|\$\{__rate_interval\}", "10s"),
    (r"\$__interval|\$\{__interval\}", "5s"),
    (r"\$__range|\$\{__range\}", "1m"),
    (r"\$\{?(namespace|worker|intake)(:[a-z]+)?\}?", ".*"),
]

KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
    "group_right", "bool", "offset", "inf", "nan", "atan2",
}


def metric_names(expr):
    """The metric names an expression selects: a small tokenizer, no parser. Strings,
    label matchers, ranges and grouping label lists go first; what is left that looks
    like a name and is not a keyword or a function call is a metric."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        word = m.group(0)
        rest = s[m.end():].lstrip()
        if word.lower() in KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def substitute(expr):
    for pattern, value in SUBSTITUTIONS:
        expr = re.sub(pattern, value, expr)
    return expr


def exported_names(paths):
    names = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("# TYPE "):
                    names.add(line.split()[2])
                elif line.strip() and not line.startswith("#"):
                    names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


class Prometheus:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def get(self, path, **params):
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def query(self, expr):
        return self.get("/api/v1/query", query=expr)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    prom = Prometheus(sys.argv[1])
    exported = exported_names(sys.argv[2:])
    problems = []

    sources = ""
    for root, _, files in os.walk(os.path.join(REPO, "src")):
        for name in files:
            if name.endswith(".rs"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    sources += f.read()
    for name in sorted(FAULT_ONLY):
        if f'"{name}"' not in sources:
            problems.append(f"FAULT_ONLY name {name} is not declared in src/")
    known = exported | FAULT_ONLY

    def check_names(where, expr):
        unknown = sorted(metric_names(expr) - known)
        if unknown:
            problems.append(f"{where}: not exported by the binary: {', '.join(unknown)}")

    def run(where, expr):
        answer = prom.query(expr)
        if answer.get("status") != "success":
            problems.append(f"{where}: invalid query: {answer.get('error')}\n    {expr}")
            return None
        return len(answer["data"]["result"])

    # The dashboard.
    with open(os.path.join(HERE, "dashboard.json"), encoding="utf-8") as f:
        dashboard = json.load(f)
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    queries = empty = 0
    for panel in panels:
        for target in panel.get("targets", []):
            where = f"panel {panel.get('title')!r} target {target.get('refId')}"
            expr = substitute(target.get("expr", ""))
            if not expr.strip():
                problems.append(f"{where}: no expr")
                continue
            queries += 1
            check_names(where, expr)
            n = run(where, expr)
            if n == 0:
                empty += 1
                print(f"  (no data now) {where}")
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", q)
        if var.get("type") == "query":
            if not m:
                problems.append(f"variable {var.get('name')}: unexpected query {q!r}")
            else:
                check_names(f"variable {var.get('name')}", m.group(1))
    print(f"dashboard: {queries} queries in {len(panels)} panels ran "
          f"({queries - empty} with data now)")

    # The alert rules, as Prometheus loaded them.
    with open(os.path.join(HERE, "alerts.yaml"), encoding="utf-8") as f:
        declared = re.findall(r"^\s*- alert:\s*(\S+)", f.read(), re.M)
    rules = [r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    loaded = {r["name"] for r in rules if r.get("type") == "alerting"}
    if set(declared) != loaded or len(declared) != len(rules):
        problems.append(f"Prometheus loaded {sorted(loaded)}, alerts.yaml declares {sorted(declared)}")
    for rule in rules:
        where = f"alert {rule['name']}"
        if rule.get("health") != "ok":
            problems.append(f"{where}: health {rule.get('health')}: {rule.get('lastError')}")
        check_names(where, rule["query"])
        run(where, rule["query"])
    print(f"alerts: {len(rules)} rules loaded and evaluated by Prometheus")

    # Every alert fires and stays quiet in the unit tests.
    with open(os.path.join(HERE, "alerts.test.yaml"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    fires, quiet = set(), set()
    for i, line in enumerate(lines):
        m = re.match(r"\s*alertname:\s*(\S+)", line)
        if not m:
            continue
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if nxt == "exp_alerts: []":
            quiet.add(m.group(1))
        elif nxt == "exp_alerts:":
            fires.add(m.group(1))
    for name in declared:
        if name not in fires:
            problems.append(f"alerts.test.yaml never shows {name} firing")
        if name not in quiet:
            problems.append(f"alerts.test.yaml never shows {name} quiet")
    print(f"alert tests: {len(fires & set(declared))} of {len(declared)} alerts shown firing, "
          f"{len(quiet & set(declared))} quiet")

    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

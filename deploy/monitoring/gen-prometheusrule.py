#!/usr/bin/env python3
"""Writes prometheusrule.yaml from alerts.yaml, or checks that it is up to date.

    python3 deploy/monitoring/gen-prometheusrule.py          # write it
    python3 deploy/monitoring/gen-prometheusrule.py --check  # exit 1 if it differs

alerts.yaml is the one source of truth. The manifest is built by text, not by a YAML
library, so that it needs nothing beyond the standard library and keeps the comments:
its `spec:` is alerts.yaml from `groups:` on, indented by two spaces. Byte for byte the
same groups, then, and `--check` (run by check.sh) fails on any hand edit of either.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "alerts.yaml")
TARGET = os.path.join(HERE, "prometheusrule.yaml")

HEADER = """\
# GENERATED from alerts.yaml by gen-prometheusrule.py: edit alerts.yaml, then run
#   python3 deploy/monitoring/gen-prometheusrule.py
# check.sh fails when this file and alerts.yaml differ.
#
# The alert rules as a prometheus-operator PrometheusRule. Optional: it needs the
# operator's CRD (monitoring.coreos.com/v1), so it is not among the kustomization's
# resources. Apply it to the namespace of the Deployments:
#   kubectl apply -n NAMESPACE -f deploy/monitoring/prometheusrule.yaml
# The operator only loads rules its Prometheus' ruleSelector matches: kube-prometheus-
# stack's default selector wants `release: <its Helm release name>`; add that label in
# a kustomize overlay or with `kubectl label`, not here (this file is generated).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: segment-bridge
  labels:
    app.kubernetes.io/name: segment-bridge
    app.kubernetes.io/component: monitoring
spec:
"""


def render(source_text):
    lines = source_text.splitlines()
    try:
        start = lines.index("groups:")
    except ValueError:
        sys.exit(f"{SOURCE}: no top-level 'groups:' line")
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main():
    with open(SOURCE, encoding="utf-8") as f:
        wanted = render(f.read())
    if sys.argv[1:] == ["--check"]:
        try:
            with open(TARGET, encoding="utf-8") as f:
                have = f.read()
        except FileNotFoundError:
            have = None
        if have != wanted:
            print(f"{os.path.relpath(TARGET)} differs from alerts.yaml; run "
                  "python3 deploy/monitoring/gen-prometheusrule.py", file=sys.stderr)
            return 1
        print("prometheusrule.yaml: spec.groups identical to alerts.yaml")
        return 0
    if sys.argv[1:]:
        sys.exit(__doc__)
    with open(TARGET, "w", encoding="utf-8") as f:
        f.write(wanted)
    print(f"wrote {os.path.relpath(TARGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Offline validation of everything under deploy/.
#
#   bash deploy/validate.sh
#
# Needs only python3 (>= 3.8) with pip and access to PyPI. It installs its
# tools with `pip install --target` into a temporary directory (no venv, no
# root, no change to the system Python; works with Debian's PEP 668
# "externally managed" Python) and removes them afterwards. Set
# DEPLOY_VALIDATE_CACHE=/some/dir to keep and reuse the install between runs.
#
# What it checks (one output line per file, exit status 1 on any problem):
#   - every YAML document in deploy/kubernetes/*.yaml parses (duplicate keys
#     are errors, as in kubectl's strict decoding);
#   - core Kubernetes objects against the official OpenAPI-derived JSON
#     schemas bundled in the PyPI package kubernetes-validate, in strict mode
#     (unknown fields are errors), for each version in K8S_VERSIONS
#     (default: "1.29 latest" = oldest and newest version we target);
#   - KEDA ScaledObject / TriggerAuthentication (CRDs, not in those schemas)
#     against a JSON schema transcribed below from KEDA 2.x's CRDs, strict,
#     with Kubernetes' own ObjectMeta and HPA-behavior schemas for the embedded
#     parts, plus the rabbitmq scaler's metadata rules;
#   - kustomization.yaml: known fields, every resource exists and is
#     validated, no manifest is left out by accident;
#   - the config.toml inside the ConfigMap: TOML syntax, the keys and types
#     of docs/configuration.md (the intake's sources included), and that it
#     holds no credentials;
#   - cross-references between the manifests, for the worker and the intake
#     alike (Secret keys, ConfigMap keys, selectors vs. pod labels, probe and
#     listen ports, KEDA target/auth/queue, grace periods), and the intake's
#     own: a secret for every source, Ingress -> Service -> pods with TLS, the
#     HPA's target and CPU requests, the Ingress body limit;
#   - deploy/Dockerfile statically (no Docker engine here to build it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
REQS=(
  "kubernetes-validate==1.37.0"   # bundles the schemas of Kubernetes 1.25 ... 1.37
  "jsonschema>=4.23,<5"
  "PyYAML>=6,<7"
  'tomli>=2; python_version < "3.11"'
)

start=$(date +%s)

if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  echo "FATAL: '$PYTHON -m pip' is not available (Debian/Ubuntu: apt-get install python3-pip)" >&2
  exit 2
fi

if [[ -n "${DEPLOY_VALIDATE_CACHE:-}" ]]; then
  mkdir -p "$DEPLOY_VALIDATE_CACHE"
  libdir="$DEPLOY_VALIDATE_CACHE/site-packages"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  libdir="$tmp/site-packages"
fi

want="$("$PYTHON" -c 'import sys; print("py%d.%d" % sys.version_info[:2])') ${REQS[*]}"
if [[ ! -f "$libdir/.installed" || "$(cat "$libdir/.installed")" != "$want" ]]; then
  echo "installing validation tools from PyPI into $libdir ..."
  rm -rf "$libdir"
  mkdir -p "$libdir"
  # --target never touches the system site-packages, so PEP 668 does not apply.
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input \
    --no-warn-script-location --target "$libdir" "${REQS[@]}"
  printf '%s' "$want" >"$libdir/.installed"
fi

rc=0
PYTHONPATH="$libdir" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
  "$PYTHON" - "$here" <<'PY' || rc=$?
import glob
import json
import os
import re
import sys

import jsonschema
import yaml
from referencing import Registry, Resource

import kubernetes_validate.utils as kv

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

DEPLOY = sys.argv[1]
KDIR = os.path.join(DEPLOY, "kubernetes")
REPO = os.path.dirname(DEPLOY)


def rel(path):
    return os.path.relpath(path, REPO)


# ---------------------------------------------------------------- reporting
failed = False


def report(path, errors, detail):
    global failed
    if errors:
        failed = True
        print(f"FAIL  {path}: {detail}")
        for e in errors:
            print(f"        - {e}")
    else:
        print(f"OK    {path}: {detail}")


# ---------------------------------------------------------------- YAML loading
class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (kubectl does too)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]


# ---------------------------------------------------------------- Kubernetes schemas
latest = kv.latest_version()
wanted = os.environ.get("K8S_VERSIONS", "1.29 latest").split()
VERSIONS = []
for v in wanted:
    v = latest if v == "latest" else v.lstrip("v")
    matches = [x for x in kv.all_versions() if kv.major_minor(x) == kv.major_minor(v)]
    if not matches:
        sys.exit(f"FATAL: kubernetes-validate has no schemas for Kubernetes {v} "
                 f"(has {', '.join(dict.fromkeys(kv.major_minor(x) for x in kv.all_versions()))})")
    if matches[-1] not in VERSIONS:
        VERSIONS.append(matches[-1])

_cache = {}


def k8s_registry(version):
    key = ("defs", version)
    if key not in _cache:
        defs = kv.schema_contents(
            f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
        _cache[key] = Resource.from_contents(defs) @ Registry()
    return _cache[key]


def k8s_schema(doc, version):
    """The strict schema for doc's kind/apiVersion, or None if there is none."""
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", str(doc.get("apiVersion", "")))
    name = f"{str(doc.get('kind', '')).lower()}-{api}.json"
    path = f"kubernetes-json-schema/v{version}-local-strict/{name}"
    try:
        return kv.schema_contents(path, version)
    except FileNotFoundError:
        return None


def schema_errors(schema, doc, registry):
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    out = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        # Report the most specific sub-error of anyOf/oneOf failures.
        best = jsonschema.exceptions.best_match([err])
        where = ".".join(str(p) for p in best.absolute_path) or "(top)"
        out.append(f"{where}: {best.message}")
    return out


# ---------------------------------------------------------------- KEDA schemas
# Transcribed from KEDA 2.x's CRDs (config/crd/bases/keda.sh_scaledobjects.yaml
# and keda.sh_triggerauthentications.yaml, version v1alpha1), covering every
# spec field of ScaledObject and the TriggerAuthentication fields; unknown
# fields are errors (kubectl's default server-side field validation is Strict).
K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
STR = {"type": "string"}
INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
META = {"$ref": K8S_DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


def strict_object(properties, required=()):
    return {"type": "object", "properties": properties,
            "required": list(required), "additionalProperties": False}


SCALEDOBJECT_SCHEMA = strict_object({
    "apiVersion": {"const": "keda.sh/v1alpha1"},
    "kind": {"const": "ScaledObject"},
    "metadata": META,
    "status": {"type": "object"},
    "spec": strict_object({
        "scaleTargetRef": strict_object({
            "apiVersion": STR, "kind": STR, "name": {"type": "string", "minLength": 1},
            "envSourceContainerName": STR}, required=["name"]),
        "pollingInterval": {**INT32, "minimum": 1},
        "cooldownPeriod": {**INT32, "minimum": 0},
        "initialCooldownPeriod": {**INT32, "minimum": 0},
        "idleReplicaCount": {**INT32, "minimum": 0},
        "minReplicaCount": {**INT32, "minimum": 0},
        "maxReplicaCount": {**INT32, "minimum": 1},
        "fallback": strict_object({
            "failureThreshold": INT32, "replicas": INT32,
            "behavior": {"enum": ["static", "currentReplicas",
                                  "currentReplicasIfHigher", "currentReplicasIfLower"]}},
            required=["failureThreshold", "replicas"]),
        "advanced": strict_object({
            "restoreToOriginalReplicaCount": {"type": "boolean"},
            "horizontalPodAutoscalerConfig": strict_object({
                "name": STR,
                "behavior": {"$ref": K8S_DEFS +
                             "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"}}),
            "scalingModifiers": strict_object({
                "activationTarget": STR, "formula": STR, "metricType": STR, "target": STR}),
        }),
        "triggers": {"type": "array", "minItems": 1, "items": strict_object({
            "type": {"type": "string", "minLength": 1},
            "name": STR,
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "authenticationRef": strict_object({
                "name": {"type": "string", "minLength": 1},
                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                required=["name"]),
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "useCachedMetrics": {"type": "boolean"},
        }, required=["type", "metadata"])},
    }, required=["scaleTargetRef", "triggers"]),
}, required=["apiVersion", "kind", "metadata", "spec"])

_ref_list = lambda item: {"type": "array", "items": item}  # noqa: E731
TRIGGERAUTH_SCHEMA = strict_object({
    "apiVersion": {"const": "keda.sh/v1alpha1"},
    "kind": {"const": "TriggerAuthentication"},
    "metadata": META,
    "status": {"type": "object"},
    "spec": {**strict_object({
        "secretTargetRef": _ref_list(strict_object(
            {"parameter": STR, "name": STR, "key": STR},
            required=["parameter", "name", "key"])),
        "configMapTargetRef": _ref_list(strict_object(
            {"parameter": STR, "name": STR, "key": STR},
            required=["parameter", "name", "key"])),
        "env": _ref_list(strict_object(
            {"parameter": STR, "name": STR, "containerName": STR},
            required=["parameter", "name"])),
        "boundServiceAccountToken": _ref_list(strict_object(
            {"parameter": STR, "serviceAccountName": STR},
            required=["parameter", "serviceAccountName"])),
        # Provider blocks: accepted, not modelled field by field (unused here).
        "podIdentity": {"type": "object"},
        "hashiCorpVault": {"type": "object"},
        "azureKeyVault": {"type": "object"},
        "awsSecretManager": {"type": "object"},
        "gcpSecretManager": {"type": "object"},
    }), "minProperties": 1},
}, required=["apiVersion", "kind", "metadata", "spec"])

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALEDOBJECT_SCHEMA,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGERAUTH_SCHEMA,
}

RABBITMQ_METADATA = {
    "host", "hostFromEnv", "usernameFromEnv", "passwordFromEnv", "protocol",
    "queueName", "mode", "value", "activationValue", "vhostName", "useRegex",
    "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl",
    "queueLength",
}
NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?$")


def keda_semantics(doc):
    """Rules KEDA's admission webhook / rabbitmq scaler enforce at run time."""
    errs = []
    if doc.get("kind") != "ScaledObject":
        return errs
    spec = doc.get("spec") or {}
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        errs.append(f"spec: minReplicaCount {lo} > maxReplicaCount {hi}")
    for i, trig in enumerate(spec.get("triggers") or []):
        if not isinstance(trig, dict) or trig.get("type") != "rabbitmq":
            continue
        md = trig.get("metadata") or {}
        where = f"spec.triggers.{i}.metadata"
        for k in sorted(set(md) - RABBITMQ_METADATA):
            errs.append(f"{where}: unknown rabbitmq scaler parameter {k!r}")
        if not md.get("queueName"):
            errs.append(f"{where}: queueName is required")
        if md.get("protocol", "auto") not in ("auto", "amqp", "http"):
            errs.append(f"{where}.protocol: must be auto, amqp or http")
        if md.get("mode") not in ("QueueLength", "MessageRate"):
            errs.append(f"{where}.mode: must be QueueLength or MessageRate")
        if not NUMBER.match(str(md.get("value", ""))) or float(md.get("value", 0)) <= 0:
            errs.append(f"{where}.value: must be a positive number in a string")
        if "activationValue" in md and not NUMBER.match(md["activationValue"]):
            errs.append(f"{where}.activationValue: must be a number in a string")
        if not (md.get("host") or md.get("hostFromEnv") or trig.get("authenticationRef")):
            errs.append(f"{where}: needs host, hostFromEnv or an authenticationRef")
        if md.get("host") and "@" in md["host"]:
            errs.append(f"{where}.host: holds credentials; use a TriggerAuthentication")
    return errs


# ---------------------------------------------------------------- config.toml (docs/configuration.md)
CONFIG_KEYS = {
    "amqp": {"url": str, "queue": str, "dead_letter_queue": str, "prefetch": int,
             "declare": bool, "delivery_limit": int},
    "segment": {"default_region": str, "flush_interval_ms": int, "max_batch_events": int,
                "max_batch_bytes": int, "max_in_flight": int, "request_timeout_ms": int,
                "compression": str, "message_id_scheme": str, "us": dict, "eu": dict},
    "segment.us": {"endpoint": str, "write_key": str, "message_id_namespace": str},
    "segment.eu": {"endpoint": str, "write_key": str, "message_id_namespace": str},
    "retry": {"initial_backoff_ms": int, "max_backoff_ms": int, "max_retry_after_s": int,
              "max_hold_s": int},
    "mapping": {"hash_pii": bool, "require_opt_in": bool, "include_mapped_attributes": bool,
                "track_event": str, "lead_event": str},
    "server": {"listen": str},
    "shutdown": {"grace_period_s": int},
    # The webhook intake's keys.
    "intake": {"listen": str, "max_body_bytes": int, "signature_tolerance_s": int,
               "publish_timeout_ms": int, "retry_after_s": int, "header_read_timeout_ms": int,
               "body_read_timeout_ms": int, "request_timeout_ms": int,
               "max_concurrent_requests": int, "drain_delay_ms": int, "sources": dict},
    # intake.sources.<name>: any lowercase name, one table each.
    "intake.sources.*": {"kind": str, "region": str, "secret": str, "previous_secret": str,
                         "forward_tests": bool},
}
SOURCE_NAME = re.compile(r"^[a-z0-9_]+$")


def check_config_toml(text):
    errs = []
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return None, [f"config.toml: TOML syntax: {e}"]

    def walk(table, section):
        if section == "intake.sources":
            for name, source in table.items():
                if not SOURCE_NAME.match(name):
                    errs.append(f"config.toml: intake source {name!r} must be lowercase letters, "
                                "digits and _ (the environment can only name it so)")
                if not isinstance(source, dict):
                    errs.append(f"config.toml: [intake.sources] {name} must be a table")
                    continue
                walk(source, "intake.sources.*")
                if source.get("kind") not in ("jebbit", "joturl"):
                    errs.append(f"config.toml: intake.sources.{name}.kind must be jebbit or joturl")
                if source.get("region", "us") not in ("us", "eu", ""):
                    errs.append(f"config.toml: intake.sources.{name}.region must be us or eu")
                for key in ("secret", "previous_secret"):
                    if source.get(key):
                        errs.append(f"config.toml: intake.sources.{name}.{key} must not be in a "
                                    "ConfigMap; it comes from the Secret via the environment")
            return
        allowed = CONFIG_KEYS.get(section)
        if allowed is None:
            errs.append(f"config.toml: unknown section [{section}]")
            return
        for key, value in table.items():
            typ = allowed.get(key)
            if typ is None:
                errs.append(f"config.toml: [{section}] unknown key {key!r} "
                            "(see docs/configuration.md; extend CONFIG_KEYS in validate.sh if it is new)")
            elif typ is dict:
                if isinstance(value, dict):
                    walk(value, f"{section}.{key}")
                else:
                    errs.append(f"config.toml: [{section}] {key} must be a table")
            elif type(value) is not typ:  # bool is not int here
                errs.append(f"config.toml: [{section}] {key} must be {typ.__name__}, "
                            f"got {type(value).__name__}")

    for section, table in cfg.items():
        if not isinstance(table, dict):
            errs.append(f"config.toml: top-level key {section!r} must be a [section]")
        else:
            walk(table, section)

    # No credentials in a ConfigMap.
    if "url" in cfg.get("amqp", {}):
        errs.append("config.toml: amqp.url holds the broker password; set "
                    "SEGMENT_BRIDGE__AMQP__URL from the Secret instead")
    for region in ("us", "eu"):
        if cfg.get("segment", {}).get(region, {}).get("write_key"):
            errs.append(f"config.toml: segment.{region}.write_key must not be in a "
                        "ConfigMap; it comes from the Secret via the environment")
    seg = cfg.get("segment", {})
    if seg.get("default_region", "us") not in ("us", "eu"):
        errs.append("config.toml: segment.default_region must be us or eu")
    if seg.get("compression", "none") not in ("none", "gzip"):
        errs.append("config.toml: segment.compression must be none or gzip")
    if not 1 <= seg.get("max_batch_events", 1) <= 2500:
        errs.append("config.toml: segment.max_batch_events must be 1..2500")
    if not 1 <= seg.get("max_batch_bytes", 1) <= 500_000:
        errs.append("config.toml: segment.max_batch_bytes must stay under Segment's 500 KB")
    if cfg.get("retry", {}).get("max_hold_s", 0) >= 1800:
        errs.append("config.toml: retry.max_hold_s must stay under RabbitMQ's 30 min ack timeout")
    intake = cfg.get("intake", {})
    if intake.get("request_timeout_ms", 15000) <= intake.get("publish_timeout_ms", 2000):
        errs.append("config.toml: intake.request_timeout_ms must exceed intake.publish_timeout_ms")
    if not 1 <= intake.get("max_body_bytes", 1) <= 16 * 1024 * 1024:
        errs.append("config.toml: intake.max_body_bytes must be 1 .. 16 MiB")
    return cfg, errs


# ---------------------------------------------------------------- API-server rules
# A few checks the API server makes in code rather than in the OpenAPI schema.
QUANTITY = re.compile(r"^[+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                      r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
          "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "P": 1e15, "E": 1e18}
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def quantity(v):
    s = str(v)
    for suf in sorted(SUFFIX, key=len, reverse=True):
        if s.endswith(suf) and not re.search(r"[eE][+-]?[0-9.]*$", s):
            return float(s[: -len(suf)]) * SUFFIX[suf]
    return float(s)


def apiserver_rules(doc):
    errs = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                p = f"{path}.{k}" if path else str(k)
                if k == "resources" and isinstance(v, dict) and path.startswith("spec"):
                    req, lim = v.get("requests") or {}, v.get("limits") or {}
                    for part, table in (("requests", req), ("limits", lim)):
                        for res, q in table.items():
                            if not QUANTITY.match(str(q)):
                                errs.append(f"{p}.{part}.{res}: {q!r} is not a quantity")
                    for res in set(req) & set(lim):
                        try:
                            if quantity(req[res]) > quantity(lim[res]):
                                errs.append(f"{p}: requests.{res} exceeds limits.{res}")
                        except ValueError:
                            pass
                if k in ("labels", "matchLabels") and isinstance(v, dict):
                    for lk, lv in v.items():
                        if not isinstance(lv, str) or len(lv) > 63 or not LABEL_VALUE.match(lv):
                            errs.append(f"{p}.{lk}: invalid label value {lv!r}")
                if k == "ports" and isinstance(v, list):
                    for i, port in enumerate(v):
                        name = port.get("name") if isinstance(port, dict) else None
                        if name is not None and (len(name) > 15 or not PORT_NAME.match(name)):
                            errs.append(f"{p}.{i}.name: {name!r} is not a valid port name")
                        for key in ("containerPort", "port"):
                            n = port.get(key) if isinstance(port, dict) else None
                            if isinstance(n, int) and not 1 <= n <= 65535:
                                errs.append(f"{p}.{i}.{key}: {n} out of range")
                walk(v, p)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}.{i}")

    walk(doc, "")
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    if doc.get("kind") == "PodDisruptionBudget":
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            errs.append("spec: set exactly one of minAvailable and maxUnavailable")
    if doc.get("kind") == "Deployment":
        ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        if ru and str(ru.get("maxSurge", 1)) in ("0", "0%") \
                and str(ru.get("maxUnavailable", 1)) in ("0", "0%"):
            errs.append("spec.strategy.rollingUpdate: maxSurge and maxUnavailable cannot both be 0")
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        tl = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if any(tl.get(k) != v for k, v in sel.items()):
            errs.append("spec.template.metadata.labels: do not match spec.selector")
    return errs


# ---------------------------------------------------------------- per-document validation
def validate_doc(doc):
    """Validate one document; returns (description, errors)."""
    if not isinstance(doc, dict):
        return "?", ["document is not a mapping"]
    api, kind = doc.get("apiVersion"), doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "?")
    label = f"{kind}/{name}"
    errs = []
    for field in ("apiVersion", "kind"):
        if not isinstance(doc.get(field), str):
            errs.append(f"{field}: required string")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                        str(name)) or len(str(name)) > 253:
        errs.append(f"metadata.name: {name!r} is not a valid DNS-1123 name")
    if errs:
        return label, errs

    if (api, kind) in CRD_SCHEMAS:
        seen = set()
        for v in VERSIONS:  # ObjectMeta / HPA behaviour come from the k8s schemas
            for e in schema_errors(CRD_SCHEMAS[(api, kind)], doc, k8s_registry(v)):
                if e not in seen:
                    seen.add(e)
                    errs.append(e)
        errs += keda_semantics(doc)
        errs += apiserver_rules(doc)
        return f"{label} [KEDA CRD schema (transcribed), strict]", errs

    for v in VERSIONS:
        schema = k8s_schema(doc, v)
        if schema is None:
            errs.append(f"no schema for {api} {kind} in Kubernetes {kv.major_minor(v)} "
                        "(unknown kind or API version)")
            continue
        for e in schema_errors(schema, doc, k8s_registry(v)):
            errs.append(f"[k8s {kv.major_minor(v)}] {e}")
    errs += apiserver_rules(doc)
    versions = ", ".join(kv.major_minor(v) for v in VERSIONS)
    return f"{label} [k8s {versions}, strict]", errs


# ---------------------------------------------------------------- kustomization
KUSTOMIZATION_SCHEMA = strict_object({
    "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
    "kind": {"const": "Kustomization"},
    "metadata": {"type": "object"},
    "namespace": STR,
    "namePrefix": STR,
    "nameSuffix": STR,
    "resources": {"type": "array", "items": STR, "minItems": 1},
    "components": {"type": "array", "items": STR},
    "images": {"type": "array", "items": strict_object(
        {"name": STR, "newName": STR, "newTag": STR, "digest": STR}, required=["name"])},
    "labels": {"type": "array", "items": {"type": "object"}},
    "commonAnnotations": {"type": "object", "additionalProperties": STR},
    "configMapGenerator": {"type": "array"},
    "secretGenerator": {"type": "array"},
    "generatorOptions": {"type": "object"},
    "patches": {"type": "array"},
    "replicas": {"type": "array"},
}, required=["apiVersion", "kind", "resources"])

KUSTOMIZATION = os.path.join(KDIR, "kustomization.yaml")
EXCLUDED_ON_PURPOSE = {"secret.example.yaml", "intake-secret.example.yaml"}  # templates

objects = []  # (file, doc) of every valid-enough document, for cross-references


def validate_manifest_file(path):
    try:
        docs = load_docs(path)
    except (OSError, yaml.YAMLError) as e:
        report(rel(path), [f"YAML: {e}"], "unreadable")
        return
    if not docs:
        report(rel(path), ["no YAML documents"], "empty")
        return
    labels, errs = [], []
    for i, doc in enumerate(docs):
        label, doc_errs = validate_doc(doc)
        labels.append(label)
        prefix = f"doc {i + 1} ({label.split(' ')[0]}): " if len(docs) > 1 else ""
        errs += [prefix + e for e in doc_errs]
        if isinstance(doc, dict):
            objects.append((path, doc))
            if doc.get("kind") == "ConfigMap" and "config.toml" in (doc.get("data") or {}):
                cfg, cerrs = check_config_toml(doc["data"]["config.toml"])
                errs += cerrs
                if cfg is not None:
                    labels.append("+ config.toml (its keys and types)")
                    CONFIGS.append(cfg)
    report(rel(path), errs, "; ".join(labels))


CONFIGS = []

if not os.path.isfile(KUSTOMIZATION):
    report(rel(KUSTOMIZATION), ["missing"], "kustomization")
    resources = []
else:
    kerrs = []
    try:
        kdocs = load_docs(KUSTOMIZATION)
    except (OSError, yaml.YAMLError) as e:
        kdocs, kerrs = [], [f"YAML: {e}"]
    kdoc = kdocs[0] if len(kdocs) == 1 else {}
    if len(kdocs) != 1:
        kerrs.append("must hold exactly one YAML document")
    kerrs += schema_errors(KUSTOMIZATION_SCHEMA, kdoc, Registry())
    resources = [r for r in (kdoc.get("resources") or []) if isinstance(r, str)]
    for r in resources:
        p = os.path.normpath(os.path.join(KDIR, r))
        if not os.path.isfile(p):
            kerrs.append(f"resources: {r!r} does not exist ({rel(p)})")
    if len(set(resources)) != len(resources):
        kerrs.append("resources: listed twice")
    listed = {os.path.normpath(os.path.join(KDIR, r)) for r in resources}
    for p in sorted(glob.glob(os.path.join(KDIR, "*.yaml")) + glob.glob(os.path.join(KDIR, "*.yml"))):
        base = os.path.basename(p)
        if p == KUSTOMIZATION or p in listed or base in EXCLUDED_ON_PURPOSE:
            continue
        kerrs.append(f"{base} is not in resources (add it, or to EXCLUDED_ON_PURPOSE "
                     "in validate.sh if it is a template)")
    report(rel(KUSTOMIZATION), kerrs,
           f"Kustomization [{len(resources)} resources exist; "
           f"not applied on purpose: {', '.join(sorted(EXCLUDED_ON_PURPOSE))}]")

manifest_files = sorted(set(
    [p for p in glob.glob(os.path.join(KDIR, "*.yaml")) + glob.glob(os.path.join(KDIR, "*.yml"))
     if p != KUSTOMIZATION]
    + [os.path.normpath(os.path.join(KDIR, r)) for r in resources
       if os.path.isfile(os.path.join(KDIR, r))]))
for path in manifest_files:
    validate_manifest_file(path)


# ---------------------------------------------------------------- cross-references
def find(kind, name=None):
    return [d for _, d in objects if d.get("kind") == kind
            and (name is None or (d.get("metadata") or {}).get("name") == name)]


def one(kind):
    found = find(kind)
    return found[0] if len(found) == 1 else None


xerrs = []
COMPONENT = "app.kubernetes.io/component"


def component(obj):
    return g(obj, "metadata", "labels", COMPONENT)


def of(kind, comp):
    """The one object of `kind` labelled with component `comp`, or None (an error is noted)."""
    found = [d for d in find(kind) if component(d) == comp]
    if len(found) != 1:
        xerrs.append(f"expected exactly one {kind} with {COMPONENT}={comp}, found {len(found)}")
        return None
    return found[0]


def g(obj, *path, default=None):
    for p in path:
        if isinstance(obj, dict):
            obj = obj.get(p)
        elif isinstance(obj, list) and isinstance(p, int) and p < len(obj):
            obj = obj[p]
        else:
            return default
    return default if obj is None else obj


def secret_keys(s):
    return set(g(s, "data", default={})) | set(g(s, "stringData", default={}))


def port_of(listen, default):
    listen = listen or default
    return int(listen.rsplit(":", 1)[1]) if ":" in listen else None


cm = one("ConfigMap")
if cm is None:
    xerrs.append(f"expected exactly one ConfigMap, found {len(find('ConfigMap'))}")
secrets = {g(s, "metadata", "name"): s for s in find("Secret")}
cfg = CONFIGS[0] if CONFIGS else {}
grace = g(cfg, "shutdown", "grace_period_s", default=25)

dep = of("Deployment", "worker")
svc, pdb = of("Service", "worker"), of("PodDisruptionBudget", "worker")
so, ta = one("ScaledObject"), one("TriggerAuthentication")
for kind, obj in [("ScaledObject", so), ("TriggerAuthentication", ta)]:
    if obj is None:
        xerrs.append(f"expected exactly one {kind}, found {len(find(kind))}")
idep = of("Deployment", "intake")
isvc, ipdb = of("Service", "intake"), of("PodDisruptionBudget", "intake")
ing, hpa = of("Ingress", "intake"), of("HorizontalPodAutoscaler", "intake")


def check_pod(dep, who, command, extra_delay_s=0):
    """The checks every Deployment gets; returns (pod labels, {port name: number}, env names)."""
    name = g(dep, "metadata", "name")
    pod = g(dep, "spec", "template", "spec", default={})
    pod_labels = g(dep, "spec", "template", "metadata", "labels", default={})
    containers = pod.get("containers") or []
    c = containers[0] if containers else {}
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    if (c.get("args") or [None])[0] != command:
        xerrs.append(f"Deployment {name}: the {who} runs `segment-bridge {command}` (args[0])")
    for probe in ("livenessProbe", "readinessProbe"):
        port = g(c, probe, "httpGet", "port")
        if port is None:
            xerrs.append(f"Deployment {name}: {probe} has no httpGet port")
        elif isinstance(port, str) and port not in ports:
            xerrs.append(f"Deployment {name}: {probe} port {port!r} is not a named container port")
    if g(c, "livenessProbe", "httpGet", "path") != "/healthz":
        xerrs.append(f"Deployment {name}: livenessProbe must be GET /healthz")
    if g(c, "readinessProbe", "httpGet", "path") != "/readyz":
        xerrs.append(f"Deployment {name}: readinessProbe must be GET /readyz")
    # Credentials only from Secrets, and only from keys the templates define.
    env_names = set()
    for env in c.get("env") or []:
        n = env.get("name", "")
        env_names.add(n)
        if re.search(r"WRITE_KEY|AMQP__URL|PASSWORD|TOKEN|SECRET", n) and "value" in env:
            xerrs.append(f"Deployment {name}: env {n} is a credential; use secretKeyRef, not value")
        ref = g(env, "valueFrom", "secretKeyRef")
        if ref and not ref.get("optional"):
            secret = secrets.get(ref.get("name"))
            if secret is None:
                xerrs.append(f"Deployment {name}: env {n} reads Secret {ref.get('name')!r}, "
                             f"which no *secret.example.yaml describes ({sorted(secrets)})")
            elif ref.get("key") not in secret_keys(secret):
                xerrs.append(f"Deployment {name}: env {n} reads key {ref.get('key')!r}, which "
                             f"Secret {ref.get('name')!r}'s template does not define")
    for vol in pod.get("volumes") or []:
        ref = vol.get("configMap")
        if ref and cm:
            if ref.get("name") != g(cm, "metadata", "name"):
                xerrs.append(f"Deployment {name}: volume {vol.get('name')} mounts ConfigMap "
                             f"{ref.get('name')!r}, which is not defined")
            for item in ref.get("items") or []:
                if item.get("key") not in (cm.get("data") or {}):
                    xerrs.append(f"Deployment {name}: ConfigMap key {item.get('key')!r} does not exist")
    mounts = {m.get("mountPath") for m in c.get("volumeMounts") or []}
    if "/etc/segment-bridge" not in mounts:
        xerrs.append(f"Deployment {name}: config is not mounted at /etc/segment-bridge")
    if cfg:
        lport = port_of(g(cfg, "server", "listen"), "0.0.0.0:9464")
        if lport not in ports.values():
            xerrs.append(f"Deployment {name}: server.listen port {lport} is not a container port "
                         f"({ports})")
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        need = grace + extra_delay_s
        if not isinstance(tgps, (int, float)) or tgps <= need:
            xerrs.append(f"Deployment {name}: terminationGracePeriodSeconds ({tgps}) must exceed "
                         f"{'intake.drain_delay_ms + ' if extra_delay_s else ''}"
                         f"shutdown.grace_period_s ({need:g} s)")
    return pod_labels, ports, env_names, c


def selects(obj, what, pod_labels, match_labels=False):
    s = g(obj, "spec", "selector", default={})
    s = s.get("matchLabels", {}) if match_labels else s
    if not s or any(pod_labels.get(k) != v for k, v in s.items()):
        xerrs.append(f"{what} does not select the pods it is for")


# ---- the worker
if dep:
    pod_labels, ports, _, _ = check_pod(dep, "worker", "run")
    if "replicas" in dep.get("spec", {}) and so:
        xerrs.append("Deployment: spec.replicas is set although KEDA owns the replica count")
    if svc:
        selects(svc, "Service segment-bridge (worker) spec.selector", pod_labels)
        for p in g(svc, "spec", "ports", default=[]):
            t = p.get("targetPort")
            if isinstance(t, str) and t not in ports:
                xerrs.append(f"Service: targetPort {t!r} is not a named container port")
    if pdb:
        selects(pdb, "PodDisruptionBudget (worker) spec.selector.matchLabels", pod_labels, True)

if so:
    ref = g(so, "spec", "scaleTargetRef", default={})
    target = find("Deployment", ref.get("name"))
    if ref.get("kind", "Deployment") != "Deployment" or not target \
            or component(target[0]) != "worker":
        xerrs.append(f"ScaledObject: scaleTargetRef {ref} is not the worker Deployment")
    for t in g(so, "spec", "triggers", default=[]):
        auth = g(t, "authenticationRef", "name")
        if auth and g(t, "authenticationRef", "kind", default="TriggerAuthentication") \
                == "TriggerAuthentication" and not find("TriggerAuthentication", auth):
            xerrs.append(f"ScaledObject: authenticationRef {auth!r} does not exist")
        q = g(t, "metadata", "queueName")
        if cfg and t.get("type") == "rabbitmq":
            want_q = g(cfg, "amqp", "queue", default="segment-bridge.sessions")
            if q != want_q:
                xerrs.append(f"ScaledObject: queueName {q!r} is not the consumed queue {want_q!r}")
if ta:
    for r in g(ta, "spec", "secretTargetRef", default=[]):
        secret = secrets.get(r.get("name"))
        if secret is None or r.get("key") not in secret_keys(secret):
            xerrs.append(f"TriggerAuthentication: secret {r.get('name')!r} key {r.get('key')!r} "
                         "is not in a *secret.example.yaml")

# ---- the intake
if idep:
    drain_s = g(cfg, "intake", "drain_delay_ms", default=0) / 1000
    ipod_labels, iports, ienv, ic = check_pod(idep, "intake", "intake", drain_s)
    if "replicas" in idep.get("spec", {}) and hpa:
        xerrs.append("Deployment segment-bridge-intake: spec.replicas is set although the HPA "
                     "owns the replica count")
    if cfg:
        want = port_of(g(cfg, "intake", "listen"), "0.0.0.0:8080")
        if iports.get("http") != want:
            xerrs.append(f"Deployment segment-bridge-intake: container port `http` "
                         f"({iports.get('http')}) is not intake.listen's port {want}")
        sources = g(cfg, "intake", "sources", default={})
        if not sources:
            xerrs.append("config.toml: [intake.sources.*] is empty: the intake refuses to start")
        for name in sources:
            var = f"SEGMENT_BRIDGE__INTAKE__SOURCES__{name.upper()}__SECRET"
            if var not in ienv:
                xerrs.append(f"Deployment segment-bridge-intake: no env {var} for source "
                             f"{name!r} (the intake refuses to start without its secret)")
        if "SEGMENT_BRIDGE__AMQP__URL" not in ienv:
            xerrs.append("Deployment segment-bridge-intake: no env SEGMENT_BRIDGE__AMQP__URL")
    if hpa:
        cpu = g(ic, "resources", "requests", "cpu")
        if cpu is None:
            xerrs.append("Deployment segment-bridge-intake: an HPA on CPU needs "
                         "resources.requests.cpu")
    if isvc:
        selects(isvc, "Service segment-bridge-intake spec.selector", ipod_labels)
        if g(isvc, "spec", "publishNotReadyAddresses"):
            xerrs.append("Service segment-bridge-intake routes webhooks: it must not publish "
                         "not-ready pods")
        for p in g(isvc, "spec", "ports", default=[]):
            t = p.get("targetPort")
            if isinstance(t, str) and t not in iports:
                xerrs.append(f"Service segment-bridge-intake: targetPort {t!r} is not a named "
                             "container port")
    if ipdb:
        selects(ipdb, "PodDisruptionBudget segment-bridge-intake spec.selector.matchLabels",
                ipod_labels, True)
    if hpa:
        ref = g(hpa, "spec", "scaleTargetRef", default={})
        if ref.get("kind") != "Deployment" or ref.get("name") != g(idep, "metadata", "name"):
            xerrs.append(f"HorizontalPodAutoscaler: scaleTargetRef {ref} is not the intake")
        lo, hi = g(hpa, "spec", "minReplicas", default=1), g(hpa, "spec", "maxReplicas", default=0)
        if lo < 2 or lo > hi:
            xerrs.append(f"HorizontalPodAutoscaler: minReplicas {lo} must be at least 2 (two "
                         f"intake replicas) and at most maxReplicas {hi}")
        resources = [g(m, "resource", "name") for m in g(hpa, "spec", "metrics", default=[])
                     if m.get("type") == "Resource"]
        if "cpu" not in resources:
            xerrs.append("HorizontalPodAutoscaler: the intake scales on CPU (a Resource cpu metric)")
    if ing:
        tls = g(ing, "spec", "tls", default=[])
        tls_hosts = {h for t in tls for h in t.get("hosts") or []}
        if not tls or not all(t.get("secretName") for t in tls):
            xerrs.append("Ingress: TLS ends at the Ingress: spec.tls with a secretName is required")
        for rule in g(ing, "spec", "rules", default=[]):
            if rule.get("host") not in tls_hosts:
                xerrs.append(f"Ingress: host {rule.get('host')!r} has no TLS entry")
            for path in g(rule, "http", "paths", default=[]):
                if not str(path.get("path", "")).startswith("/webhooks"):
                    xerrs.append(f"Ingress: path {path.get('path')!r}: only /webhooks is public")
                backend = g(path, "backend", "service", default={})
                if isvc is None or backend.get("name") != g(isvc, "metadata", "name"):
                    xerrs.append(f"Ingress: backend {backend.get('name')!r} is not the intake's Service")
                else:
                    names = {p.get("name") for p in g(isvc, "spec", "ports", default=[])}
                    numbers = {p.get("port") for p in g(isvc, "spec", "ports", default=[])}
                    port = g(backend, "port", default={})
                    if port.get("name") not in names and port.get("number") not in numbers:
                        xerrs.append(f"Ingress: backend port {port} is not a port of the Service")
                    if port.get("name") == "metrics":
                        xerrs.append("Ingress: the side port (metrics) must not be public")
        limit = g(ing, "metadata", "annotations", default={}).get(
            "nginx.ingress.kubernetes.io/proxy-body-size")
        if limit is not None and cfg:
            try:
                limit_bytes = quantity(str(limit).replace("k", "Ki").replace("m", "Mi")
                                       .replace("g", "Gi"))
            except ValueError:
                limit_bytes = None
                xerrs.append(f"Ingress: proxy-body-size {limit!r} is not a size")
            body = g(cfg, "intake", "max_body_bytes", default=524288)
            if limit_bytes is not None and 0 < limit_bytes <= body:
                xerrs.append(f"Ingress: proxy-body-size {limit} must exceed intake.max_body_bytes "
                             f"({body}), so that the intake answers 413 itself")

report("(cross-references)", xerrs,
       "worker and intake: Secret/ConfigMap keys, selectors, probe and listen ports, grace periods; "
       "KEDA target/auth/queue; intake source secrets, Ingress TLS -> Service -> pods, HPA")


# ---------------------------------------------------------------- Dockerfile (static)
dockerfile = os.path.join(DEPLOY, "Dockerfile")
derrs = []
try:
    lines = open(dockerfile, encoding="utf-8").read().splitlines()
except OSError as e:
    lines, derrs = [], [str(e)]
# Join continuation lines, drop comments.
instrs, buf = [], ""
for line in lines:
    if not buf and line.lstrip().startswith("#"):
        continue
    buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
    if not line.rstrip().endswith("\\"):
        if buf.strip():
            instrs.append(buf.strip())
        buf = ""
stages = [i for i in instrs if i.upper().startswith("FROM ")]
last_stage = instrs[instrs.index(stages[-1]):] if stages else []


def last(keyword, seq):
    found = [i for i in seq if i.split(None, 1)[0].upper() == keyword]
    return found[-1].split(None, 1)[1] if found and " " in found[-1] else None


if len(stages) < 2:
    derrs.append("expected a multi-stage build (builder + runtime)")
for kw, want in (("ENTRYPOINT", ["/usr/local/bin/segment-bridge"]),
                 ("CMD", ["run", "--config", "/etc/segment-bridge/config.toml"])):
    val = last(kw, last_stage)
    try:
        parsed = json.loads(val) if val else None
    except json.JSONDecodeError:
        parsed = None
    if parsed != want:
        derrs.append(f"{kw} must be the exec form {json.dumps(want)} (got {val!r}); "
                     "shell form would keep SIGTERM from reaching the worker")
user = last("USER", last_stage)
if not user or user.split(":")[0] in ("0", "root"):
    derrs.append("final stage must set a non-root USER")
elif not user.split(":")[0].isdigit():
    derrs.append("USER should be numeric so runAsNonRoot can verify it")
for port in ("9464", "8080"):
    if port not in (last("EXPOSE", last_stage) or "").split():
        derrs.append(f"final stage must EXPOSE {port} (9464 side port, 8080 intake)")
if not any("--locked" in i for i in instrs):
    derrs.append("cargo build must use --locked")
ignore_file = dockerfile + ".dockerignore"
if os.path.isfile(ignore_file):
    patterns = [ln.strip().rstrip("/") for ln in open(ignore_file, encoding="utf-8")
                if ln.strip() and not ln.lstrip().startswith("#")]
    for needed in ("src", "Cargo.toml", "Cargo.lock", "tests", "benches", ".", "*", "**"):
        if needed in patterns:
            derrs.append(f"{rel(ignore_file)} excludes {needed!r}, which the build needs")
report(rel(dockerfile), derrs,
       "static checks only (multi-stage, exec-form ENTRYPOINT/CMD, numeric non-root USER, "
       "EXPOSE 9464 8080, --locked, Dockerfile.dockerignore keeps the sources); "
       "SKIPPED: docker build (no Docker engine in this environment)")

sys.exit(1 if failed else 0)
PY

elapsed=$(( $(date +%s) - start ))
if [[ $rc -eq 0 ]]; then
  echo "deploy/ is valid (${elapsed}s)"
else
  echo "deploy/ has problems, see FAIL lines above (${elapsed}s)"
fi
exit "$rc"

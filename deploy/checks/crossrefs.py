"""What no kept tool checks in deploy/: the manifests against each other and against the
configuration as the binary reads it, and a few rules the API server enforces in code.

    python3 deploy/checks/crossrefs.py --bridge target/debug/segment-bridge deploy

The configuration's own rules are the binary's: the ConfigMap's config.toml is judged by
`segment-bridge check --offline`, run with the environment the Deployments give the pods
(Secret values replaced by placeholders), and the settings the manifests must agree with
(queue, ports, grace period, drain delay, body limit, sources) are read from its report.
Schemas are checked by kubernetes-validate and check-jsonschema (see validate.sh).

Prints one OK/FAIL line per file or check; exits 1 on any problem. Needs Python >= 3.11
(tomllib) or tomli, and PyYAML.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

COMPONENT = "app.kubernetes.io/component"
# Templates of the Secrets: read for their keys, never applied.
EXCLUDED_ON_PURPOSE = {"secret.example.yaml", "intake-secret.example.yaml"}
AMQP_PLACEHOLDER = "amqp://placeholder:placeholder@127.0.0.1:1/%2f"


# ---------------------------------------------------------------- loading
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


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def load_file(path):
    """(documents, errors) of one manifest file."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        return [], [f"YAML: {e}"]
    if not docs:
        return [], ["no YAML documents"]
    errs = []
    for doc in docs:
        if not isinstance(doc, dict):
            errs.append("document is not a mapping")
            continue
        for field in ("apiVersion", "kind"):
            if not isinstance(doc.get(field), str):
                errs.append(f"{field}: required string")
        name = str(g(doc, "metadata", "name", default="?"))
        if doc.get("kind") != "Kustomization" and (not DNS1123.fullmatch(name) or len(name) > 253):
            errs.append(f"metadata.name: {name!r} is not a valid DNS-1123 name")
    return [d for d in docs if isinstance(d, dict)], errs


def g(obj, *path, default=None):
    for p in path:
        if isinstance(obj, dict):
            obj = obj.get(p)
        elif isinstance(obj, list) and isinstance(p, int) and p < len(obj):
            obj = obj[p]
        else:
            return default
    return default if obj is None else obj


# ---------------------------------------------------------------- kustomization
KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "metadata", "namespace", "namePrefix", "nameSuffix", "resources",
    "components", "images", "labels", "commonAnnotations", "configMapGenerator",
    "secretGenerator", "generatorOptions", "patches", "replicas"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}


def check_kustomization(kdir, doc):
    """Known fields, every resource exists once, no manifest left out by accident."""
    errs = []
    if doc.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or doc.get("kind") != "Kustomization":
        errs.append("apiVersion/kind must be kustomize.config.k8s.io/v1beta1 Kustomization")
    errs += [f"unknown field {k!r}" for k in sorted(set(doc) - KUSTOMIZATION_FIELDS)]
    for i, image in enumerate(doc.get("images") or []):
        if not isinstance(image, dict) or "name" not in image:
            errs.append(f"images.{i}: needs a name")
        else:
            errs += [f"images.{i}: unknown field {k!r}" for k in sorted(set(image) - IMAGE_FIELDS)]
    resources = doc.get("resources")
    if not isinstance(resources, list) or not resources or \
            not all(isinstance(r, str) for r in resources):
        return errs + ["resources: must be a non-empty list of file names"], []
    for r in resources:
        if not os.path.isfile(os.path.join(kdir, r)):
            errs.append(f"resources: {r!r} does not exist")
    if len(set(resources)) != len(resources):
        errs.append("resources: listed twice")
    listed = {os.path.normpath(r) for r in resources}
    for p in sorted(glob.glob(os.path.join(kdir, "*.yaml")) + glob.glob(os.path.join(kdir, "*.yml"))):
        base = os.path.basename(p)
        if base.startswith("kustomization.") or base in listed or base in EXCLUDED_ON_PURPOSE:
            continue
        errs.append(f"{base} is not in resources (add it, or to EXCLUDED_ON_PURPOSE in "
                    "deploy/checks/crossrefs.py if it is a template)")
    return errs, resources


# ---------------------------------------------------------------- API-server rules
# Checks the API server makes in code rather than in the OpenAPI schema.
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
                        port = port if isinstance(port, dict) else {}
                        name = port.get("name")
                        if name is not None and (len(name) > 15 or not PORT_NAME.match(name)):
                            errs.append(f"{p}.{i}.name: {name!r} is not a valid port name")
                        for key in ("containerPort", "port"):
                            n = port.get(key)
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
        ru = g(spec, "strategy", "rollingUpdate", default={})
        if ru and str(ru.get("maxSurge", 1)) in ("0", "0%") \
                and str(ru.get("maxUnavailable", 1)) in ("0", "0%"):
            errs.append("spec.strategy.rollingUpdate: maxSurge and maxUnavailable cannot both be 0")
        sel = g(spec, "selector", "matchLabels", default={})
        tl = g(spec, "template", "metadata", "labels", default={})
        if any(tl.get(k) != v for k, v in sel.items()):
            errs.append("spec.template.metadata.labels: do not match spec.selector")
    return errs


# ---------------------------------------------------------------- KEDA rules
# What KEDA's admission webhook and rabbitmq scaler enforce at run time; the vendored
# CRD schemas check fields and types only.
RABBITMQ_METADATA = {
    "host", "hostFromEnv", "usernameFromEnv", "passwordFromEnv", "protocol",
    "queueName", "mode", "value", "activationValue", "vhostName", "useRegex",
    "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl",
    "queueLength",
}
NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?$")


def keda_rules(doc):
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
        if "activationValue" in md and not NUMBER.match(str(md["activationValue"])):
            errs.append(f"{where}.activationValue: must be a number in a string")
        if not (md.get("host") or md.get("hostFromEnv") or trig.get("authenticationRef")):
            errs.append(f"{where}: needs host, hostFromEnv or an authenticationRef")
        if md.get("host") and "@" in md["host"]:
            errs.append(f"{where}.host: holds credentials; use a TriggerAuthentication")
    return errs


# ---------------------------------------------------------------- the configuration
def credentials_in_config(text):
    """A ConfigMap is no place for credentials (deployment policy, not a config rule)."""
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []  # the binary reports the syntax error
    errs = []
    if "url" in (cfg.get("amqp") or {}):
        errs.append("config.toml: amqp.url holds the broker password; set "
                    "SEGMENT_BRIDGE__AMQP__URL from the Secret instead")
    for region in ("us", "eu"):
        if g(cfg, "segment", region, "write_key"):
            errs.append(f"config.toml: segment.{region}.write_key must not be in a ConfigMap; "
                        "it comes from the Secret via the environment")
    for name, source in (g(cfg, "intake", "sources", default={}) or {}).items():
        for key in ("secret", "previous_secret"):
            if isinstance(source, dict) and source.get(key):
                errs.append(f"config.toml: intake.sources.{name}.{key} must not be in a "
                            "ConfigMap; it comes from the Secret via the environment")
    return errs


def pod_env(deployments):
    """The SEGMENT_BRIDGE__ environment the Deployments give their pods, Secret values
    replaced by placeholders; optional Secret keys are left out (a pod may lack them)."""
    env = {}
    for dep in deployments:
        for c in g(dep, "spec", "template", "spec", "containers", default=[]):
            for e in c.get("env") or []:
                name = e.get("name", "")
                if not name.startswith("SEGMENT_BRIDGE__"):
                    continue
                ref = g(e, "valueFrom", "secretKeyRef")
                if ref is not None:
                    if not ref.get("optional"):
                        env[name] = AMQP_PLACEHOLDER if name.endswith("AMQP__URL") \
                            else "placeholder-from-secret"
                elif "value" in e:
                    env[name] = str(e["value"])
    return env


def parse_report(text):
    """The settings and sources in `check --offline`'s report."""
    settings = {}
    sources = []
    for line in text.splitlines():
        m = re.match(r"^([a-z_.]+) = (.*)$", line)
        if m:
            settings[m.group(1)] = m.group(2)
        m = re.match(r"^source ([a-z0-9_]+):", line)
        if m:
            sources.append(m.group(1))
    settings["sources"] = sources
    return settings


def run_bridge(bridge, config_text, env):
    """(report, settings or None) from `segment-bridge check --offline` on config_text."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config_text)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_BRIDGE")}
        clean.update(env)
        clean["RUST_LOG"] = "error"
        done = subprocess.run([os.path.abspath(bridge), "check", "--offline", "--config", path], cwd=tmp,
                              env=clean, capture_output=True, text=True, timeout=60)
    report = (done.stdout + done.stderr).strip()
    return report, parse_report(done.stdout) if done.returncode == 0 else None


# ---------------------------------------------------------------- cross-references
def port_of(listen):
    return int(listen.rsplit(":", 1)[1]) if listen and ":" in listen else None


def crossrefs(objects, settings):
    """Errors between the manifests, and between them and the binary's settings."""
    xerrs = []

    def find(kind, name=None):
        return [d for d in objects if d.get("kind") == kind
                and (name is None or g(d, "metadata", "name") == name)]

    def one(kind):
        found = find(kind)
        if len(found) != 1:
            xerrs.append(f"expected exactly one {kind}, found {len(found)}")
            return None
        return found[0]

    def of(kind, comp):
        found = [d for d in find(kind) if g(d, "metadata", "labels", COMPONENT) == comp]
        if len(found) != 1:
            xerrs.append(f"expected exactly one {kind} with {COMPONENT}={comp}, found {len(found)}")
            return None
        return found[0]

    def secret_keys(s):
        return set(g(s, "data", default={})) | set(g(s, "stringData", default={}))

    def selects(obj, what, pod_labels, match_labels=False):
        s = g(obj, "spec", "selector", default={})
        s = s.get("matchLabels", {}) if match_labels else s
        if not s or any(pod_labels.get(k) != v for k, v in s.items()):
            xerrs.append(f"{what} does not select the pods it is for")

    cm = one("ConfigMap")
    secrets = {g(s, "metadata", "name"): s for s in find("Secret")}
    grace = int(settings.get("shutdown.grace_period_s", 0))

    def check_pod(dep, who, command, extra_delay_s=0):
        name = g(dep, "metadata", "name")
        pod = g(dep, "spec", "template", "spec", default={})
        pod_labels = g(dep, "spec", "template", "metadata", "labels", default={})
        c = g(pod, "containers", 0, default={})
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
                        xerrs.append(f"Deployment {name}: ConfigMap key {item.get('key')!r} "
                                     "does not exist")
        mounts = {m.get("mountPath") for m in c.get("volumeMounts") or []}
        if "/etc/segment-bridge" not in mounts:
            xerrs.append(f"Deployment {name}: config is not mounted at /etc/segment-bridge")
        lport = port_of(settings.get("server.listen"))
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

    dep = of("Deployment", "worker")
    svc, pdb = of("Service", "worker"), of("PodDisruptionBudget", "worker")
    so, ta = one("ScaledObject"), one("TriggerAuthentication")
    idep = of("Deployment", "intake")
    isvc, ipdb = of("Service", "intake"), of("PodDisruptionBudget", "intake")
    ing, hpa = of("Ingress", "intake"), of("HorizontalPodAutoscaler", "intake")

    # ---- the worker
    if dep:
        pod_labels, ports, _, _ = check_pod(dep, "worker", "run")
        if "replicas" in dep.get("spec", {}) and so:
            xerrs.append("Deployment: spec.replicas is set although KEDA owns the replica count")
        if svc:
            selects(svc, "Service (worker) spec.selector", pod_labels)
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
                or g(target[0], "metadata", "labels", COMPONENT) != "worker":
            xerrs.append(f"ScaledObject: scaleTargetRef {ref} is not the worker Deployment")
        for t in g(so, "spec", "triggers", default=[]):
            auth = g(t, "authenticationRef", "name")
            if auth and g(t, "authenticationRef", "kind", default="TriggerAuthentication") \
                    == "TriggerAuthentication" and not find("TriggerAuthentication", auth):
                xerrs.append(f"ScaledObject: authenticationRef {auth!r} does not exist")
            q, want_q = g(t, "metadata", "queueName"), settings.get("amqp.queue")
            if t.get("type") == "rabbitmq" and q != want_q:
                xerrs.append(f"ScaledObject: queueName {q!r} is not the consumed queue {want_q!r}")
    if ta:
        for r in g(ta, "spec", "secretTargetRef", default=[]):
            secret = secrets.get(r.get("name"))
            if secret is None or r.get("key") not in secret_keys(secret):
                xerrs.append(f"TriggerAuthentication: secret {r.get('name')!r} key "
                             f"{r.get('key')!r} is not in a *secret.example.yaml")

    # ---- the intake
    if idep:
        drain_s = int(settings.get("intake.drain_delay_ms", 0)) / 1000
        ipod_labels, iports, ienv, ic = check_pod(idep, "intake", "intake", drain_s)
        if "replicas" in idep.get("spec", {}) and hpa:
            xerrs.append("Deployment segment-bridge-intake: spec.replicas is set although the "
                         "HPA owns the replica count")
        want = port_of(settings.get("intake.listen"))
        if iports.get("http") != want:
            xerrs.append(f"Deployment segment-bridge-intake: container port `http` "
                         f"({iports.get('http')}) is not intake.listen's port {want}")
        sources = settings.get("sources") or []
        if not sources:
            xerrs.append("config.toml: [intake.sources.*] is empty: the intake refuses to start")
        for name in sources:
            var = f"SEGMENT_BRIDGE__INTAKE__SOURCES__{name.upper()}__SECRET"
            if var not in ienv:
                xerrs.append(f"Deployment segment-bridge-intake: no env {var} for source "
                             f"{name!r} (the intake refuses to start without its secret)")
        if "SEGMENT_BRIDGE__AMQP__URL" not in ienv:
            xerrs.append("Deployment segment-bridge-intake: no env SEGMENT_BRIDGE__AMQP__URL")
        if hpa and g(ic, "resources", "requests", "cpu") is None:
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
                    xerrs.append(f"Service segment-bridge-intake: targetPort {t!r} is not a "
                                 "named container port")
        if ipdb:
            selects(ipdb, "PodDisruptionBudget segment-bridge-intake spec.selector.matchLabels",
                    ipod_labels, True)
        if hpa:
            ref = g(hpa, "spec", "scaleTargetRef", default={})
            if ref.get("kind") != "Deployment" or ref.get("name") != g(idep, "metadata", "name"):
                xerrs.append(f"HorizontalPodAutoscaler: scaleTargetRef {ref} is not the intake")
            lo = g(hpa, "spec", "minReplicas", default=1)
            hi = g(hpa, "spec", "maxReplicas", default=0)
            if lo < 2 or lo > hi:
                xerrs.append(f"HorizontalPodAutoscaler: minReplicas {lo} must be at least 2 (two "
                             f"intake replicas) and at most maxReplicas {hi}")
            metrics = [g(m, "resource", "name") for m in g(hpa, "spec", "metrics", default=[])
                       if m.get("type") == "Resource"]
            if "cpu" not in metrics:
                xerrs.append("HorizontalPodAutoscaler: the intake scales on CPU (a Resource cpu "
                             "metric)")
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
                    xerrs.append(f"Ingress: backend {backend.get('name')!r} is not the intake's "
                                 "Service")
                    continue
                names = {p.get("name") for p in g(isvc, "spec", "ports", default=[])}
                numbers = {p.get("port") for p in g(isvc, "spec", "ports", default=[])}
                port = g(backend, "port", default={})
                if port.get("name") not in names and port.get("number") not in numbers:
                    xerrs.append(f"Ingress: backend port {port} is not a port of the Service")
                if port.get("name") == "metrics":
                    xerrs.append("Ingress: the side port (metrics) must not be public")
        limit = g(ing, "metadata", "annotations", default={}).get(
            "nginx.ingress.kubernetes.io/proxy-body-size")
        if limit is not None:
            try:
                limit_bytes = quantity(str(limit).replace("k", "Ki").replace("m", "Mi")
                                       .replace("g", "Gi"))
            except ValueError:
                limit_bytes = None
                xerrs.append(f"Ingress: proxy-body-size {limit!r} is not a size")
            body = int(settings.get("intake.max_body_bytes", 0))
            if limit_bytes is not None and 0 < limit_bytes <= body:
                xerrs.append(f"Ingress: proxy-body-size {limit} must exceed intake.max_body_bytes "
                             f"({body}), so that the intake answers 413 itself")
    return xerrs


# ---------------------------------------------------------------- Dockerfile (static)
def dockerfile_rules(dockerfile):
    derrs = []
    try:
        with open(dockerfile, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return [str(e)]
    instrs, buf = [], ""  # continuation lines joined, comments dropped
    for line in lines:
        if not buf and line.lstrip().startswith("#"):
            continue
        cont = line.rstrip().endswith("\\")
        buf += line.rstrip().rstrip("\\").strip() + " " if cont else line.strip()
        if not cont:
            if buf.strip():
                instrs.append(buf.strip())
            buf = ""
    stages = [i for i in instrs if i.upper().startswith("FROM ")]
    last_stage = instrs[instrs.index(stages[-1]):] if stages else []

    def last(keyword):
        found = [i for i in last_stage if i.split(None, 1)[0].upper() == keyword]
        return found[-1].split(None, 1)[1] if found and " " in found[-1] else None

    if len(stages) < 2:
        derrs.append("expected a multi-stage build (builder + runtime)")
    for kw, want in (("ENTRYPOINT", ["/usr/local/bin/segment-bridge"]),
                     ("CMD", ["run", "--config", "/etc/segment-bridge/config.toml"])):
        val = last(kw)
        try:
            parsed = json.loads(val) if val else None
        except json.JSONDecodeError:
            parsed = None
        if parsed != want:
            derrs.append(f"{kw} must be the exec form {json.dumps(want)} (got {val!r}); "
                         "shell form would keep SIGTERM from reaching the worker")
    user = last("USER")
    if not user or user.split(":")[0] in ("0", "root"):
        derrs.append("final stage must set a non-root USER")
    elif not user.split(":")[0].isdigit():
        derrs.append("USER should be numeric so runAsNonRoot can verify it")
    for port in ("9464", "8080"):
        if port not in (last("EXPOSE") or "").split():
            derrs.append(f"final stage must EXPOSE {port} (9464 side port, 8080 intake)")
    if not any("--locked" in i for i in instrs):
        derrs.append("cargo build must use --locked")
    ignore_file = dockerfile + ".dockerignore"
    if os.path.isfile(ignore_file):
        with open(ignore_file, encoding="utf-8") as f:
            patterns = [ln.strip().rstrip("/") for ln in f
                        if ln.strip() and not ln.lstrip().startswith("#")]
        for needed in ("src", "Cargo.toml", "Cargo.lock", "tests", "benches", ".", "*", "**"):
            if needed in patterns:
                derrs.append(f"{os.path.basename(ignore_file)} excludes {needed!r}, which the "
                             "build needs")
    return derrs


# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bridge", required=True, help="the segment-bridge binary")
    ap.add_argument("deploy", help="the deploy/ directory")
    args = ap.parse_args(argv)
    kdir = os.path.join(args.deploy, "kubernetes")
    failed = False

    def report(what, errs, detail):
        nonlocal failed
        failed = failed or bool(errs)
        print(f"{'FAIL' if errs else 'OK  '}  {what}: {detail}")
        for e in errs:
            print(f"        - {e}")

    kpath = os.path.join(kdir, "kustomization.yaml")
    kdocs, kerrs = load_file(kpath)
    if len(kdocs) == 1:
        more, _ = check_kustomization(kdir, kdocs[0])
        kerrs += more
    elif not kerrs:
        kerrs.append("must hold exactly one YAML document")
    report("kubernetes/kustomization.yaml", kerrs,
           f"resources exist, none forgotten (templates not applied: "
           f"{', '.join(sorted(EXCLUDED_ON_PURPOSE))})")

    objects = []
    paths = sorted(p for p in glob.glob(os.path.join(kdir, "*.yaml")) + glob.glob(os.path.join(kdir, "*.yml"))
                   if not os.path.basename(p).startswith("kustomization."))
    for path in paths:
        docs, errs = load_file(path)
        for doc in docs:
            errs += apiserver_rules(doc) + keda_rules(doc)
            if doc.get("kind") == "ConfigMap" and "config.toml" in (doc.get("data") or {}):
                errs += credentials_in_config(doc["data"]["config.toml"])
        objects += docs
        kinds = ", ".join(f"{d.get('kind')}/{g(d, 'metadata', 'name')}" for d in docs)
        report(os.path.relpath(path, args.deploy), errs,
               f"{kinds} [strict YAML, API-server and KEDA rules]")

    configmaps = [d for d in objects if d.get("kind") == "ConfigMap"
                  and "config.toml" in (d.get("data") or {})]
    settings = None
    if len(configmaps) != 1:
        report("config.toml", [f"expected one ConfigMap with config.toml, found {len(configmaps)}"],
               "not checked")
    else:
        env = pod_env([d for d in objects if d.get("kind") == "Deployment"])
        out, settings = run_bridge(args.bridge, configmaps[0]["data"]["config.toml"], env)
        report("config.toml (ConfigMap)", [] if settings is not None else [out],
               "`segment-bridge check --offline` with the Deployments' environment "
               f"({len(env)} SEGMENT_BRIDGE__ variables, Secret values as placeholders)")
        print("\n".join("        | " + line for line in out.splitlines()))
    if settings is not None:
        report("(cross-references)", crossrefs(objects, settings),
               "worker and intake: Secret/ConfigMap keys, selectors, probe and listen ports, "
               "grace periods; KEDA target/auth/queue; intake source secrets, Ingress TLS -> "
               "Service -> pods, HPA")
    else:
        report("(cross-references)", ["skipped: the configuration is not valid"], "not checked")

    report("Dockerfile", dockerfile_rules(os.path.join(args.deploy, "Dockerfile")),
           "static checks only (multi-stage, exec-form ENTRYPOINT/CMD, numeric non-root USER, "
           "EXPOSE 9464 8080, --locked, Dockerfile.dockerignore keeps the sources); "
           "SKIPPED: docker build (no Docker engine here)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

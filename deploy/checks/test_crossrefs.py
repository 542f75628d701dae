"""Each check of crossrefs.py fails on a manifest broken on purpose, and passes the real ones.

    python3 -m unittest discover -s deploy/checks -t deploy/checks

The last test runs all of validate.sh on a copy of deploy/ whose ConfigMap sets
`max_batch_events = 1`: it must be refused because the binary refuses it. It needs the
binary (SEGMENT_BRIDGE_BIN, or target/debug/segment-bridge) and the tools validate.sh
installs; validate.sh runs these tests with both.
"""

import copy
import glob
import os
import shutil
import subprocess
import tempfile
import unittest

import crossrefs as cr

DEPLOY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KDIR = os.path.join(DEPLOY, "kubernetes")
# What `check --offline` reports for the real ConfigMap.
SETTINGS = {
    "amqp.queue": "segment-bridge.sessions",
    "server.listen": "0.0.0.0:9464",
    "shutdown.grace_period_s": "25",
    "intake.listen": "0.0.0.0:8080",
    "intake.max_body_bytes": "524288",
    "intake.drain_delay_ms": "5000",
    "sources": ["jebbit_eu", "jebbit_us", "joturl_cta"],
}


def real_objects():
    objects = []
    for path in sorted(glob.glob(os.path.join(KDIR, "*.yaml"))):
        if not path.endswith("kustomization.yaml"):
            docs, errs = cr.load_file(path)
            assert not errs, (path, errs)
            objects += docs
    return objects


def obj(objects, kind, name=None):
    return next(d for d in objects if d["kind"] == kind
                and (name is None or d["metadata"]["name"] == name))


def container(objects, name):
    return obj(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


class CrossRefs(unittest.TestCase):
    def setUp(self):
        self.objects = real_objects()

    def errors(self, settings=SETTINGS):
        return "\n".join(cr.crossrefs(self.objects, settings))

    def assertRefused(self, fragment, settings=SETTINGS):
        errors = self.errors(settings)
        self.assertIn(fragment, errors)

    def test_the_real_manifests_pass(self):
        self.assertEqual(cr.crossrefs(self.objects, SETTINGS), [])

    def test_env_from_a_secret_key_the_template_lacks(self):
        env = container(self.objects, "segment-bridge")["env"]
        ref = next(e for e in env if "valueFrom" in e)["valueFrom"]["secretKeyRef"]
        ref["key"] = "no-such-key"
        self.assertRefused("reads key 'no-such-key'")

    def test_a_credential_as_a_plain_value(self):
        container(self.objects, "segment-bridge")["env"].append(
            {"name": "SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY", "value": "x"})
        self.assertRefused("is a credential; use secretKeyRef")

    def test_a_service_selecting_no_pod(self):
        obj(self.objects, "Service", "segment-bridge")["spec"]["selector"] = {"app": "other"}
        self.assertRefused("Service (worker) spec.selector does not select")

    def test_a_pdb_selecting_no_intake_pod(self):
        pdb = obj(self.objects, "PodDisruptionBudget", "segment-bridge-intake")
        pdb["spec"]["selector"]["matchLabels"] = {"app": "other"}
        self.assertRefused("PodDisruptionBudget segment-bridge-intake spec.selector")

    def test_a_probe_on_an_unnamed_port(self):
        container(self.objects, "segment-bridge")["readinessProbe"]["httpGet"]["port"] = "nope"
        self.assertRefused("readinessProbe port 'nope' is not a named container port")

    def test_server_listen_on_a_port_the_pod_does_not_open(self):
        self.assertRefused("server.listen port 9999",
                           {**SETTINGS, "server.listen": "0.0.0.0:9999"})

    def test_a_configmap_key_that_does_not_exist(self):
        vols = obj(self.objects, "Deployment", "segment-bridge")["spec"]["template"]["spec"]["volumes"]
        next(v for v in vols if "configMap" in v)["configMap"]["items"] = [{"key": "x", "path": "x"}]
        self.assertRefused("ConfigMap key 'x' does not exist")

    def test_worker_grace_period_not_above_the_binarys(self):
        self.assertRefused("terminationGracePeriodSeconds (40) must exceed shutdown.grace_period_s",
                           {**SETTINGS, "shutdown.grace_period_s": "40"})

    def test_intake_grace_period_not_above_drain_plus_grace(self):
        self.assertRefused("must exceed intake.drain_delay_ms + shutdown.grace_period_s",
                           {**SETTINGS, "intake.drain_delay_ms": "20000"})

    def test_replicas_under_keda(self):
        obj(self.objects, "Deployment", "segment-bridge")["spec"]["replicas"] = 2
        self.assertRefused("KEDA owns the replica count")

    def test_keda_scaling_another_deployment(self):
        obj(self.objects, "ScaledObject")["spec"]["scaleTargetRef"]["name"] = "segment-bridge-intake"
        self.assertRefused("is not the worker Deployment")

    def test_keda_authentication_that_does_not_exist(self):
        trig = obj(self.objects, "ScaledObject")["spec"]["triggers"][0]
        trig["authenticationRef"]["name"] = "missing"
        self.assertRefused("authenticationRef 'missing' does not exist")

    def test_keda_watching_another_queue(self):
        self.assertRefused("is not the consumed queue 'other'", {**SETTINGS, "amqp.queue": "other"})

    def test_trigger_authentication_reading_a_missing_secret_key(self):
        obj(self.objects, "TriggerAuthentication")["spec"]["secretTargetRef"][0]["key"] = "nope"
        self.assertRefused("key 'nope' is not in a *secret.example.yaml")

    def test_a_source_without_its_secret_env(self):
        self.assertRefused("no env SEGMENT_BRIDGE__INTAKE__SOURCES__NEW_ONE__SECRET",
                           {**SETTINGS, "sources": SETTINGS["sources"] + ["new_one"]})

    def test_no_source(self):
        self.assertRefused("[intake.sources.*] is empty", {**SETTINGS, "sources": []})

    def test_intake_listen_not_the_http_port(self):
        self.assertRefused("is not intake.listen's port 8081",
                           {**SETTINGS, "intake.listen": "0.0.0.0:8081"})

    def test_intake_without_a_cpu_request_under_a_cpu_hpa(self):
        del container(self.objects, "segment-bridge-intake")["resources"]["requests"]["cpu"]
        self.assertRefused("an HPA on CPU needs resources.requests.cpu")

    def test_intake_service_publishing_not_ready_pods(self):
        obj(self.objects, "Service", "segment-bridge-intake")["spec"]["publishNotReadyAddresses"] = True
        self.assertRefused("must not publish not-ready pods")

    def test_hpa_with_one_replica(self):
        obj(self.objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] = 1
        self.assertRefused("minReplicas 1 must be at least 2")

    def test_hpa_on_another_target(self):
        obj(self.objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] = "x"
        self.assertRefused("is not the intake")

    def test_ingress_without_tls(self):
        del obj(self.objects, "Ingress")["spec"]["tls"]
        self.assertRefused("spec.tls with a secretName is required")

    def test_ingress_routing_more_than_webhooks(self):
        ing = obj(self.objects, "Ingress")
        ing["spec"]["rules"][0]["http"]["paths"][0]["path"] = "/"
        self.assertRefused("only /webhooks is public")

    def test_ingress_to_another_service(self):
        path = obj(self.objects, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]
        path["backend"]["service"]["name"] = "segment-bridge"
        self.assertRefused("is not the intake's Service")

    def test_ingress_to_the_metrics_port(self):
        path = obj(self.objects, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]
        path["backend"]["service"]["port"] = {"name": "metrics"}
        self.assertRefused("the side port (metrics) must not be public")

    def test_ingress_body_limit_not_above_the_intakes(self):
        self.assertRefused("must exceed intake.max_body_bytes",
                           {**SETTINGS, "intake.max_body_bytes": str(2 * 1024 * 1024)})


class ApiServerAndKedaRules(unittest.TestCase):
    def setUp(self):
        self.objects = real_objects()

    def test_the_real_manifests_pass(self):
        for doc in self.objects:
            self.assertEqual(cr.apiserver_rules(doc) + cr.keda_rules(doc), [], doc["kind"])

    def test_requests_above_limits_and_bad_quantities(self):
        dep = copy.deepcopy(obj(self.objects, "Deployment", "segment-bridge"))
        res = dep["spec"]["template"]["spec"]["containers"][0]["resources"]
        res["requests"]["memory"] = "1Gi"
        res["limits"]["memory"] = "128Mi"
        res["requests"]["cpu"] = "lots"
        errors = "\n".join(cr.apiserver_rules(dep))
        self.assertIn("requests.memory exceeds limits.memory", errors)
        self.assertIn("'lots' is not a quantity", errors)

    def test_label_values_and_port_names(self):
        svc = copy.deepcopy(obj(self.objects, "Service", "segment-bridge"))
        svc["metadata"]["labels"]["x"] = "-bad-"
        svc["spec"]["ports"][0]["name"] = "Metrics_Port"
        errors = "\n".join(cr.apiserver_rules(svc))
        self.assertIn("invalid label value '-bad-'", errors)
        self.assertIn("is not a valid port name", errors)

    def test_pdb_with_both_fields_and_a_rollout_that_cannot_move(self):
        pdb = copy.deepcopy(obj(self.objects, "PodDisruptionBudget", "segment-bridge"))
        pdb["spec"]["minAvailable"] = 1
        self.assertIn("exactly one of", "\n".join(cr.apiserver_rules(pdb)))
        dep = copy.deepcopy(obj(self.objects, "Deployment", "segment-bridge"))
        dep["spec"]["strategy"]["rollingUpdate"] = {"maxSurge": 0, "maxUnavailable": 0}
        dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] = "other"
        errors = "\n".join(cr.apiserver_rules(dep))
        self.assertIn("cannot both be 0", errors)
        self.assertIn("do not match spec.selector", errors)

    def test_keda_min_above_max_and_rabbitmq_parameters(self):
        so = copy.deepcopy(obj(self.objects, "ScaledObject"))
        so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"] = 5, 2
        md = so["spec"]["triggers"][0]["metadata"]
        md["queueNmae"] = md.pop("queueName")
        md["value"] = "-1"
        errors = "\n".join(cr.keda_rules(so))
        self.assertIn("minReplicaCount 5 > maxReplicaCount 2", errors)
        self.assertIn("unknown rabbitmq scaler parameter 'queueNmae'", errors)
        self.assertIn("queueName is required", errors)
        self.assertIn("value: must be a positive number", errors)


class FilesAndConfig(unittest.TestCase):
    def test_duplicate_keys_and_bad_names(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "x.yaml")
            with open(path, "w") as f:
                f.write("apiVersion: v1\nkind: Service\nkind: Service\n")
            self.assertIn("duplicate key 'kind'", cr.load_file(path)[1][0])
            with open(path, "w") as f:
                f.write("apiVersion: v1\nkind: Service\nmetadata: {name: Not_DNS}\n")
            self.assertIn("not a valid DNS-1123 name", cr.load_file(path)[1][0])

    def test_kustomization_missing_forgotten_and_unknown(self):
        with tempfile.TemporaryDirectory() as tmp:
            kdir = os.path.join(tmp, "kubernetes")
            shutil.copytree(KDIR, kdir)
            (doc,), _ = cr.load_file(os.path.join(kdir, "kustomization.yaml"))
            self.assertEqual(cr.check_kustomization(kdir, doc)[0], [])
            doc["resources"].remove("pdb.yaml")
            doc["resources"].append("gone.yaml")
            doc["commonLables"] = {}
            errors = "\n".join(cr.check_kustomization(kdir, doc)[0])
            self.assertIn("'gone.yaml' does not exist", errors)
            self.assertIn("pdb.yaml is not in resources", errors)
            self.assertIn("unknown field 'commonLables'", errors)

    def test_credentials_in_the_configmap(self):
        text = ('[amqp]\nurl = "amqp://u:p@h/%2f"\n[segment.us]\nwrite_key = "k"\n'
                '[intake.sources.a]\nkind = "jebbit"\nsecret = "s"\n')
        errors = "\n".join(cr.credentials_in_config(text))
        for key in ("amqp.url", "segment.us.write_key", "intake.sources.a.secret"):
            self.assertIn(key, errors)

    def test_pod_env_replaces_secrets_and_leaves_out_optional_ones(self):
        objects = real_objects()
        env = cr.pod_env([d for d in objects if d["kind"] == "Deployment"])
        self.assertTrue(env["SEGMENT_BRIDGE__AMQP__URL"].startswith("amqp://placeholder"))
        self.assertIn("SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__SECRET", env)
        self.assertNotIn("SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__PREVIOUS_SECRET", env)
        self.assertNotIn("RUST_LOG", env)

    def test_dockerfile_shell_form_and_root(self):
        self.assertEqual(cr.dockerfile_rules(os.path.join(DEPLOY, "Dockerfile")), [])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "Dockerfile")
            with open(path, "w") as f:
                f.write("FROM a AS b\nRUN cargo build\nFROM c\nCMD segment-bridge run\n")
            errors = "\n".join(cr.dockerfile_rules(path))
        for fragment in ("CMD must be the exec form", "non-root USER", "EXPOSE 9464", "--locked"):
            self.assertIn(fragment, errors)


def bridge_binary():
    path = os.environ.get("SEGMENT_BRIDGE_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.path.dirname(DEPLOY), "target"),
        "debug", "segment-bridge")
    return path if os.path.isfile(path) else None


@unittest.skipIf(bridge_binary() is None, "no segment-bridge binary (build it, or set SEGMENT_BRIDGE_BIN)")
class NoDrift(unittest.TestCase):
    def validate(self, edit):
        """validate.sh's exit status and output on a copy of deploy/ with `edit` applied to
        the ConfigMap's text."""
        with tempfile.TemporaryDirectory() as tmp:
            copy_dir = os.path.join(tmp, "deploy")
            shutil.copytree(DEPLOY, copy_dir, ignore=shutil.ignore_patterns("__pycache__"))
            cm = os.path.join(copy_dir, "kubernetes", "configmap.yaml")
            with open(cm, encoding="utf-8") as f:
                text = f.read()
            with open(cm, "w", encoding="utf-8") as f:
                f.write(edit(text))
            env = {**os.environ, "SEGMENT_BRIDGE_BIN": bridge_binary(),
                   "DEPLOY_VALIDATE_NO_UNITTESTS": "1"}
            done = subprocess.run(["bash", os.path.join(DEPLOY, "validate.sh"), copy_dir],
                                  env=env, capture_output=True, text=True, timeout=600)
        return done.returncode, done.stdout + done.stderr

    def test_validate_refuses_what_the_binary_refuses(self):
        for key in ("max_batch_events", "max_batch_bytes"):
            def one(text, key=key):
                lines = [ln for ln in text.splitlines() if not ln.strip().startswith(key)]
                i = next(i for i, ln in enumerate(lines) if ln.strip() == "[segment]")
                lines.insert(i + 1, f"    {key} = 1")
                return "\n".join(lines) + "\n"

            rc, out = self.validate(one)
            self.assertNotEqual(rc, 0, out)
            self.assertIn("FAIL  config.toml (ConfigMap)", out)
            self.assertIn(f"segment.{key}", out)


if __name__ == "__main__":
    unittest.main()

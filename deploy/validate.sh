#!/usr/bin/env bash
# Offline validation of everything under deploy/ (see deploy/README.md, "Validation").
#
#   bash deploy/validate.sh [DEPLOY_DIR]      # default: this script's directory
#
# Needs python3 with pip, cargo, and PyPI. Tools go into a temporary directory with
# `pip install --target` (no venv, no root; works with Debian's externally managed
# Python); DEPLOY_VALIDATE_CACHE=/some/dir keeps and reuses them. The binary is built
# from this repository unless SEGMENT_BRIDGE_BIN names one.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
deploy="$(cd "${1:-$here}" && pwd)"
PYTHON="${PYTHON:-python3}"
K8S_VERSIONS="${K8S_VERSIONS:-1.29 1.37}"   # the oldest we target and the newest bundled
REQS=(
  "kubernetes-validate==1.37.0"   # Kubernetes 1.25 ... 1.37 schemas, strict mode
  "check-jsonschema==0.39.0"      # the vendored KEDA CRD schemas
  "PyYAML>=6,<7"                  # deploy/checks/crossrefs.py
  'tomli>=2; python_version < "3.11"'
)
start=$(date +%s)

"$PYTHON" -m pip --version >/dev/null 2>&1 ||
  { echo "FATAL: '$PYTHON -m pip' is missing (Debian: apt-get install python3-pip)" >&2; exit 2; }
if [[ -n "${DEPLOY_VALIDATE_CACHE:-}" ]]; then
  mkdir -p "$DEPLOY_VALIDATE_CACHE"; libdir="$DEPLOY_VALIDATE_CACHE/site-packages"
else
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT; libdir="$tmp/site-packages"
fi
want="$("$PYTHON" -c 'import sys; print("py%d.%d" % sys.version_info[:2])') ${REQS[*]}"
if [[ "$(cat "$libdir/.installed" 2>/dev/null)" != "$want" ]]; then
  echo "installing validation tools from PyPI into $libdir ..."
  rm -rf "$libdir" && mkdir -p "$libdir"
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check \
    --no-input --no-warn-script-location --target "$libdir" "${REQS[@]}"
  printf '%s' "$want" >"$libdir/.installed"
fi
export PYTHONPATH="$libdir" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1

bridge="${SEGMENT_BRIDGE_BIN:-}"
if [[ -z "$bridge" ]]; then
  (cd "$repo" && cargo build --quiet --locked --bin segment-bridge)
  bridge="$(cd "$repo" && cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/segment-bridge"
fi
[[ -x "$bridge" ]] || { echo "FATAL: no segment-bridge binary at $bridge" >&2; exit 2; }
bridge="$(cd "$(dirname "$bridge")" && pwd)/$(basename "$bridge")"

rc=0
cd "$deploy/kubernetes"
manifests=(); keda=()
for f in *.yaml; do
  [[ "$f" == kustomization.yaml ]] && continue
  if grep -q '^apiVersion: keda\.sh/' "$f"; then keda+=("$f"); else manifests+=("$f"); fi
done
# Built-in kinds: a kind without a schema is only a warning there, so any WARN fails.
for v in $K8S_VERSIONS; do
  out="$("$PYTHON" -m kubernetes_validate --strict --quiet -k "$v" "${manifests[@]}" 2>&1)" || rc=1
  if [[ -n "$out" ]]; then rc=1; echo "FAIL  kubernetes-validate --strict -k $v:"; echo "$out"
  else echo "OK    kubernetes-validate --strict -k $v: ${manifests[*]}"; fi
done
for f in "${keda[@]}"; do
  kind="$(sed -n 's/^kind: *//p' "$f" | tr 'A-Z' 'a-z')"
  schema="$here/schemas/keda/${kind}_v1alpha1.json"
  if out="$("$PYTHON" -m check_jsonschema --schemafile "$schema" "$f" 2>&1)"; then
    echo "OK    $f: KEDA CRD schema ${schema#"$repo"/}"
  else rc=1; echo "FAIL  $f: KEDA CRD schema ${schema#"$repo"/}"; echo "$out"; fi
done
cd "$here"
# Cross-references, the API server's and KEDA's own rules, the configuration (by the
# binary), the Dockerfile; then the unit tests of those checks.
"$PYTHON" checks/crossrefs.py --bridge "$bridge" "$deploy" || rc=1
if [[ -z "${DEPLOY_VALIDATE_NO_UNITTESTS:-}" ]]; then
  if out="$(SEGMENT_BRIDGE_BIN="$bridge" DEPLOY_VALIDATE_CACHE="$(dirname "$libdir")" \
    "$PYTHON" -m unittest discover -s checks -t checks -q 2>&1)"
  then echo "OK    deploy/checks unit tests: $(grep -o 'Ran [0-9]* tests' <<<"$out")"
  else rc=1; echo "FAIL  deploy/checks unit tests:"; echo "$out"; fi
fi

elapsed=$(( $(date +%s) - start ))
[[ $rc -eq 0 ]] && echo "deploy/ is valid (${elapsed}s)" || echo "deploy/ has problems, see FAIL lines above (${elapsed}s)"
exit "$rc"

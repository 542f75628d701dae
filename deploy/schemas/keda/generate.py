"""Regenerates the vendored KEDA schemas in this directory (see README.md).

    pip install --target /tmp/keda-models "cloudcoil-models-keda==2.16.1.0"
    PYTHONPATH=/tmp/keda-models python3 deploy/schemas/keda/generate.py

cloudcoil-models-keda's pydantic models are generated from KEDA's CRDs; their JSON
schema (by alias, i.e. the CRDs' camelCase field names) is written here with one change:
every object that lists its properties gets `additionalProperties: false`, because the
API server rejects unknown fields of a structural CRD (kubectl's default server-side field
validation is Strict) while pydantic's schema would allow them.
"""

import json
import os

from cloudcoil.models.keda import v1alpha1

HERE = os.path.dirname(os.path.abspath(__file__))


def strict(node):
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


for model, name in [(v1alpha1.ScaledObject, "scaledobject_v1alpha1.json"),
                    (v1alpha1.TriggerAuthentication, "triggerauthentication_v1alpha1.json")]:
    schema = strict(model.model_json_schema(by_alias=True, mode="validation"))
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        json.dump(schema, f, indent=1, sort_keys=True)
        f.write("\n")

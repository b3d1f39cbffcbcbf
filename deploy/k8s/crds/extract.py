"""Write the openAPIV3Schema of KServe's CRDs that deploy/k8s/kserve-inferenceservice.yaml uses
(ServingRuntime v1alpha1, InferenceService v1beta1) from a KServe checkout's
config/crd/full/serving.kserve.io_<plural>.yaml into <plural>.json here (tests/deploy/test_kube_play.py
validates the manifests against them).

Only the served storage version's schema is kept, with its group, version and kind. Subschemas that
occur more than once (the container and pod specs are repeated dozens of times) are stored once
under `$defs` and referred to by `$ref`: the same schema, a tenth of the size (the upstream
InferenceService CRD is 2 MB of YAML). Nothing is dropped or loosened.

    python deploy/k8s/crds/extract.py /path/to/kserve   # a checkout of the tag named in README.md
"""

from __future__ import annotations

import collections
import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = ("servingruntimes", "inferenceservices")
MIN_SHARED = 200  # characters of canonical JSON: smaller repeated subschemas stay inline

# The keywords of a (Kubernetes structural) schema whose values are schemas, or maps/lists of them.
ONE, MAP, MANY = ("items", "not", "additionalProperties"), ("properties",), ("allOf", "anyOf", "oneOf")


def canonical(node: object) -> str:
    """`node` as one canonical JSON string (its identity as a subschema)."""
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def subschemas(schema: dict) -> list[dict]:
    """The schemas directly inside `schema`."""
    found = [schema[k] for k in ONE if isinstance(schema.get(k), dict)]
    found += [s for k in MAP for s in schema.get(k, {}).values()]
    found += [s for k in MANY for s in schema.get(k, [])]
    return found


def deduplicate(root: dict) -> dict:
    """`root` with every subschema that occurs more than once stored once under `$defs`."""
    counts: collections.Counter[str] = collections.Counter()

    def count(schema: dict) -> None:
        counts[canonical(schema)] += 1
        for sub in subschemas(schema):
            count(sub)

    count(root)
    defs: dict[str, dict] = {}

    def rewrite(schema: dict, top: bool = False) -> dict:
        text = canonical(schema)
        if not top and counts[text] > 1 and len(text) >= MIN_SHARED:
            key = hashlib.sha256(text.encode()).hexdigest()[:12]
            if key not in defs:
                defs[key] = {}
                defs[key] = rewrite_inside(schema)
            return {"$ref": f"#/$defs/{key}"}
        return rewrite_inside(schema)

    def rewrite_inside(schema: dict) -> dict:
        out = dict(schema)
        for k in ONE:
            if isinstance(schema.get(k), dict):
                out[k] = rewrite(schema[k])
        for k in MAP:
            if k in schema:
                out[k] = {name: rewrite(s) for name, s in schema[k].items()}
        for k in MANY:
            if k in schema:
                out[k] = [rewrite(s) for s in schema[k]]
        return out

    result = rewrite(root, top=True)
    result["$defs"] = dict(sorted(defs.items()))
    return result


def extract(crd: dict) -> dict:
    """The group, storage version, kind and (deduplicated) schema of one CRD."""
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return {
        "group": crd["spec"]["group"],
        "version": version["name"],
        "kind": crd["spec"]["names"]["kind"],
        "openAPIV3Schema": deduplicate(version["schema"]["openAPIV3Schema"]),
    }


def main(kserve: Path) -> None:
    """Write <plural>.json here for each CRD of `CRDS` in the KServe checkout `kserve`."""
    for plural in CRDS:
        source = kserve / "config" / "crd" / "full" / f"serving.kserve.io_{plural}.yaml"
        crd = yaml.safe_load(source.read_text())
        (HERE / f"{plural}.json").write_text(json.dumps(extract(crd), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

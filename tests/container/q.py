#!/usr/bin/env python3
"""Query a YAML manifest or a `docker save` tarball from the container tests.

    q.py FILE EXPR   prints EXPR, evaluated with `d` bound to FILE's contents, as compact JSON

FILE ending in .tar is read as a docker-save archive, and `d` is
    {"tags": [...], "config": <image config's "config">, "layers": [[member names], ...]}
Anything else is YAML and must hold exactly one document (a static pod manifest is one object).
EXPR is Python written by the test itself, e.g. 'd["spec"]["hostNetwork"]'. A missing key or
index prints "MISSING" rather than a traceback, so a check fails with a readable value.
"""

import json
import sys
import tarfile

import yaml


def load_tar(path):
    with tarfile.open(path) as t:
        manifest = json.load(t.extractfile("manifest.json"))
        if len(manifest) != 1:
            sys.exit(f"{path}: {len(manifest)} images, expected 1")
        m = manifest[0]
        config = json.load(t.extractfile(m["Config"]))
        layers = []
        for name in m["Layers"]:
            with tarfile.open(fileobj=t.extractfile(name)) as layer:
                layers.append(sorted(layer.getnames()))
    return {"tags": m.get("RepoTags") or [], "config": config.get("config") or {}, "layers": layers}


def load_yaml(path):
    with open(path) as f:
        docs = [doc for doc in yaml.safe_load_all(f) if doc is not None]
    if len(docs) != 1:
        sys.exit(f"{path}: {len(docs)} YAML documents, expected 1")
    return docs[0]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, expr = sys.argv[1:]
    d = load_tar(path) if path.endswith(".tar") else load_yaml(path)
    try:
        value = eval(expr, {"d": d})  # noqa: S307 - the expression comes from our own test
    except (KeyError, IndexError, TypeError):
        print("MISSING")
        return
    print(json.dumps(value, sort_keys=True, separators=(",", ":")))


if __name__ == "__main__":
    main()

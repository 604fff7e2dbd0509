"""Copy the sources of truth into the Kubernetes manifests that embed them.

    python deploy/render.py            # rewrite the embedded blocks
    python deploy/render.py --check    # exit 1, naming the file, when one is out of date

- `deploy/serve.yaml` is the `serveConfigV2: |` block of `deploy/kuberay/rayservice.yaml`;
- `deploy/prometheus/rules.yml` is the `spec:` of `deploy/kuberay/prometheusrule.yaml`.

Each source is copied verbatim (comments included), indented under its key; everything
else in the manifests is written by hand and left as it is.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from sinkprune.cli_args import Parser, add_version_flag, error_line

DEPLOY = Path(__file__).resolve().parent
# (manifest, key, source, the key's value is a literal block scalar)
EMBEDDED = [
    (DEPLOY / "kuberay" / "rayservice.yaml", "serveConfigV2", DEPLOY / "serve.yaml", True),
    (DEPLOY / "kuberay" / "prometheusrule.yaml", "spec", DEPLOY / "prometheus" / "rules.yml", False),
]


def embed(manifest: str, key: str, source: str, literal: bool) -> str:
    """`manifest` with the block under `key:` (a top-level or nested mapping key) replaced by `source`."""
    marker = " |" if literal else ""
    header = rf"^(?P<indent> *){re.escape(key + ':' + marker)}[ \t]*$"
    matches = list(re.finditer(header, manifest, flags=re.MULTILINE))
    if len(matches) != 1:
        raise ValueError(f"expected one `{key}:{marker}` line, found {len(matches)}")
    match = matches[0]
    indent = len(match.group("indent"))
    lines = manifest[match.end() + 1:].splitlines(keepends=True)
    end = 0  # the block runs while lines are blank or indented deeper than the key
    for i, line in enumerate(lines):
        if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
            break
        end = i + 1
    while end and not lines[end - 1].strip():  # trailing blank lines belong to what follows
        end -= 1
    pad = " " * (indent + 2)
    block = "".join(pad + line if line.strip() else "\n" for line in source.splitlines(keepends=True))
    if not block.endswith("\n"):
        block += "\n"
    return manifest[:match.end() + 1] + block + "".join(lines[end:])


def check_embedded(manifest: str, key: str, source: str, literal: bool) -> None:
    """Raise if the parsed manifest does not carry `source` under `key`."""
    document = yaml.safe_load(manifest)
    found = _find_key(document, key)
    expected = source if literal else yaml.safe_load(source)
    if found != expected:
        raise ValueError(f"`{key}` does not hold the source")


def _find_key(node, key):
    if isinstance(node, dict):
        if key in node:
            return node[key]
        for value in node.values():
            if (found := _find_key(value, key)) is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python deploy/render.py", description=__doc__.splitlines()[0])
    add_version_flag(parser)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a manifest is out of date")
    args = parser.parse_args(argv)
    stale = []
    for manifest_path, key, source_path, literal in EMBEDDED:
        try:
            manifest, source = manifest_path.read_text(), source_path.read_text()
            rendered = embed(manifest, key, source, literal)
            check_embedded(rendered, key, source, literal)
        except (OSError, ValueError, yaml.YAMLError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            return error_line("python deploy/render.py", f"{manifest_path.name} / {source_path.name}: {detail}")
        if rendered == manifest:
            continue
        rel, src = manifest_path.relative_to(DEPLOY.parent), source_path.relative_to(DEPLOY.parent)
        if args.check:
            stale.append(f"{rel}: `{key}` differs from {src}")
        else:
            manifest_path.write_text(rendered)
            print(f"{rel}: `{key}` <- {src}")
    if stale:
        print("\n".join(stale) + "\nrun: python deploy/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

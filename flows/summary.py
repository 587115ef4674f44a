"""The latest eval comparison and promotion decision of a mode, as Markdown, from the Prefect artifacts.

    python -m flows.summary --mode retail_media >> "$GITHUB_STEP_SUMMARY"

Needs only `prefect` and PREFECT_API_URL (+ PREFECT_API_KEY for Cloud): the retrain workflow runs it on a
plain runner after the deployment's run finished elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys


def artifact_keys(mode: str) -> tuple[str, str]:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = mode.lower().replace("_", "-")
    return f"eval-{slug}", f"promotion-{slug}"


def table_markdown(rows: list[dict]) -> str:
    if not rows:
        return "_no eval rows_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render(mode: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.sorting import ArtifactSort

    eval_key, decision_key = artifact_keys(mode)
    with get_client(sync_client=True) as client:
        ev = client.read_artifacts(artifact_filter=_key_filter(eval_key), limit=1, sort=ArtifactSort.CREATED_DESC)
        dec = client.read_artifacts(artifact_filter=_key_filter(decision_key), limit=1, sort=ArtifactSort.CREATED_DESC)
    if not ev or not dec:
        raise SystemExit(f"no artifacts {eval_key!r}/{decision_key!r} on the Prefect server: has a run of "
                         f"mode {mode!r} completed?")
    rows = json.loads(ev[0].data) if isinstance(ev[0].data, str) else ev[0].data
    return f"## loraflow `{mode}`: held-out scores\n\n{table_markdown(rows)}\n{dec[0].data}\n"


def _key_filter(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    return ArtifactFilter(key=ArtifactFilterKey(any_=[key]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--mode", required=True)
    a = ap.parse_args(argv)
    sys.stdout.write(render(a.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())

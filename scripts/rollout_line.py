"""One line of a canary's progress from `GET /rollout` on stdin (scripts/rollout_walkthrough.sh):
time, status, weight, the current step's requests and quality pairs, then each gate as
name, value, ± its standard error when it is a mean, and its verdict (None: not decided yet)."""
import json
import sys
import time


def gate(g: dict) -> str:
    if g["value"] is None:
        return f"{g['name']} - {g['passed']}"
    stderr = "" if g["stderr"] is None else f" ±{g['stderr']:.3g}"
    return f"{g['name']} {g['value']:.3g}{stderr} {g['passed']}"


canary = json.load(sys.stdin)["canary"]
evidence = canary["evidence"]
print(f"{time.strftime('%H:%M:%S')} {canary['status']} weight {canary['weight']} step requests "
      f"{evidence['requests']} pairs {evidence['pairs']} [{', '.join(gate(g) for g in evidence['gates'])}]")

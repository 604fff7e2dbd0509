"""The A/B decisions: which variant serves, failover, outcomes, quality pairs, the canary, the cost.
Plain Python (pydantic for the settings): it imports neither Ray nor FastAPI, nor the other rooms."""
from serve.decisions.decider import Decisions, Replicas

__all__ = ["Decisions", "Replicas"]

"""sinkserve: `engine/` (one model's denoising), `api/` (OpenAI HTTP), `decisions/` (A/B choices),
and beside them the Ray Serve glue: `replica`, `ingress`, `metrics`, `canary_store`, `app`, `local`."""

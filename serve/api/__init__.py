"""The OpenAI-compatible HTTP layer: schemas, admission, response and SSE shapes, errors, guards, OpenAPI.
It imports FastAPI/Starlette, pydantic and the engine's request rules; Ray only for Serve's proxy hook."""

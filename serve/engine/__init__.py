"""The engine: one model's in-process batched denoising (requests, scheduler, sequences, runner).
It imports torch and sinkprune only: no Ray, no FastAPI, nothing else of serve/."""

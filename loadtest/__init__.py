"""Load generator and A/B report. Talks to the server over HTTP only, like any client."""

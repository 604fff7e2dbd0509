"""Text of a growing completion, released only where it can no longer change."""
from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a tokenizer shows for a UTF-8 character cut in half


class IncrementalText:
    """Decodes the committed prefix of a completion and hands out the new text.

    Text is held back while it ends in a partial character or in what could be the
    start of a stop string, so that the streamed pieces always add up to the
    final text. A request without a tokenizer has no text.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""  # released so far

    def update(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        """New text for the committed prefix `token_ids`; returns (delta, hit a stop string).
        `final`: no more tokens will come, so nothing is held back."""
        if self.tokenizer is None:
            return "", False
        # no clean-up of spaces: it could rewrite text already released
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._release(full[:cut]), True
        return self._release(full if final else full[:self._safe_end(full)]), False

    def _safe_end(self, full: str) -> int:
        """Where released text must end: before a trailing partial character and before
        the longest tail that begins some stop string."""
        end = len(full.rstrip(REPLACEMENT))
        held = 0
        for stop in self.stop:
            held = max([held] + [size for size in range(1, min(len(stop) - 1, end) + 1)
                                 if full.endswith(stop[:size], 0, end)])
        return end - held

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta

"""A request's output as its tokens arrive: the stop conditions, the text decoded a few tokens at a time, streaming.

Decoding the whole output again every round costs a request O(n) a round and O(n^2) over its life: SmolLM2's
tokenizer takes 0.74 ms for 2,048 tokens, so near the end of long answers a round of 16 requests would spend ~12 ms
re-reading text it had already streamed. Each round instead decodes only the tokens since the last character
boundary, behind the round before's tokens as context (a tokenizer may render a token differently at the start of a
text, as SentencePiece drops its leading space), and keeps what the new tokens add. Tokens that end inside a UTF-8
character wait for the rest, so no piece of text is streamed before it is final. Stop strings are looked for only
where the new text could complete one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class OutputText:
    """Generated tokens and their text with the stop conditions: EOS, stop strings, ``max_new_tokens``.
    ``on_text`` receives the text in pieces, as it becomes final (held back while it could still turn out to be the
    start of a stop string)."""

    def __init__(self, tokenizer, eos_ids, max_new_tokens: int, stop: Sequence[str],
                 on_text: Callable[[str], None] | None):
        self.tokenizer, self.eos_ids, self.max_new_tokens = tokenizer, eos_ids, max_new_tokens
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.tokens: list[int] = []
        self.text = ""
        self.streamed = 0
        self.finish_reason: str | None = None
        # (tokens, characters) at each character boundary the text reached; the last two are this round's context
        self._marks = [(0, 0)]

    def extend(self, new_tokens: list[int]) -> int:
        """Append tokens until a stop condition; return how many were taken."""
        taken = 0
        for token in new_tokens:
            self.tokens.append(token)
            taken += 1
            if token in self.eos_ids:
                self.finish_reason = "eos"
                break
            if len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        searched = len(self.text)
        self._decode_new()
        if self.stop:
            self._apply_stop_strings(searched)
        self._stream()
        return taken

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)

    def _since(self, start: int, mark: int, end: int) -> str:
        """The text of tokens ``[mark, end)``, decoded behind tokens ``[start, mark)`` as context."""
        return self._decode(start, end)[len(self._decode(start, mark)):]

    def _decode_new(self) -> None:
        """Extend the text by the tokens past the last boundary, once they end on a character (or the output ends)."""
        context, read = self._marks[-2][0] if len(self._marks) > 1 else 0, self._marks[-1][0]
        new = self._since(context, read, len(self.tokens))
        if new and (self.finish_reason is not None or not new.endswith("\ufffd")):
            self.text += new
            self._marks.append((len(self.tokens), len(self.text)))

    def _apply_stop_strings(self, searched: int) -> None:
        """Cut the text at the first stop string, looking from where text past ``searched`` could complete one, and
        keep the fewest tokens whose text reaches it."""
        start = max(searched - max(map(len, self.stop)) + 1, 0)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        self.text = self.text[:cut]
        k = max(i for i, (_, chars) in enumerate(self._marks) if chars <= cut)
        (context, _), (mark, chars) = self._marks[max(k - 1, 0)], self._marks[k]
        for n in range(mark + 1, len(self.tokens) + 1):
            if chars + len(self._since(context, mark, n)) > cut:
                del self.tokens[n:]
                break
        self.finish_reason = "stop"

    def _stream(self) -> None:
        if self.on_text is None:
            return
        end = len(self.text)
        if self.finish_reason is None and self.stop:  # what could still be the start of a stop string waits
            end -= max(len(s) for s in self.stop) - 1
        if end > self.streamed:
            self.on_text(self.text[self.streamed : end])
            self.streamed = end

"""Generated tokens -> text for one choice: whole characters only, stop strings matched on the
text (across token boundaries) and never leaked, logprob entries that join to the text.

::

    token ids ─detokenize all─> text (an incomplete UTF-8 character at the end held back)
              ─find a stop string─> cut there, finished
              ─hold back a tail that could start a stop string─> piece to send
"""

import numpy as np


class TextAssembler:
    """Collects one choice's tokens; `add` and `finish` return the text that may be sent.

    Args:
        detokenize: ``ids -> str`` over the whole sequence (special tokens dropped).
        stop: stop strings (may be empty).
    """

    def __init__(self, detokenize, stop=()):
        self.detokenize = detokenize
        self.stop = [s for s in stop if s]
        self.ids = []
        self.text = ""  # the stable text so far (complete characters)
        self.sent = 0  # characters of ``text`` sent
        self.entries = []  # per token: [token_id, piece, logprob, top, end offset in text]
        self.released = 0  # entries handed out with sent text
        self.stopped = False  # a stop string was found: ``text`` ends before it

    def add(self, token_id, logprob=None, top=None):
        """Adds a token; returns ``(piece, entries)`` to send now (piece may be "")."""
        self.ids.append(int(token_id))
        text = self.detokenize(self.ids).rstrip("\ufffd")
        if text.startswith(self.text):  # else the detokenizer revised earlier text: wait
            self.entries.append([int(token_id), text[len(self.text) :], logprob, top, len(text)])
            self.text = text
        else:
            self.entries.append([int(token_id), "", logprob, top, len(self.text)])
        cut = self._find_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._release(cut)
        return self._release(len(self.text) - self._held())

    def finish(self):
        """The rest of the text at the end of generation: ``(piece, entries)``."""
        if not self.stopped:
            # An incomplete character at the very end (a length cut) is dropped, not shown as
            # U+FFFD.
            text = (self.detokenize(self.ids) if self.ids else "").rstrip("\ufffd")
            if text.startswith(self.text):
                if self.entries:
                    self.entries[-1][1] += text[len(self.text) :]
                    self.entries[-1][4] = len(text)
                self.text = text
            cut = self._find_stop()
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
        return self._release(len(self.text), final=True)

    def _find_stop(self):
        # Earliest stop string that ends in text not yet sent.
        best = None
        for s in self.stop:
            i = self.text.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def _held(self):
        # The longest tail of the text that is a proper prefix of a stop string.
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _release(self, upto, final=False):
        upto = max(upto, self.sent)
        piece = self.text[self.sent : upto]
        self.sent = upto
        out = []
        while self.released < len(self.entries):
            entry = self.entries[self.released]
            start = entry[4] - len(entry[1])
            if entry[4] <= upto or (final and start < upto):
                entry[1] = entry[1][: max(0, upto - start)]
                out.append(entry)
                self.released += 1
            elif final:  # entirely after a stop string
                self.released += 1
            else:
                break
        return piece, out


def make_detokenizer(preprocessor):
    """``ids -> str`` through the preprocessor (special tokens dropped, as `generate()`)."""

    def detokenize(ids):
        ids = np.asarray(ids, "int32")[None, :]
        out = preprocessor.generate_postprocess(
            {"token_ids": ids, "padding_mask": np.ones(ids.shape, bool)}
        )
        out = out if isinstance(out, (str, bytes)) else out[0]
        return out.decode("utf-8") if isinstance(out, bytes) else out

    return detokenize

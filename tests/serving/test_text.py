"""Token -> text assembly: multi-byte characters are never split, stop strings are held back
and cut, logprob entries join to the text (byte tokens of a real byte-level vocabulary)."""

from keras_llama.serving.text import TextAssembler
from keras_llama.tokenizers import BytePairTokenizer
from keras_llama.tokenizers.byte_level_bpe import bytes_to_unicode

BYTES = [bytes_to_unicode()[b] for b in range(256)]
TOKENIZER = BytePairTokenizer(BYTES, [])  # one token per byte: every character is split
TEXT = "héllo 😀 世界, ok"


def detokenize(ids):
    return TOKENIZER.detokenize(ids)


def run(stop=()):
    assembler = TextAssembler(detokenize, stop)
    pieces, entries = [], []
    for token in TOKENIZER(TEXT):
        piece, more = assembler.add(int(token), -0.5, ([], []))
        pieces.append(piece)
        entries += more
        if assembler.stopped:
            break
    piece, more = assembler.finish()
    return pieces + [piece], entries + more


def test_multibyte_characters_are_never_split():
    assert len(TOKENIZER(TEXT)) == len(TEXT.encode("utf-8"))  # the emoji is four tokens
    pieces, entries = run()
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(e[1] for e in entries) == TEXT


def test_stop_strings_are_held_back_and_cut_across_tokens():
    pieces, entries = run(stop=["世界,"])
    assert "".join(pieces) == "héllo 😀 "
    assert not any("世" in p for p in pieces)
    assert "".join(e[1] for e in entries) == "héllo 😀 "
    # A held-back prefix that turns out not to be a stop string is sent after all.
    pieces, _ = run(stop=["llx"])
    assert "".join(pieces) == TEXT

#!/usr/bin/env python3
"""Writes the reference ids that tests/unit/io/test_bpe_tokenizer.cpp compares
ctformer::io::bpe_tokenizer against, from tiktoken's GPT-2 encoding built from
the repository's own GPT-2 files (data/gpt2/encoder.json, data/gpt2/vocab.bpe):

  tests/data/gpt2_tinyshakespeare_ids.u16  encode_ordinary(data/tinyshakespeare.txt),
                                           little-endian uint16, one per token
  tests/data/gpt2_extra_cases.json         [{"text", "ids" (encode_ordinary),
                                             "ids_with_special" (encode with
                                             every special allowed)}, ...]

Rerun (tiktoken from PyPI; nothing is downloaded at run time, the encoding is
built from the local files):

    python3 -m venv /tmp/venv-tok && /tmp/venv-tok/bin/pip install tiktoken numpy
    /tmp/venv-tok/bin/python tools/make_bpe_reference.py
"""
import argparse
import json
import os
import re

import numpy as np
import tiktoken
import tiktoken.load

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_encoding(root):
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(root, "data", "gpt2", "vocab.bpe"),
        encoder_json_file=os.path.join(root, "data", "gpt2", "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def extra_cases(shakespeare):
    cases = [
        # contractions, in odd places and cases (the pattern is case-sensitive)
        "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'RE", "'Ll", "''s", "'''",
        "don't", "I'm", "we'll've", "y'all'd've", "'sup", "it's'", " 's", "x's's", "rock'n'roll",
        "ALLCAPS'S", "'", "'r", "'l", "'v", "!'s", "1's", "\n's", "  'll",
        # digits and numbers of other scripts
        "1234567890", "3.14159", "1,000,000", "v1.2.3", "abc123def", " 123 456", "0123456789" * 5,
        "\u0663\u0664\u0665", "\u00bd \u2153 \u216b", "\u2460\u2461\u2462", "x\u00b2+y\u00b3", "\u0967\u0968\u0969",
        # runs of spaces, newlines and tabs before words
        "   leading", "trailing   ", "a  b   c    d", "\n\n\nword", "  \n  word", "\t\tindented", "\ttab",
        "a\tb", "\r\n\r\nwindows", "line\n", "word \n", " \n ", "   \n\n   \t  x", "\v\f x", "\x1c\x1d\x1e\x1f",
        " " * 40 + "x", "\n" * 12, "end with spaces  ", "  ",
        # other White_Space characters, and look-alikes that are not
        "\u00a0nbsp", "a\u00a0b", " \u00a0 x", "\u3000full width", "\u2009thin\u200aspaces", "\u200bzero width",
        "\u0085next line", "a\u2028b\u2029c", "\u202fnarrow", "\u1680ogham", "\ufeffBOM",
        # letters of many scripts
        "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u03ba\u03cc\u03c3\u03bc\u03b5",
        "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
        "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
        "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
        "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01",
        "\u4f60\u597d\uff0c\u4e16\u754c\u3002", "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c\u3001\u30ab\u30bf\u30ab\u30ca",
        "\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4", "\u10d2\u10d0\u10db\u10d0\u10e0\u10ef\u10dd\u10d1\u10d0",
        "\u0532\u0561\u0580\u0587", "\u1230\u120b\u121d", "\u0bb5\u0ba3\u0b95\u0bcd\u0b95\u0bae\u0bcd",
        "\u0f56\u0f40\u0fb2\u0f0b\u0f64\u0f72\u0f66", "\u01c4\u01c5\u01c6", "\u02b0\u02b2 modifier",
        "Stra\u00dfe \u00fcber \u00c5ngstr\u00f6m", "\u0130stanbul \u0131s\u0131",
        "\U00031350\U000105c0 new letters",
        # emoji, combining marks, odd code points
        "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466", "\U0001f1ef\U0001f1f5",
        "\u2764\ufe0f", "\U0001f600\U0001f603\U0001f604", "a\U0001f600b", " \U0001f600 ok",
        "e\u0301", "caf\u00e9 cafe\u0301", "Z\u0351\u0352\u0353\u0354", "\u0301 alone", "a\u0308\u0304b",
        "\ue000private", "\U0010ffff", "\u0378unassigned", "\x00nul\x00", "\x7f\x01\x02",
        # special-token strings as text
        "<|endoftext|>", "text<|endoftext|>more", "<|endoftext|> <|endoftext|>", " <|endoftext|>\n",
        "<|endoftext", "<|endoftext|><|endoftext|>",
        # mixtures
        "Hello, World! How's it going?", "int main() { return 0; }\n", "https://example.com/a?b=c&d=e",
        "user@example.com", "$100.00 & 50% off!!!", "C++20's concepts", "snake_case and camelCase",
        "---===***", "....", "\u2026", "\u00abquotes\u00bb \u201eGerman\u201c \u2018single\u2019",
        "def f(x):\n    return x ** 2\n\n\n", "    Hello\n    Hello",
    ]
    # Pieces longer than the tokenizer's short-piece limit: letters with no
    # space for a page, a long number, a long run of punctuation.
    letters = re.sub(r"[^A-Za-z]", "", shakespeare[:6000])
    cases += [letters[:64], letters[:65], letters[:3000], "7" * 500, "!?" * 300, "ab" * 400]
    return cases


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(root, "tests", "data"))
    args = ap.parse_args()

    enc = gpt2_encoding(root)
    with open(os.path.join(root, "data", "tinyshakespeare.txt"), "rb") as f:
        text = f.read().decode("utf-8")
    ids = enc.encode_ordinary(text)
    assert max(ids) < 65536
    path = os.path.join(args.out, "gpt2_tinyshakespeare_ids.u16")
    np.asarray(ids, dtype="<u2").tofile(path)
    print(f"wrote {path}: {len(ids)} tokens")

    cases = []
    for t in extra_cases(text):
        cases.append({"text": t, "ids": enc.encode_ordinary(t), "ids_with_special": enc.encode(t, allowed_special="all")})
    path = os.path.join(args.out, "gpt2_extra_cases.json")
    with open(path, "w", encoding="utf-8") as f:  # one case a line, ASCII-escaped: diffs stay readable
        f.write('{"generator": "tools/make_bpe_reference.py", "tiktoken": %s, "cases": [\n' % json.dumps(tiktoken.__version__))
        f.write(",\n".join(json.dumps(c, ensure_ascii=True) for c in cases))
        f.write("\n]}\n")
    print(f"wrote {path}: {len(cases)} cases")


if __name__ == "__main__":
    main()

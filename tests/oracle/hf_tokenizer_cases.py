"""The tokenizer oracle: Hugging Face's `tokenizers` library itself.

It trains byte-level BPE tokenizers at test time on a fixed multilingual corpus, with the
pre-tokenizer settings real files use, saves each as `tokenizer.json` (+ `tokenizer_config.json`)
and writes `cases.json` beside it: for every test text, the ids `tokenizers` encodes it to
(no special tokens added) and what it decodes them back to (special tokens skipped).

  dolma2       the dolma2 / cl100k settings of OLMo-2: Split(cl100k regex, Removed, invert) then
               ByteLevel(use_regex=false); merges written as pairs
  llama3       the same with ignore_merges (as Llama-3's file sets it)
  gpt2         ByteLevel(use_regex=true), merges written as "a b" strings (older files)
  variety      NFC normalizer, Split behaviours Isolated / MergedWithPrevious / MergedWithNext /
               Contiguous and a String pattern, ByteLevel(add_prefix_space=true)

Every tokenizer has the special tokens <|endoftext|> and <|pad|>, a non-special added token
<tool> with lstrip/rstrip, and a single_word token "foo". Offline. Usage: hf_tokenizer_cases.py OUT_DIR
"""

import json
import os
import sys
import unicodedata

from tokenizers import Regex, Tokenizer, AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2026; we'll see what they've done.",
    "def tokenize(text: str) -> list[int]:\n\treturn [ord(c) for c in text]  # bytes\r\n",
    "for (int i = 0; i < 100; ++i) { total += values[i] * 3.14159; }",
    "Le cœur a ses raisons que la raison ne connaît point. Ça va? Où est la gare?",
    "Über allen Gipfeln ist Ruh, in allen Wipfeln spürest du kaum einen Hauch.",
    "東京は日本の首都です。今日は良い天気ですね。我爱学习自然语言处理。",
    "한국어 문장도 있습니다. 안녕하세요!",
    "مرحبا بالعالم، هذه جملة باللغة العربية. שלום עולם, זה משפט בעברית.",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🎉🎉🎉 and café, naïve, résumé.",
    "Numbers 1234567890 and 3.14 and 1,000,000 and 0x1F and 2026-12-01.",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "    indented code\n        more indented\n\n\nblank lines above",
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"key\": [1, 2, 3]}",
    "Mathematics: ∀x ∈ ℝ, x² ≥ 0; ∑ᵢ aᵢ = ∫₀¹ f(x) dx; α + β = γ.",
]

TEXTS = [
    "",
    "hello world",
    "Hello World!! HELLO world??",
    "I'm sure you're right, DON'T you think? They'VE said it's 'quoted'.",
    "東京は日本の首都です。我爱学习。한국어 テスト",
    "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇩🇪 🎉🎉🎉",
    "e\u0301 vs \u00e9, A\u030a vs \u00c5, n\u0303, Z\u0335\u0321a\u0336l\u0337g\u0334o",
    "مرحبا بالعالم 123 שלום עולם",
    "12345678901234567890 1 22 333 4444 55555 3.14159 1,000,000",
    "tab\there\ttwo\t\ttabs, CRLF\r\nline\r\n\r\nend\n",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    " " * 40 + "spaces" + " " * 17 + "\n" * 5 + "\t" * 3 + "end   ",
    "nbsp\u00a0here and ideographic\u3000space and thin\u2009space",
    "special <|endoftext|> in the middle<|pad|><|pad|> and at the end<|endoftext|>",
    "tool call:   <tool>   {\"x\": 1}   <tool>done",
    "foo is a word, foobar is not, nor is barfoo; foo.",
    "mixed: café naïve 🎉 12 <|endoftext|> 東京 \r\n\tfoo",
    "\u200b\u200d\ufeffzero width and BOM",
    "a" * 300 + " " + "ab" * 120,
]


def added_tokens():
    return [AddedToken("<tool>", lstrip=True, rstrip=True, special=False, normalized=False),
            AddedToken("foo", single_word=True, special=False, normalized=True)]


def train(name, pre_tokenizer, normalizer=None, ignore_merges=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, min_frequency=2, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tok.add_tokens(added_tokens())
    return tok


def write(out_dir, name, tok, merges_as_strings=False):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    spec = json.loads(tok.to_str())
    if merges_as_strings:
        spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
        tok = Tokenizer.from_str(json.dumps(spec))
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(spec, ensure_ascii=False))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}, f)
    cases = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    with open(os.path.join(d, "cases.json"), "w", encoding="utf-8") as f:
        json.dump({"vocab_size": tok.get_vocab_size(with_added_tokens=True),
                   "eos": tok.token_to_id("<|endoftext|>"), "pad": tok.token_to_id("<|pad|>"),
                   "cases": cases}, f, ensure_ascii=False)


def main():
    out_dir = sys.argv[1]
    dolma2 = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    write(out_dir, "dolma2", train("dolma2", dolma2))
    write(out_dir, "llama3", train("llama3", dolma2, ignore_merges=True))
    write(out_dir, "gpt2", train("gpt2", pre_tokenizers.ByteLevel(add_prefix_space=False)), merges_as_strings=True)
    variety = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split("-", behavior="merged_with_previous"),
        pre_tokenizers.Split(Regex(r"[.,;:!?]"), behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"\s"), behavior="contiguous"),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)])
    write(out_dir, "variety", train("variety", variety, normalizer=normalizers.Sequence([normalizers.NFC()])))
    with open(os.path.join(out_dir, "DONE"), "w") as f:
        f.write("ok\n")


if __name__ == "__main__":
    main()

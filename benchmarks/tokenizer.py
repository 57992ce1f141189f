"""GPT-2 encoding throughput, from scratch against tiktoken, and BPE training time.

Natural text: about 1 MB of mixed text, "The Verdict", the SMS spam collection and the
two instruction data sets as JSON (prose, chat abbreviations, numbers, code, JSON
punctuation). "cold cache" forgets the encoded pieces before each run (only the pieces
that are whole tokens stay cached), so every distinct word is merged once per run, as
for new text; "warm cache" encodes the same text again with every piece already cached.

Long pieces: 1 MB of one repeated character, 1 MB of random letters, and the natural
text with its whitespace removed. The split pattern keeps a run of letters in one
piece, so the first two are one piece of a million bytes each, the case where a merge
loop that is quadratic in the piece's length never finishes. Always cold cache.

Runs of the two tokenizers alternate, so a busy machine slows both alike; each figure
is the median of several runs in this process.

    python benchmarks/tokenizer.py [--runs 5]
"""
import argparse
import random
import statistics
import string
import time

from tinygrad_llm import datasets
from tinygrad_llm.tokenizers import BPETokenizer, get_gpt2_tokenizer

CORPUS = ["the-verdict", "sms-spam-collection", "instruction-data", "instruction-data-with-preference"]
MEGABYTE = 1_000_000


def seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def long_piece_texts(natural_text):
    return {
        "one character, 1 MB": "a" * MEGABYTE,
        "random letters, 1 MB": "".join(random.Random(0).choices(string.ascii_lowercase, k=MEGABYTE)),
        "natural text without spaces": "".join(natural_text.split()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    text = "\n".join(datasets.path(name).read_text(encoding="utf-8") for name in CORPUS)
    megabytes = len(text.encode("utf-8")) / 1e6
    scratch = get_gpt2_tokenizer()
    tiktoken = get_gpt2_tokenizer(backend="tiktoken")
    if scratch.encode(text) != tiktoken.encode(text):
        raise SystemExit("the from-scratch tokenizer and tiktoken disagree on the benchmark text")

    times = {"tiktoken": [], "from scratch, cold cache": [], "from scratch, warm cache": []}
    for _ in range(args.runs):
        times["tiktoken"].append(seconds(lambda: tiktoken.encode(text)))
        scratch.clear_cache()
        times["from scratch, cold cache"].append(seconds(lambda: scratch.encode(text)))
        times["from scratch, warm cache"].append(seconds(lambda: scratch.encode(text)))
    throughput = {name: megabytes / statistics.median(runs) for name, runs in times.items()}

    print(f"GPT-2 encode of {megabytes:.2f} MB of mixed text, median of {args.runs} runs")
    print(f"{'tokenizer':<28}{'MB/s':>8}{'vs tiktoken':>14}")
    for name, mb_per_s in throughput.items():
        print(f"{name:<28}{mb_per_s:>8.2f}{mb_per_s / throughput['tiktoken']:>13.2f}x")

    print(f"\nLong pieces, from scratch with a cold cache, median of {args.runs} runs")
    print(f"{'text':<30}{'MB':>6}{'tiktoken s':>12}{'scratch s':>11}{'scratch / tiktoken':>20}")
    for name, long_text in long_piece_texts(text).items():
        if scratch.encode_ordinary(long_text) != tiktoken.encode_ordinary(long_text):
            raise SystemExit(f"the from-scratch tokenizer and tiktoken disagree on {name}")
        ours, theirs = [], []
        for _ in range(args.runs):
            theirs.append(seconds(lambda: tiktoken.encode_ordinary(long_text)))
            scratch.clear_cache()
            ours.append(seconds(lambda: scratch.encode_ordinary(long_text)))
        ours, theirs = statistics.median(ours), statistics.median(theirs)
        size = len(long_text.encode("utf-8")) / 1e6
        print(f"{name:<30}{size:>6.2f}{theirs:>12.3f}{ours:>11.3f}{ours / theirs:>19.2f}x")

    verdict = datasets.path("the-verdict").read_text(encoding="utf-8")
    training = statistics.median(seconds(lambda: BPETokenizer.train(verdict, 1000)) for _ in range(3))
    print(f"\nBPE training, 1,000-token vocabulary on the-verdict: {training:.2f} s (median of 3)")


if __name__ == "__main__":
    main()

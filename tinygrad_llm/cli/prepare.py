"""`tinygrad-llm prepare`: a corpus of text files into uint16 token shards for `pretrain --data SHARDS`."""
from ..shards import DEFAULT_SHARD_TOKENS, INDEX_NAME, prepare
from .common import existing_file_or_folder, integer, output_folder


def add_prepare(subparsers):
    p = subparsers.add_parser(
        "prepare", help="tokenize a corpus into token shards (for pretrain --data SHARDS)",
        description="Tokenize every text file under --data (one document per file, <|endoftext|> between "
                    "documents, sorted by path) with GPT-2's tokenizer in several processes, into uint16 shards "
                    f"of --shard-tokens tokens and {INDEX_NAME} (token counts, sha256 per shard). A second run "
                    "over the same input does nothing; an interrupted run resumes after its last shard.")
    p.add_argument("--data", required=True, type=existing_file_or_folder, help="a text file or a folder of text files")
    p.add_argument("--out", required=True, type=output_folder, help="the folder for the shards and the index")
    p.add_argument("--shard-tokens", type=integer(minimum=1), default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}: {DEFAULT_SHARD_TOKENS * 2 // 10**6} MB)")
    p.add_argument("--processes", type=integer(minimum=1), default=None, help="tokenizing processes (default: one per CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_prepare)


def run_prepare(args):
    index = prepare(args.data, args.out, args.shard_tokens, args.processes, progress=not args.no_progress)
    print(f"{index['documents']:,} documents, {index['tokens']:,} tokens in {len(index['shards'])} shards: "
          f"{args.out}/{INDEX_NAME}")
    return 0

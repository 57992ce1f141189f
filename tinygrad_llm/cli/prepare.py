"""`tinygrad-llm prepare`: a corpus of text files into uint16 token shards for `pretrain --data SHARDS`."""
from ..shards import DEFAULT_SHARD_TOKENS, INDEX_NAME, prepare


def add_prepare(subparsers):
    p = subparsers.add_parser(
        "prepare", help="tokenize a corpus into token shards (for pretrain --data SHARDS)",
        description="Tokenize every text file under --data (one document per file, <|endoftext|> between "
                    "documents, sorted by path) with GPT-2's tokenizer in several processes, into uint16 shards "
                    f"of --shard-tokens tokens and {INDEX_NAME} (token counts, sha256 per shard). A second run "
                    "over the same input does nothing; an interrupted run resumes after its last shard.")
    p.add_argument("--data", required=True, help="a text file or a folder of text files")
    p.add_argument("--out", required=True, help="the folder for the shards and the index")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}: {DEFAULT_SHARD_TOKENS * 2 // 10**6} MB)")
    p.add_argument("--processes", type=int, default=None, help="tokenizing processes (default: one per CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_prepare)


def run_prepare(args):
    if args.shard_tokens < 1:
        raise SystemExit(f"--shard-tokens must be a number of tokens >= 1, got {args.shard_tokens}")
    if args.processes is not None and args.processes < 1:
        raise SystemExit(f"--processes must be >= 1, got {args.processes}")
    index = prepare(args.data, args.out, args.shard_tokens, args.processes, progress=not args.no_progress)
    print(f"{index['documents']:,} documents, {index['tokens']:,} tokens in {len(index['shards'])} shards: "
          f"{args.out}/{INDEX_NAME}")
    return 0

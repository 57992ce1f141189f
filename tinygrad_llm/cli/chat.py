"""`tinygrad-llm chat`: talk to an instruction-tuned model in the Alpaca prompt format."""
import sys

import numpy as np

from ..checkpoint import model_from_checkpoint
from ..finetune.instruct import RESPONSE_HEAD, format_input
from ..generate import generate_stream
from .common import add_sampling_options, existing_file, get_tokenizer, integer, load_openai_gpt2

END_OF_TEXT = 50256


def add_chat(subparsers):
    p = subparsers.add_parser("chat", help="a prompt loop with an instruction-tuned model (streams the responses)",
                              description="Each line you type is an instruction; the model's response streams "
                                          "as it is generated, in the book's Alpaca format, until its end token. "
                                          "Ctrl-D or Ctrl-C ends the session.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=existing_file, help="a checkpoint written by `finetune instruct` (or pretrain)")
    which.add_argument("--model", metavar="SIZE|DIR", help="OpenAI's GPT-2 (not instruction-tuned: for comparison)")
    p.add_argument("--max-new-tokens", type=integer(minimum=1), default=256, help="the longest response in tokens (default 256)")
    add_sampling_options(p)
    p.set_defaults(run=run_chat)


def run_chat(args):
    model = load_openai_gpt2(args.model) if args.model is not None else model_from_checkpoint(args.checkpoint)[0]
    model = model.to(device=args.device)
    tokenizer = get_tokenizer()
    context = model.cfg["context_length"]
    if not 0 < args.max_new_tokens < context:
        raise ValueError(f"--max-new-tokens must be between 1 and {context - 1} (the model's context is {context} "
                         f"tokens), got {args.max_new_tokens}")
    prompt_budget = context - args.max_new_tokens  # the prompt and the response share the context
    seed = np.random.SeedSequence().entropy if args.seed is None else args.seed
    rng = np.random.default_rng(seed)
    said_truncated = False
    interactive = sys.stdin.isatty()
    try:
        while True:
            try:
                instruction = input("Instruction: " if interactive else "")
            except EOFError:
                break
            if not instruction.strip():
                continue
            prompt = format_input({"instruction": instruction, "input": ""}) + RESPONSE_HEAD
            ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})
            if len(ids) > prompt_budget:
                if not said_truncated:
                    print(f"(prompts longer than {prompt_budget} tokens keep only their last {prompt_budget}: the "
                          f"context holds {context} tokens and {args.max_new_tokens} are kept for the response)",
                          file=sys.stderr)
                    said_truncated = True
                ids = ids[-prompt_budget:]
            _stream_response(model, tokenizer, ids, args, int(rng.integers(2**63)))
    except KeyboardInterrupt:
        pass
    print()
    return 0


def _stream_response(model, tokenizer, ids, args, seed):
    """Print the response as its tokens come; a character split over tokens waits until it is whole."""
    generated, shown = [], ""
    for token in generate_stream(model, np.array([ids]), args.max_new_tokens, model.cfg["context_length"],
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 eos_id=END_OF_TEXT, seed=seed):
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tokenizer.decode(generated)[len(shown):], flush=True)

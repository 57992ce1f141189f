"""`tinygrad-llm generate`: continue a prompt, streaming the text."""
import numpy as np

from ..checkpoint import model_from_checkpoint
from ..generate import generate_stream, text_to_token_ids
from .common import START_CONTEXT, add_sampling_options, existing_file, get_tokenizer, integer, load_openai_gpt2


def add_generate(subparsers):
    p = subparsers.add_parser("generate", help="continue a prompt with a trained model (streams the text)",
                              description="Continue --prompt with the model in --checkpoint or OpenAI's GPT-2 "
                                          "(--model), printing the text as it is generated. Temperature 0 is "
                                          "greedy; otherwise the temperature, then top-k, then top-p shape the "
                                          "distribution sampled from.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=existing_file, help="a checkpoint written by pretrain or import-gpt2")
    which.add_argument("--model", metavar="SIZE|DIR",
                       help="OpenAI's GPT-2: gpt2-small ... gpt2-xl or 124M ... 1558M (downloaded on first use, "
                            "which needs a network) or a Hugging Face folder")
    p.add_argument("--prompt", default=START_CONTEXT, help=f"the text to continue (default {START_CONTEXT!r})")
    p.add_argument("--max-new-tokens", type=integer(minimum=0), default=50)
    add_sampling_options(p)
    p.set_defaults(run=run_generate)


def load_generation_model(args):
    """(model, tokenizer) for the generate subcommand."""
    if args.model is not None:
        model = load_openai_gpt2(args.model)
    else:
        model, _ = model_from_checkpoint(args.checkpoint)
    return model.to(device=args.device), get_tokenizer()


def run_generate(args):
    model, tokenizer = load_generation_model(args)
    prompt = text_to_token_ids(args.prompt, tokenizer)
    # Loading the checkpoint restored the training run's generator: without --seed, sample afresh.
    seed = np.random.SeedSequence().entropy if args.seed is None else args.seed
    print(args.prompt, end="", flush=True)
    generated, shown = [], ""
    for token in generate_stream(model, prompt, args.max_new_tokens, model.cfg["context_length"],
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed):
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        # A multi-byte character can span tokens: wait until it is complete before printing.
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tokenizer.decode(generated)[len(shown):])
    return 0

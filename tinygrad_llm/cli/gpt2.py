"""`tinygrad-llm import-gpt2`: OpenAI's GPT-2 weights as a checkpoint."""
from ..checkpoint import save_checkpoint
from .common import load_openai_gpt2, output_file


def add_import_gpt2(subparsers):
    p = subparsers.add_parser("import-gpt2", help="save OpenAI's GPT-2 weights as a checkpoint (the book's section 5.5)",
                              description="Read GPT-2 from a Hugging Face folder (config.json with model.safetensors "
                                          "or pytorch_model.bin) or by size, downloaded once into the cache (which "
                                          "needs a network), and save it as a checkpoint for generate, info and "
                                          "fine-tuning.")
    p.add_argument("--from", dest="source", required=True, metavar="DIR|SIZE",
                   help="a Hugging Face folder, or gpt2-small ... gpt2-xl, 124M ... 1558M")
    p.add_argument("--out", required=True, type=output_file, metavar="CHECKPOINT", help="the checkpoint file to write")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.set_defaults(run=run_import_gpt2)


def run_import_gpt2(args):
    model = load_openai_gpt2(args.source, args.dtype)
    save_checkpoint(args.out, model, source=args.source, tokenizer="gpt2")
    print(f"GPT-2 from {args.source}: {model.num_parameters():,} parameters "
          f"({model.cfg['n_layers']} layers, emb_dim {model.cfg['emb_dim']}) -> {args.out}")
    return 0

"""The `tinygrad-llm` command line (also `python -m tinygrad_llm`).

One module per subcommand. Each holds a pair of functions: `add_<name>(subparsers)` declares
its options and `run_<name>(args)` does the work through the Python API (train, generate,
checkpoint), so the command line adds no behaviour of its own and a new subcommand is one
more module and one more entry in SUBCOMMANDS.
"""
import argparse
import os
import signal
import sys

from ..datasets import DownloadError
from . import chat, classify, evaluate, exercises, finetune, generate, gpt2, grade, info, prepare, pretrain

SUBCOMMANDS = (pretrain.add_pretrain, finetune.add_finetune, classify.add_classify, generate.add_generate,
               gpt2.add_import_gpt2, info.add_info, grade.add_grade, exercises.add_exercises, prepare.add_prepare,
               evaluate.add_evaluate, chat.add_chat)


def build_parser():
    parser = argparse.ArgumentParser(prog="tinygrad-llm", description="Train and run a GPT built from scratch on NumPy.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`tinygrad-llm generate | head`): stop quietly, as a pipeline expects.
        # stdout goes to /dev/null so the interpreter's last flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (ValueError, OSError) as error:
        # Errors at the boundary (a bad checkpoint, token id or option; a missing file, a full
        # disk) already name the problem and the file.
        print(f"tinygrad-llm {args.command}: {error}", file=sys.stderr)
        return 2
    except DownloadError as error:
        print(f"tinygrad-llm {args.command}: {error}\n(data sets download on first use, which needs a network; "
              "offline, point TINYGRAD_LLM_DATA at a folder holding the files)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

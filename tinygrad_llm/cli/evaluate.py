"""`tinygrad-llm evaluate`: score a responses file offline, and with a judge served by Ollama."""
import json

from ..finetune.instruct import JUDGE_PROMPTS, judge_responses, load_responses, response_metrics, split_loss
from ..finetune.judge import DEFAULT_MODEL, DEFAULT_TIMEOUT, DEFAULT_URL, JudgeUnavailableError
from .common import existing_file, number, output_file


def add_evaluate(subparsers):
    p = subparsers.add_parser("evaluate", help="score instruction responses: exact match, token-F1, loss, a judge",
                              description="Score the responses in --responses (the instruction-data-with-"
                                          "response.json that `finetune instruct` writes) against the reference "
                                          "outputs: exact match and token-F1 offline; the test loss and "
                                          "perplexity with --checkpoint; and the book's judge, a model served "
                                          "by Ollama, with --judge.")
    p.add_argument("--responses", required=True, type=existing_file, metavar="FILE", help="a JSON list of entries with responses")
    p.add_argument("--key", default="model_response", help="the entries' key holding the response "
                                                           "(default model_response)")
    p.add_argument("--checkpoint", type=existing_file, help="also the loss and perplexity of this model on the file's entries")
    p.add_argument("--judge", nargs="?", const=DEFAULT_URL, metavar="URL",
                   help=f"score with the judge at this /api/chat URL (default {DEFAULT_URL})")
    p.add_argument("--judge-model", default=DEFAULT_MODEL, help=f"the judge's model name (default {DEFAULT_MODEL})")
    p.add_argument("--judge-prompt", choices=sorted(JUDGE_PROMPTS), default="book",
                   help="book: the book's 0-100 score; rubric: a 1-5 scale with each score described")
    p.add_argument("--judge-timeout", type=number(minimum=0.0, above=True), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"longest wait for one answer (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--json", metavar="OUT", type=output_file, help="also write the results to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args):
    entries = load_responses(args.responses, args.key)
    results = {"responses": args.responses, **response_metrics(entries, args.key)}
    print(f"{results['count']} responses: exact match {results['exact_match']:.3f}, "
          f"token-F1 {results['token_f1']:.3f}")
    if args.checkpoint is not None:
        from ..checkpoint import model_from_checkpoint
        from .common import get_tokenizer

        model, _ = model_from_checkpoint(args.checkpoint)
        loss = split_loss(model, entries, get_tokenizer(), allowed_max_length=model.cfg["context_length"])
        results.update(loss=loss["loss"], perplexity=loss["perplexity"])
        print(f"loss {loss['loss']:.3f}, perplexity {loss['perplexity']:.2f} ({args.checkpoint})")
    if args.judge is not None:
        try:
            report = judge_responses(entries, args.key, model=args.judge_model, url=args.judge,
                                     prompt=args.judge_prompt, timeout=args.judge_timeout, progress=args.progress)
        except JudgeUnavailableError as error:
            raise SystemExit(f"tinygrad-llm evaluate: {error}") from None
        for index, reason in report.failures:
            print(f"  entry {index} not scored: {reason}")
        print(f"judge {args.judge_model}: {report.summary()}")
        results.update(judge_model=args.judge_model, judge_prompt=args.judge_prompt, judge_mean=report.mean,
                       judge_scores=report.scores, judge_failures=[list(f) for f in report.failures])
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0

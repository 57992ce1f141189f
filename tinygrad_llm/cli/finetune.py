"""`tinygrad-llm finetune TASK`: the book's fine-tunes, one module per task, registered in TASKS."""
from . import finetune_classify, instruct, preference

TASKS = (finetune_classify.add_classify_task, instruct.add_instruct, preference.add_dpo, preference.add_reward,
         preference.add_ppo)


def add_finetune(subparsers):
    p = subparsers.add_parser("finetune", help="fine-tune a GPT: classify (chapter 6), instruct (chapter 7), "
                                               "dpo, reward, ppo (chapter 8)",
                              description="Fine-tune a pretrained GPT on one of the book's tasks.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for add in TASKS:
        add(tasks)

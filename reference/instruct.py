"""Chapter 7 in PyTorch, as the book writes it: the collate function the library's is checked against.

The book pads and masks one row at a time with torch ops (`torch.nonzero` over the pad
positions of the targets); tinygrad_llm.finetune.instruct does it for the whole batch with
a running count, so the two are independent ways to the same arrays.
"""
import torch


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device="cpu",
                      mask_instruction=False):
    """The book's collate (section 7.3), and exercise 7.2's when items are (instruction_length, ids)."""
    items = [item for _, item in batch] if mask_instruction else batch
    batch_max_length = max(len(item) + 1 for item in items)
    inputs_lst, targets_lst = [], []
    for i, item in enumerate(items):
        extended = list(item) + [pad_token_id]
        padded = extended + [pad_token_id] * (batch_max_length - len(extended))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        pad_positions = torch.nonzero(targets == pad_token_id).squeeze(1)
        if pad_positions.numel() > 1:
            targets[pad_positions[1:]] = ignore_index
        if mask_instruction:
            instruction_length = batch[i][0]
            targets[:instruction_length - 1] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)

"""PPO's pieces in PyTorch, as OpenAI's lm-human-preferences and TRL write them, and a plain-loop GAE.

Masks are 1 on response tokens and 0 on the padding after each row's end; means are over
the masked tokens of the whole batch.
"""
import torch


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return masked_mean(torch.max(pg_losses, pg_losses2), mask)


def ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2):
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """One row and one token at a time: each row's response is its first n masked tokens."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        n = int(sum(mask[b]))
        last_advantage = 0.0
        for t in reversed(range(n)):
            next_value = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last_advantage = delta + gamma * lam * last_advantage
            advantages[b][t] = last_advantage
    returns = [[advantages[b][t] + values[b][t] if t < sum(mask[b]) else 0.0 for t in range(len(rewards[b]))]
               for b in range(len(rewards))]
    return advantages, returns


def response_logprobs(model, sequences, prompt_length):
    logits = model(sequences)[:, prompt_length - 1:-1]
    return torch.log_softmax(logits, dim=-1).gather(-1, sequences[:, prompt_length:].unsqueeze(-1)).squeeze(-1)


def ppo_update(policy, value_model, optimizer, rollouts, ppo_epochs=4, clip_range=0.2, clip_range_value=0.2,
               vf_coef=0.1, grad_clip=1.0):
    """PPO epochs on fixed rollouts (torch tensors), each one step over the whole batch; a
    group of prompts of one length at a time, its loss weighted by its share of the tokens."""
    mask = rollouts["mask"]
    total = mask.sum().clamp(min=1)
    params = [*policy.parameters(), *value_model.parameters()]
    losses = []
    for _ in range(ppo_epochs):
        optimizer.zero_grad()
        epoch_losses = [0.0, 0.0]
        start = 0
        for sequences, prompt_length in rollouts["groups"]:
            rows = slice(start, start + len(sequences))
            start += len(sequences)
            share = mask[rows].sum() / total
            logprobs = response_logprobs(policy, sequences, prompt_length)
            values = value_model(sequences)[:, prompt_length - 1:-1, 0]
            policy_loss = ppo_policy_loss(logprobs, rollouts["logprobs"][rows], rollouts["advantages"][rows],
                                          mask[rows], clip_range)
            value_loss = ppo_value_loss(values, rollouts["values"][rows], rollouts["returns"][rows], mask[rows],
                                        clip_range_value)
            ((policy_loss + vf_coef * value_loss) * share).backward()
            epoch_losses[0] += policy_loss.item() * share.item()
            epoch_losses[1] += value_loss.item() * share.item()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        losses.append(epoch_losses)
    return losses

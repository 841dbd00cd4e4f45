"""Reading the residual stream at every layer: mean activations over response tokens and the
last prompt token's state. Used by extraction, statistics and evaluation (not by serving,
where the engine's hooks capture states during the request's own prefill)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from steering.model import LoadedModel


@contextmanager
def _recording(lm: LoadedModel):
    """Record the output of the embeddings and of every block (rows 0..L) while active."""
    states: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(_m, _a, output):
            states[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [lm.model.get_input_embeddings().register_forward_hook(keep(0))]
    handles += [b.register_forward_hook(keep(i + 1)) for i, b in enumerate(lm.blocks)]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def _right_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.inference_mode()
def response_means(
    lm: LoadedModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    batch_size: int = 8,
    include_last_prompt: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean hidden state over each response's tokens, teacher-forced after its prompt.

    Returns float32 ``[n, num_layers + 1, hidden]``; with ``include_last_prompt`` also the
    last prompt token's states, same shape. One forward per batch of texts.

    Example::

        means = response_means(lm, [prompt_ids], [answer_ids])   # [1, 31, 576]
    """
    pad = lm.tokenizer.pad_token_id or 0
    out_mean, out_last = [], []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], responses[start : start + batch_size]
        ids, mask = _right_padded([p + r for p, r in zip(ps, rs)], pad)
        with _recording(lm) as states:
            lm.model(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device), logits_to_keep=1)
        stacked = torch.stack([states[i].float().cpu() for i in range(lm.num_layers + 1)], dim=1)  # [b, L+1, T, H]
        for j, (p, r) in enumerate(zip(ps, rs)):
            if not r:
                raise ValueError("a response must have at least one token")
            out_mean.append(stacked[j, :, len(p) : len(p) + len(r)].mean(dim=1))
            out_last.append(stacked[j, :, len(p) - 1])
    means = torch.stack(out_mean)
    return (means, torch.stack(out_last)) if include_last_prompt else means


@torch.inference_mode()
def last_prompt_states(lm: LoadedModel, prompts: list[list[int]], *, batch_size: int = 8) -> torch.Tensor:
    """The last token's state of each prompt at every layer: float32 ``[n, num_layers + 1, hidden]``."""
    pad = lm.tokenizer.pad_token_id or 0
    out = []
    for start in range(0, len(prompts), batch_size):
        ps = prompts[start : start + batch_size]
        ids, mask = _right_padded(ps, pad)
        with _recording(lm) as states:
            lm.model(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device), logits_to_keep=1)
        stacked = torch.stack([states[i].float().cpu() for i in range(lm.num_layers + 1)], dim=1)
        out.extend(stacked[j, :, len(p) - 1] for j, p in enumerate(ps))
    return torch.stack(out)


def mean_residual_norm(lm: LoadedModel, prompts: list[list[int]]) -> torch.Tensor:
    """Mean norm of the last prompt token's state per layer, ``[num_layers + 1]``."""
    return last_prompt_states(lm, prompts).norm(dim=-1).mean(dim=0)

"""The seed's SigLIP loss: a sigmoid per (caption, image) pair, from big_vision's JAX trainer.

    eye = torch.eye(n);  m1_diag1 = -1 + 2 * eye
    loss = mean over captions of -sum over images of logsigmoid(m1_diag1 * logits_per_text)

With ``labels`` the +1/-1 matrix is given instead of the identity: a batch of crops where
several show the same caption (or none, for background crops) has more than one positive
per row or none, and treating them as negatives would teach the model to tell apart what it
cannot.
"""

from __future__ import annotations

from typing import Any


def sigmoid_loss(logits_per_text: Any, labels: Any = None) -> Any:
    """Mean over rows (captions) of the summed -log sigmoid(z_ij * logit_ij), with z = +1 on
    positives and -1 elsewhere; positives are the diagonal unless ``labels`` (bool C×N)."""
    import torch

    if labels is None:
        if logits_per_text.shape[0] != logits_per_text.shape[1]:
            raise ValueError("without labels the logits must be square (caption i ↔ image i)")
        labels = torch.eye(logits_per_text.shape[0], device=logits_per_text.device,
                           dtype=torch.bool)
    signs = labels.to(logits_per_text.dtype) * 2 - 1
    loglik = torch.nn.functional.logsigmoid(signs * logits_per_text)
    return -loglik.sum(dim=-1).mean()


def caption_labels(row_captions: list[str], column_captions: list[str | None]) -> Any:
    """C×N bool: caption i names the object of crop j (None: a background crop, no caption)."""
    import torch

    return torch.tensor([[c == col for col in column_captions] for c in row_captions],
                        dtype=torch.bool)

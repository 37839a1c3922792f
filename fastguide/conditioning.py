"""Conditioning: None, a tensor, or a dict of tensors (each batched on dim 0).

A tensor reaches a denoiser as its third positional argument, net(x, sigma, labels); a dict
reaches it as keyword arguments, net(x, sigma, **labels) (prompt embeddings, pooled embeddings,
masks ...).  The evaluation strategies concatenate and stack conditioning through these helpers.
"""
import torch


def check(name, cond, batch):
    """Refuses conditioning that is not None, a tensor or a dict of tensors with `batch` rows."""
    if cond is None:
        return
    if isinstance(cond, dict):
        if not cond:
            raise ValueError(f"{name} is an empty dict; pass None for no conditioning")
        for key, value in cond.items():
            _check_tensor(f"{name}[{key!r}]", value)
        _check_same_batch(name, cond)
        for key, value in cond.items():
            _check_tensor(f"{name}[{key!r}]", value, batch)
        return
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, a dict of tensors or None, got {type(cond).__name__}")
    _check_tensor(name, cond, batch)


def _check_tensor(name, value, batch=None):
    """A tensor with a batch dimension (of `batch` rows unless None)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.ndim == 0 or (batch is not None and value.shape[0] != batch):
        raise ValueError(f"{name} has batch {tuple(value.shape)[:1] or '()'}, expected the batch of x ({batch})")


def _check_same_batch(name, cond):
    """The entries of a dict agree on their batch (named by key when they do not)."""
    (first, reference), *others = cond.items()
    for key, value in others:
        if value.shape[0] != reference.shape[0]:
            raise ValueError(f"{name}[{key!r}] has batch {value.shape[0]} but {name}[{first!r}] has batch "
                             f"{reference.shape[0]}; every entry must be batched on dim 0 alike")


def check_pair(name, cond, reference_name, reference):
    """CFG concatenates cond with reference: the same kind, the same keys, shapes that differ in batch only."""
    if (cond is None) != (reference is None) or isinstance(cond, dict) != isinstance(reference, dict):
        raise ValueError(f"{name} and {reference_name} must be of the same kind (both tensors, both dicts or "
                         f"both None) to share one batch")
    if isinstance(cond, dict) and cond.keys() != reference.keys():
        missing = sorted(reference.keys() - cond.keys()) or sorted(cond.keys() - reference.keys())
        raise ValueError(f"{name} and {reference_name} must have the same keys; key {missing[0]!r} is in one only")


def call(model, x, sigma, cond):
    """model's prediction for conditioning cond (keyword arguments when it is a dict)."""
    if isinstance(cond, dict):
        return model(x, sigma, **cond)
    return model(x, sigma, cond)


def _map2(fn, a, b):
    if a is None:
        return None
    if isinstance(a, dict):
        return {key: fn(a[key], b[key]) for key in a}
    return fn(a, b)


def cat(a, b):
    """[a; b] along the batch (per key for dicts)."""
    return _map2(lambda u, v: torch.cat([u, v]), a, b)


def stack(a, b):
    """[a, b] on a new leading dim (per key for dicts)."""
    return _map2(lambda u, v: torch.stack([u, v]), a, b)


def signature(cond):
    """What a cached choice depends on: shapes, dtypes and devices of every tensor."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return tuple((key, signature(value)) for key, value in sorted(cond.items()))
    return tuple(cond.shape), cond.dtype, cond.device

"""The "cpp" and "cuda" backends of the rule ops: torch.ops.fastguide.rule_moments / rule_apply
(csrc/guided_rules.cpp, csrc/cuda/guided_rules.cu).  See fastguide._rules_ops for what they compute."""
import torch

import fastguide._C  # noqa: F401  (registers torch.ops.fastguide.*)

_moments = torch.ops.fastguide.rule_moments.default
_apply = torch.ops.fastguide.rule_apply.default


def rule_moments(x, d1, d0, m, coefs):
    return _moments(x, d1, d0, m, coefs)


def rule_apply(x, d1, d0, m, e, noise, coefs, *, out, out2=None, m_out=None, flags=None):
    _apply(x, d1, d0, m, e, noise, coefs, out=out, out2=out2, m_out=m_out, flags=flags)
    return out


@torch.library.register_fake("fastguide::rule_moments")
def _rule_moments_fake(x, d1, d0, m, coefs):
    return d1.new_empty((d1.shape[0], 5), dtype=torch.float64)


@torch.library.register_fake("fastguide::rule_apply")
def _rule_apply_fake(x, d1, d0, m, e, noise, coefs, *, out, out2=None, m_out=None, flags=None):
    return None

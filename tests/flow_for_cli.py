"""A flow-matching factory for the `fastguide sample` tests (flow_for_cli:tiny_sd3): a tiny random
SD3Transformer2DModel with FlowMatchEulerDiscreteScheduler(shift=3.0), its per-seed conditioning
(prompt k mod N, and one negative prompt) and its schedule, as the README's example factory lays out."""
import torch

TEXT_LEN, TEXT_DIM, POOLED_DIM, NUM_PROMPTS = 5, 16, 8, 3


def prompt_table(seed, rows):
    """Random stand-ins for precomputed (prompt embeddings, pooled embeddings), one row per prompt."""
    generator = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(rows, TEXT_LEN, TEXT_DIM, generator=generator),
            "pooled_projections": torch.randn(rows, POOLED_DIM, generator=generator)}


PROMPTS = prompt_table(1, NUM_PROMPTS)
NEGATIVE = prompt_table(2, 1)


def conditioning(seeds, device):
    """Seed k gets prompt k mod NUM_PROMPTS; every seed the one negative prompt (for CFG)."""
    rows = torch.tensor([seed % NUM_PROMPTS for seed in seeds])
    labels = {key: table[rows].to(device) for key, table in PROMPTS.items()}
    guide_labels = {key: table[[0] * len(seeds)].to(device) for key, table in NEGATIVE.items()}
    return labels, guide_labels


def model_and_scheduler():
    import diffusers
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16).eval()
    return model, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)


def tiny_sd3():
    from fastguide.adapters import FlowMatchDenoiser, flow_sigmas
    model, scheduler = model_and_scheduler()
    return dict(denoiser=FlowMatchDenoiser(model, scheduler), conditioning=conditioning, shape=(4, 8, 8),
                sigmas=lambda num_steps: flow_sigmas(scheduler, num_steps))

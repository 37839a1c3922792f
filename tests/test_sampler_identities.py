"""Identities the guided sampler must satisfy, with evaluation counts from return_stats."""
import torch

import fastguide
from tests.gaussian import GaussianDenoiser
from tests.test_sampler import edm_schedule, nonlinear_net, weak_net

CLASS_MEANS = torch.tensor([[0.5, -0.5, 1.0], [-1.0, 0.2, 0.0], [0.0, 0.0, 0.0]])


def labels_for(classes):
    return torch.nn.functional.one_hot(torch.tensor(classes), 3).float()


class Counting:
    def __init__(self, fn):
        self.fn, self.calls, self.sigmas = fn, 0, []

    def __call__(self, x, sigma, labels):
        self.calls += 1
        self.sigmas.append(sigma[0].item())
        return self.fn(x, sigma, labels)


def test_guidance_one_equals_unguided_and_never_calls_the_guide():
    noise = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    guide = Counting(weak_net)
    unguided, stats0 = fastguide.sample(nonlinear_net, noise, num_steps=8, return_stats=True)
    guided, stats1 = fastguide.sample(nonlinear_net, noise, guide=guide, guidance=1.0, num_steps=8, return_stats=True)
    assert torch.equal(unguided, guided)
    assert guide.calls == 0 and stats1["guide"] == 0 and stats1["net"] == stats0["net"] == 2 * 8 - 1


def test_guide_equal_to_net_gives_unguided_result_for_any_weight():
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    unguided = fastguide.sample(nonlinear_net, noise, num_steps=7, dtype=torch.float64)
    for w in (0.0, 2.5, -1.5, 7.0):
        guided = fastguide.sample(nonlinear_net, noise, guide=nonlinear_net, guidance=w, num_steps=7,
                                  dtype=torch.float64)
        torch.testing.assert_close(guided, unguided, rtol=1e-12, atol=1e-12)


def test_cfg_one_batch_equals_two_separate_calls():
    net = Counting(GaussianDenoiser(std=0.6, class_means=CLASS_MEANS))
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    labels, null = labels_for([0, 1, 1, 0]), labels_for([2, 2, 2, 2])
    cfg, stats = fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=3.0, num_steps=6,
                                  return_stats=True, strategy="cfg-batch")
    assert net.calls == 2 * 6 - 1  # one 2B call per evaluation
    assert stats["net"] == stats["guide"] == 2 * 6 - 1
    plain = GaussianDenoiser(std=0.6, class_means=CLASS_MEANS)
    separate = fastguide.sample(plain, noise, labels=labels, guide=lambda x, s, l: plain(x, s, null),
                                guidance=3.0, num_steps=6)
    torch.testing.assert_close(cfg, separate, rtol=1e-6, atol=1e-6)
    auto = fastguide.sample(GaussianDenoiser(std=0.6, class_means=CLASS_MEANS), noise, labels=labels,
                            guide_labels=null, guidance=3.0, num_steps=6)
    torch.testing.assert_close(auto, cfg, rtol=1e-6, atol=1e-6)


def test_guide_labels_go_to_the_guide_when_a_guide_is_given():
    seen = []
    guide = lambda x, s, l: (seen.append(l), weak_net(x, s, l))[1]  # noqa: E731
    labels, guide_labels = labels_for([0, 1]), labels_for([2, 2])
    fastguide.sample(nonlinear_net, torch.randn(2, 3), labels=labels, guide=guide, guide_labels=guide_labels,
                     guidance=2.0, num_steps=3)
    assert seen and all(torch.equal(l, guide_labels) for l in seen)


def test_interval_skips_exactly_the_evaluations_outside_it():
    num_steps, interval = 16, (0.28, 5.42)
    net, guide = Counting(nonlinear_net), Counting(weak_net)
    _, stats = fastguide.sample(net, torch.randn(3, 2), guide=guide, guidance=2.0, guidance_interval=interval,
                                num_steps=num_steps, return_stats=True)
    t_steps = edm_schedule(num_steps)
    evaluated_at = t_steps[:num_steps] + t_steps[1:num_steps]  # Euler at t_hat=t_cur, Heun at t_next
    inside = sorted(s for s in evaluated_at if interval[0] < s <= interval[1])
    assert net.calls == stats["net"] == 2 * num_steps - 1
    assert guide.calls == stats["guide"] == len(inside) and 0 < len(inside) < 2 * num_steps - 1
    assert sorted(guide.sigmas) == [torch.tensor(s, dtype=torch.float32).item() for s in inside]


def test_interval_bounds_are_exclusive_below_inclusive_above():
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.0])
    guide = Counting(weak_net)
    fastguide.sample(nonlinear_net, torch.randn(2, 2), guide=guide, guidance=2.0, guidance_interval=(1.0, 2.0),
                     sigmas=sigmas, solver="euler")
    assert guide.sigmas == [2.0]


def test_seeded_noise_is_the_same_for_a_seed_in_any_batch():
    big = fastguide.seeded_noise([5, 9, 11, 300], (3, 4))
    small = fastguide.seeded_noise([11, 5], (3, 4))
    assert big.shape == (4, 3, 4)
    assert torch.equal(big[2], small[0]) and torch.equal(big[0], small[1])
    assert not torch.equal(big[0], big[1])
    alone = fastguide.seeded_noise([300], (3, 4), dtype=torch.float64)
    assert alone.dtype == torch.float64 and torch.allclose(alone[0].float(), big[3])


def test_seeded_churn_noise_makes_each_sample_independent_of_its_batch():
    def run(seeds):
        rnd = fastguide.SeededRandn(seeds)
        noise = rnd.randn((2, 3))
        return fastguide.sample(nonlinear_net, noise, num_steps=6, S_churn=20.0, randn_like=rnd)

    together = run([1, 2, 3])
    assert torch.equal(run([3])[0], together[2]) and torch.equal(run([2, 1])[1], together[0])

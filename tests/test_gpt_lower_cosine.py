"""bench/probes/gpt_lower_cosine.py against autograd: the lower parameters' synthetic gradient
is h's backward of S(h) / (B T), the true one backprop's, and the probe leaves no gradient."""

import torch

from bench.probes.gpt_lower_cosine import lower_gradient_cosines
from experiment.data import load_text
from experiment.lm_flags import parse_args
from experiment.lm_train import make_loop, token_loss
from tests.test_gpt import TINY


def test_lower_cosines_are_those_autograd_gives(small_text, tmp_path):
    args = parse_args([*TINY, "--corpus", str(small_text), "--cuts", "1", "--conditioned",
                       "--synthesizer", "loss_gradient", "--out", str(tmp_path)])
    loop = make_loop(args, load_text(str(small_text)), tmp_path, torch.device("cpu"))
    net, synthesizer = loop.model.net, loop.model.interfaces[0].synthesizer
    with torch.no_grad():
        synthesizer.scale.fill_(0.5)
    every, weights = lower_gradient_cosines(loop)
    assert all(p.grad is None for p in loop.model.parameters())
    x, y = loop.probe[:, :-1], loop.probe[:, 1:]
    lower = list(net[:2].parameters())
    h = net[:2](x)
    labels = torch.nn.functional.one_hot(y, synthesizer.context_size).float()
    s = synthesizer(h.detach(), None, context=labels)[0]
    synthetic = torch.autograd.grad(h, lower, grad_outputs=s / y.numel())
    true = torch.autograd.grad(token_loss(net(x), y), lower)

    def cosine(keep):
        a = torch.cat([g.flatten() for g, p in zip(synthetic, lower) if keep(p)])
        b = torch.cat([g.flatten() for g, p in zip(true, lower) if keep(p)])
        return torch.nn.functional.cosine_similarity(a, b, dim=0).item()

    assert abs(every - cosine(lambda p: True)) < 1e-5
    assert abs(weights - cosine(lambda p: p.dim() >= 2)) < 1e-5
    assert abs(every) > 1e-3

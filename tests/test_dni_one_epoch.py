"""bench/probes/dni_one_epoch.py's memory synthesizer: it predicts the mean stored target of the k
stored activations nearest to each query, from a ring memory of the last `capacity` pairs."""

import torch

from bench.probes.dni_one_epoch import NearestNeighbourSynthesizer


def test_nearest_neighbour_synthesizer_is_the_mean_target_of_the_k_nearest_stored():
    torch.manual_seed(0)
    memory = NearestNeighbourSynthesizer(4, capacity=6, k=2)
    assert memory(torch.randn(3, 4))[0].abs().sum() == 0   # nothing stored yet: no gradient
    stored, targets = torch.randn(6, 4), torch.randn(6, 4)
    memory(stored)
    memory.solve(targets)
    queries = torch.randn(5, 4)
    nearest = torch.cdist(queries, stored).topk(2, largest=False).indices
    expected = targets[nearest].mean(1)
    torch.testing.assert_close(memory(queries)[0], expected)


def test_nearest_neighbour_synthesizer_forgets_the_oldest_pairs_first():
    memory = NearestNeighbourSynthesizer(2, capacity=3, k=1)
    for value in range(5):     # pairs 0..4 into a memory of 3: 2, 3 and 4 remain
        memory(torch.full((1, 2), float(value)))
        memory.solve(torch.full((1, 2), 10.0 * value))
    assert memory.filled == 3
    assert sorted(memory.keys[:, 0].tolist()) == [2.0, 3.0, 4.0]
    torch.testing.assert_close(memory(torch.zeros(1, 2))[0], torch.full((1, 2), 20.0))

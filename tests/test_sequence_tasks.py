"""The sequence tasks (experiment/sequence_tasks.py): documented shapes and targets, seeding by
the generator, losses, error counts and the curriculum."""

import pytest
import torch

from experiment.sequence_tasks import Curriculum, make_task


def draw(task, level, batch=6, seed=0):
    return task.sample(level, batch, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_copy_shapes_and_targets():
    task = make_task("copy", bits=5)
    n = 4
    b = draw(task, n)
    assert b.inputs.shape == (2 * n + 1, 6, 6) and b.targets.shape == (2 * n + 1, 6, 5)
    assert b.mask.tolist() == [False] * (n + 1) + [True] * n
    data = b.inputs[:n, :, :5]
    assert set(data.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(b.targets[n + 1:], data)               # the vectors, written back
    assert (b.inputs[:n, :, 5] == 0).all() and (b.inputs[n, :, 5] == 1).all()
    assert (b.inputs[n:, :, :5] == 0).all() and (b.inputs[n + 1:] == 0).all()


def test_repeat_copy_shapes_and_targets():
    task = make_task("repeat_copy", bits=3, max_repeats=3)
    n = 2
    b = draw(task, n, batch=40)
    length = n + 1 + 3 * n + 1
    assert b.inputs.shape == (length, 40, 5) and b.targets.shape == (length, 40, 4)
    repeats = (b.inputs[n, :, 4] * 3).round().long()
    assert set(repeats.tolist()) == {1, 2, 3}
    for i in range(40):
        r = repeats[i].item()
        out = b.targets[n + 1:, i]
        want = b.inputs[:n, i, :3].repeat(r, 1)
        assert torch.equal(out[:n * r, :3], want)
        assert out[n * r, 3] == 1 and out[:, 3].sum() == 1     # one end marker, after R copies
        assert (out[n * r:, :3] == 0).all()
    assert b.mask.sum() == 3 * n + 1


def test_add_and_argmax_targets():
    add = make_task("add", digits=3)
    b = draw(add, 5)
    assert b.inputs.shape == (6, 6, 4) and b.targets.shape == (6, 6, 1)
    values = b.inputs[:5, :, :3].argmax(-1)
    assert torch.equal(b.targets[5, :, 0], values.sum(0).float())
    assert b.mask.tolist() == [False] * 5 + [True]
    arg = make_task("argmax", digits=10, max_length=8)
    b = draw(arg, 6, batch=50)
    assert b.inputs.shape == (7, 50, 11) and arg.output_size == 8
    values = b.inputs[:6, :, :10].argmax(-1)
    for i in range(50):
        column = values[:, i].tolist()
        assert b.targets[6, i, 0] == column.index(max(column))   # the first largest
    with pytest.raises(ValueError):
        draw(arg, 9)


@pytest.mark.parametrize("name", ["copy", "repeat_copy", "add", "argmax"])
def test_seeded_by_the_generator(name):
    task = make_task(name)
    a, b, c = draw(task, 3, seed=1), draw(task, 3, seed=1), draw(task, 3, seed=2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_copy_errors_and_loss():
    task = make_task("copy", bits=4)
    b = draw(task, 3, batch=2)
    perfect = (b.targets * 2 - 1) * 10                          # logits that are right
    assert task.errors(perfect, b) == 0
    one_wrong = perfect.clone()
    one_wrong[5, 0, 2] *= -1                                     # one bit of one sequence
    assert task.errors(one_wrong, b) == 0.5
    unscored = perfect.clone()
    unscored[1] *= -1                                            # steps before the output
    assert task.errors(unscored, b) == 0
    zero = torch.zeros_like(perfect)
    # chunk losses add up to the whole sequence's loss: log 2 per scored bit, batch mean
    whole = task.chunk_loss(zero, b, 0, 7)
    parts = sum(task.chunk_loss(zero[t0:t0 + 3], b, t0, min(t0 + 3, 7)) for t0 in (0, 3, 6))
    assert torch.allclose(whole, torch.tensor(3 * 4 * 0.6931472), atol=1e-5)
    assert torch.allclose(parts, whole)


def test_add_and_argmax_errors():
    add = make_task("add")
    b = draw(add, 4, batch=4)
    pred = b.targets.clone()
    pred[-1, 0, 0] += 0.6
    pred[-1, 1, 0] += 0.4
    assert add.errors(pred, b) == 0.25
    arg = make_task("argmax", max_length=8)
    b = draw(arg, 5, batch=4)
    logits = torch.nn.functional.one_hot(b.targets[..., 0].long(), 8).float()
    assert arg.errors(logits, b) == 0
    logits[-1, 3] = logits[-1, 3].roll(1)
    assert arg.errors(logits, b) == 0.25
    assert arg.chunk_loss(logits[:3], b, 0, 3) == 0                  # nothing scored there


def test_curriculum_grows_when_errors_fall_below_threshold():
    c = Curriculum(threshold=0.15, window=3)
    assert not any(c.record(e) for e in (1.0, 0.1, 0.1))
    assert c.level == 1 and c.solved == 0
    assert c.record(0.1)                                        # mean of the last 3 is 0.1
    assert c.level == 2 and c.solved == 1
    assert not c.record(0.0) and not c.record(0.0)              # a fresh window at the new level
    assert c.record(0.0) and c.solved == 2
    capped = Curriculum(threshold=1.0, window=1, max_level=1)
    assert not capped.record(0.0) and capped.solved == 1 and capped.level == 1


def test_mnist_rows_reads_a_training_digit_row_by_row():
    task = make_task("mnist_rows")
    b = draw(task, 1, batch=5)
    index = torch.randint(len(task.train_x), (5,), generator=torch.Generator().manual_seed(0))
    assert b.inputs.shape == (28, 5, 28) and b.targets.shape == (28, 5, 1)
    assert b.mask.tolist() == [False] * 27 + [True] and task.levels(64) == 1
    for k in range(5):
        assert torch.equal(b.inputs[:, k], task.train_x[index[k]])     # row t at step t
        assert b.targets[-1, k, 0] == task.train_y[index[k]]
    assert sum(batch.inputs.shape[1] for batch in task.test_batches(3000, "cpu")) == 10000

"""Synthetic sequence tasks for recurrent DNI, each a generator of batches on the device drawn
from a `torch.Generator`, with a curriculum on the sequence length.

Every batch is time-major: `inputs` (L, B, input_size), `targets` (L, B, output_size), and
`mask` (L,), True at the steps that are scored. The loss of a chunk of steps is summed over its
scored steps and output units and averaged over the batch; `errors` counts mistakes per
sequence (bits for copy and repeat copy, wrong answers for add and argmax).

- copy (Graves et al. 2014): N random binary vectors of `bits` bits, then a delimiter on an
  extra input channel; during the next N steps (input all zero) the net outputs the vectors
  back. L = 2N + 1. Level = N.
- repeat_copy: N vectors, then one step with the delimiter and the number of repeats
  R ~ U{1..max_repeats} (given as R / max_repeats on a second extra channel); the net outputs
  the N vectors R times, then an end marker on an extra output channel, then zeros up to
  N * max_repeats + 1 output steps. L = N + 1 + N * max_repeats + 1. Level = N.
- add: N one-hot digits from {0 .. digits-1}, then a query step (extra channel); at the query
  the net outputs the digits' sum (one number, squared error; right when within 0.5). Level = N.
- argmax: N one-hot digits from {0 .. digits-1}, then a query step; at the query the net names
  the position (0 .. max_length-1) of the first largest digit (cross-entropy). Level = N.
- mnist_rows: sequential MNIST, a 28x28 digit read one row of 28 pixels a step, its class named
  at the last step (cross-entropy); no curriculum (one level). Scored on the test set too.

Curriculum (the paper's, after Graves et al.): start at level 1; the level grows by one when the
mean errors per sequence over the last `window` batches fall below `threshold`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from experiment.data import ImageSplits

TASKS = ("copy", "repeat_copy", "add", "argmax", "mnist_rows")


@dataclass
class Batch:
    """One batch of sequences, time-major."""

    inputs: torch.Tensor    # (L, B, input_size)
    targets: torch.Tensor   # (L, B, output_size); add: the sum; argmax: the position (float)
    mask: torch.Tensor      # (L,) bool, the scored steps
    level: int              # the curriculum level it was drawn at (N)


class SequenceTask:
    """Base class: sizes, a batch sampler, the chunk loss and the error count."""

    name = ""
    input_size = 0
    output_size = 0

    def sample(self, level: int, batch_size: int, generator: torch.Generator,
               device: torch.device) -> Batch:
        """A batch of `batch_size` sequences at curriculum level `level`."""
        raise NotImplementedError

    def chunk_loss(self, prediction: torch.Tensor, batch: Batch, t0: int, t1: int
                   ) -> torch.Tensor:
        """Loss of steps t0..t1-1: summed over scored steps and outputs, batch mean."""
        mask = batch.mask[t0:t1]
        pred, target = prediction[mask], batch.targets[t0:t1][mask]
        if pred.numel() == 0:
            return prediction.new_zeros(())
        return self.step_loss(pred, target).sum() / prediction.shape[1]

    def loss_of(self, batch: Batch):
        """`chunk_loss` bound to one batch: the (y, t0, t1) -> loss that TruncatedBPTT takes."""
        return lambda prediction, t0, t1: self.chunk_loss(prediction, batch, t0, t1)

    def step_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Elementwise loss of scored steps (S, B, O)."""
        raise NotImplementedError

    def errors(self, prediction: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mistakes per sequence, averaged over the batch (a 0-dim tensor)."""
        raise NotImplementedError

    def levels(self, max_length: int) -> int:
        """The curriculum's highest level, given --max-length."""
        return max_length


def random_bits(shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """Independent fair bits as floats."""
    return torch.randint(0, 2, shape, generator=generator, device=device).float()


class Copy(SequenceTask):
    """Copy: read N binary vectors and a delimiter, then write the vectors back."""

    name = "copy"

    def __init__(self, bits: int = 8):
        self.bits = bits
        self.input_size = bits + 1
        self.output_size = bits

    def sample(self, level, batch_size, generator, device):
        """Inputs: vectors, delimiter, zeros; targets: the vectors in the last N steps."""
        n, b = level, batch_size
        data = random_bits((n, b, self.bits), generator, device)
        inputs = torch.zeros(2 * n + 1, b, self.input_size, device=device)
        inputs[:n, :, :self.bits] = data
        inputs[n, :, self.bits] = 1.0
        targets = torch.zeros(2 * n + 1, b, self.output_size, device=device)
        targets[n + 1:] = data
        mask = torch.zeros(2 * n + 1, dtype=torch.bool, device=device)
        mask[n + 1:] = True
        return Batch(inputs, targets, mask, level)

    def step_loss(self, prediction, target):
        """Binary cross-entropy on logits (nats per bit)."""
        return F.binary_cross_entropy_with_logits(prediction, target, reduction="none")

    def errors(self, prediction, batch):
        """Wrong bits per sequence (logit > 0 read as 1)."""
        wrong = ((prediction > 0).float() != batch.targets) & batch.mask[:, None, None]
        return wrong.float().sum() / prediction.shape[1]


class RepeatCopy(Copy):
    """Repeat copy: read N vectors and a repeat count R, write the vectors R times, then an
    end marker."""

    name = "repeat_copy"

    def __init__(self, bits: int = 8, max_repeats: int = 2):
        super().__init__(bits)
        self.max_repeats = max_repeats
        self.input_size = bits + 2
        self.output_size = bits + 1

    def sample(self, level, batch_size, generator, device):
        """Inputs: vectors, then delimiter with R / max_repeats; targets: R copies, end
        marker, zeros."""
        n, b, r_max = level, batch_size, self.max_repeats
        data = random_bits((n, b, self.bits), generator, device)
        repeats = torch.randint(1, r_max + 1, (b,), generator=generator, device=device)
        out_len = n * r_max + 1
        length = n + 1 + out_len
        inputs = torch.zeros(length, b, self.input_size, device=device)
        inputs[:n, :, :self.bits] = data
        inputs[n, :, self.bits] = 1.0
        inputs[n, :, self.bits + 1] = repeats.float() / r_max
        step = torch.arange(out_len, device=device)[:, None]            # (out_len, 1)
        copying = step < n * repeats[None, :]                           # (out_len, B)
        tiled = data[step.squeeze(1) % n]                               # (out_len, B, bits)
        targets = torch.zeros(length, b, self.output_size, device=device)
        targets[n + 1:, :, :self.bits] = tiled * copying[..., None]
        targets[n + 1:, :, self.bits] = (step == n * repeats[None, :]).float()
        mask = torch.zeros(length, dtype=torch.bool, device=device)
        mask[n + 1:] = True
        return Batch(inputs, targets, mask, level)


def one_hot_digits(n: int, b: int, digits: int, generator, device) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """(values (N, B) int64, one-hot (N, B, digits) float) of uniform random digits."""
    values = torch.randint(0, digits, (n, b), generator=generator, device=device)
    return values, F.one_hot(values, digits).float()


def digit_query_batch(n: int, b: int, digits: int, generator, device,
                      answer: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """N one-hot digits then a query flag (input size digits + 1); the target, scored at the
    query step only, is `answer(values)` of the (N, B) digit values."""
    values, hot = one_hot_digits(n, b, digits, generator, device)
    inputs = torch.zeros(n + 1, b, digits + 1, device=device)
    inputs[:n, :, :digits] = hot
    inputs[n, :, digits] = 1.0
    targets = torch.zeros(n + 1, b, 1, device=device)
    targets[n, :, 0] = answer(values).float()
    mask = torch.zeros(n + 1, dtype=torch.bool, device=device)
    mask[n] = True
    return Batch(inputs, targets, mask, n)


class Add(SequenceTask):
    """Adding: read N one-hot digits, then at the query step output their sum."""

    name = "add"

    def __init__(self, digits: int = 3):
        self.digits = digits
        self.input_size = digits + 1
        self.output_size = 1

    def sample(self, level, batch_size, generator, device):
        """Inputs: digits then the query flag; target at the query: the sum."""
        return digit_query_batch(level, batch_size, self.digits, generator, device,
                                 answer=lambda values: values.sum(0))

    def step_loss(self, prediction, target):
        """Squared error of the sum."""
        return (prediction - target).pow(2)

    def errors(self, prediction, batch):
        """Fraction of sequences whose sum is off by 0.5 or more."""
        wrong = (prediction[-1, :, 0] - batch.targets[-1, :, 0]).abs() >= 0.5
        return wrong.float().mean()


class ClassifiedAtEnd(SequenceTask):
    """A task whose target is one class, named at the last step."""

    def step_loss(self, prediction, target):
        """Cross-entropy over the classes, shaped as the target (..., 1)."""
        return F.cross_entropy(prediction.flatten(0, -2), target.flatten().long(),
                               reduction="none").view(target.shape)

    def errors(self, prediction, batch):
        """Fraction of sequences whose class is wrong."""
        wrong = prediction[-1].argmax(-1) != batch.targets[-1, :, 0].long()
        return wrong.float().mean()


class Argmax(ClassifiedAtEnd):
    """Argmax: read N one-hot digits, then at the query step name the position of the first
    largest one."""

    name = "argmax"

    def __init__(self, digits: int = 10, max_length: int = 64):
        self.digits, self.max_length = digits, max_length
        self.input_size = digits + 1
        self.output_size = max_length

    def sample(self, level, batch_size, generator, device):
        """Inputs: digits then the query flag; target at the query: the position."""
        if level > self.max_length:
            raise ValueError(f"argmax positions go up to max_length={self.max_length}")
        # the first largest (torch documents that argmax returns the first)
        return digit_query_batch(level, batch_size, self.digits, generator, device,
                                 answer=lambda values: values.argmax(0))



class MnistRows(ClassifiedAtEnd):
    """Sequential MNIST by rows: 28 steps of 28 pixels, the digit's class at the last step."""

    name = "mnist_rows"
    input_size = 28
    output_size = 10

    def __init__(self, images: ImageSplits):
        self.train_x, self.train_y = images.train_x.flatten(1, 2), images.train_y
        self.test_x, self.test_y = images.test_x.flatten(1, 2), images.test_y

    def sample(self, level: int, batch_size: int, generator: torch.Generator,
               device: torch.device) -> Batch:
        """Training digits drawn uniformly (with replacement); the level is not used."""
        index = torch.randint(len(self.train_x), (batch_size,), generator=generator,
                              device=generator.device).to(self.train_x.device)
        return self.rows(self.train_x[index], self.train_y[index], device, level)

    def rows(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str,
             level: int = 1) -> Batch:
        """Images (B, 28, 28) and labels as a batch: row t is step t."""
        inputs = images.to(device).transpose(0, 1).contiguous()
        targets = torch.zeros(28, len(labels), 1, device=device)
        targets[-1, :, 0] = labels.to(device).float()
        mask = torch.zeros(28, dtype=torch.bool, device=device)
        mask[-1] = True
        return Batch(inputs, targets, mask, level)

    def test_batches(self, batch_size: int, device: torch.device | str) -> Iterator[Batch]:
        """The test set in order, as batches."""
        for start in range(0, len(self.test_x), batch_size):
            end = start + batch_size
            yield self.rows(self.test_x[start:end], self.test_y[start:end], device)

    def levels(self, max_length: int) -> int:
        """One level: every sequence is 28 rows."""
        return 1


def make_task(name: str, *, bits: int = 8, max_repeats: int = 2, digits: int | None = None,
              max_length: int = 64, data_dir: str = "data") -> SequenceTask:
    """The task called `name` (one of TASKS); mnist_rows reads MNIST from `data_dir`."""
    if name == "copy":
        return Copy(bits)
    if name == "repeat_copy":
        return RepeatCopy(bits, max_repeats)
    if name == "add":
        return Add(digits or 3)
    if name == "argmax":
        return Argmax(digits or 10, max_length)
    if name == "mnist_rows":
        from experiment.data import load_mnist

        return MnistRows(load_mnist(data_dir))
    raise ValueError(f"unknown task {name!r}; one of {', '.join(TASKS)}")


@dataclass
class Curriculum:
    """The sequence length schedule: grow the level by one when the mean errors per sequence
    over the last `window` batches fall below `threshold`."""

    threshold: float = 0.15
    window: int = 10
    level: int = 1
    max_level: int = 64
    solved: int = 0                     # the longest level on which the criterion was met
    recent: list | None = None

    def record(self, errors: float) -> bool:
        """Add one batch's errors per sequence; True when the level grows."""
        self.recent = (self.recent or []) + [errors]
        self.recent = self.recent[-self.window:]
        if len(self.recent) == self.window and sum(self.recent) / self.window < self.threshold:
            self.solved = max(self.solved, self.level)
            self.recent = []
            if self.level < self.max_level:
                self.level += 1
                return True
        return False

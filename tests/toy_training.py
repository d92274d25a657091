"""A tiny language model and task for testing the training loop without GPT or BERT:
an embedding, dropout and an LM head through lmkern.linear_cross_entropy, learning a
token stream in which each token is the previous one plus one. Run as a script under
torchrun it trains and writes its metrics (tests/test_train.py uses both)."""

import functools
import sys

import torch

import lmkern
from lmkern.models.checkpoint import load_state, load_weights, newest_checkpoint, save_checkpoint
from lmkern.models.train import TrainConfig, finish_distributed, train

VOCAB, CONTEXT = 32, 8


class ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, 16, generator=generator) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(VOCAB, 16, generator=generator) * 0.5)
        self.bias = torch.nn.Parameter(torch.zeros(VOCAB))

    def forward(self, x, y):
        hidden = torch.nn.functional.dropout(self.embed[x], p=0.1, training=self.training)
        return lmkern.linear_cross_entropy(hidden, self.head, y, self.bias)


class ToyTask:
    def __init__(self, batch_size, crash_at_step=None):
        self.stream = torch.arange(4096) % VOCAB
        self.batch_size = batch_size
        self.crash_at_step = crash_at_step

    def batch(self, step, part, parts):
        if step == self.crash_at_step:
            self.crash_at_step = None
            raise KeyboardInterrupt("simulated crash")
        starts = torch.randint(0, len(self.stream) - CONTEXT - 1, (self.batch_size,),
                               generator=torch.Generator().manual_seed(step))
        windows = torch.stack([self.stream[s : s + CONTEXT + 1] for s in starts.chunk(parts)[part]])
        return {"x": windows[:, :-1], "y": windows[:, 1:]}

    def losses(self, model, batch):
        return {"loss": model(batch["x"], batch["y"])}

    def tokens(self, batch):
        return batch["y"].numel()

    def evaluate(self, model):
        batch = self.batch(10**6, 0, 1)
        return {"val_loss": model(batch["x"], batch["y"]).item()}


def checkpoint_writer(out_dir, tokenizer_dir, keep):
    """The loop's save callback: checkpoints in out_dir keeping the newest `keep`, with the
    tokenizer of tokenizer_dir (a ToyModel has no config)."""
    return functools.partial(save_checkpoint, out_dir, kind="toy", config={}, tokenizer_dir=tokenizer_dir, keep=keep)


def run(out_dir, tokenizer_dir, steps=12, crash_at_step=None, resume=False, save=None, keep=3, task=None,
        progress=False, **overrides):
    """Trains a ToyModel in out_dir (resume: from its newest checkpoint, if any); returns
    (model, metric rows). save: the loop's checkpoint writer (default checkpoint_writer's);
    task: default ToyTask."""
    config = TrainConfig(**{**dict(steps=steps, batch_size=8, micro_batch_size=2, learning_rate=0.05,
                                   min_learning_rate=0.005, warmup_steps=2, eval_every=4, checkpoint_every=4),
                            **overrides})
    model = ToyModel()
    state = None
    newest = newest_checkpoint(out_dir) if resume else None
    if newest is not None:
        load_weights(newest, model)
        state = load_state(newest)
    save = save or checkpoint_writer(out_dir, tokenizer_dir, keep)
    task = task or ToyTask(config.batch_size, crash_at_step)
    return model, train(model, task, config, out_dir, save=save, device="cpu", state=state, progress=progress)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
    finish_distributed()

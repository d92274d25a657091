"""A tiny language model and task for testing the training loop without GPT or BERT:
an embedding, dropout and an LM head through lmkern.linear_cross_entropy, learning a
token stream in which each token is the previous one plus one. Run as a script under
torchrun it trains and writes its metrics (tests/test_train.py uses both)."""

import sys

import torch

import lmkern
from lmkern.models.train import TrainConfig, train

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

    def loss(self, model, batch):
        return model(batch["x"], batch["y"])

    def tokens(self, batch):
        return batch["y"].numel()

    def evaluate(self, model):
        batch = self.batch(10**6, 0, 1)
        return {"val_loss": model(batch["x"], batch["y"]).item()}


def run(out_dir, tokenizer_dir, steps=12, crash_at_step=None, resume=False, **overrides):
    config = TrainConfig(steps=steps, batch_size=8, micro_batch_size=2, learning_rate=0.05, min_learning_rate=0.005,
                         warmup_steps=2, eval_every=4, checkpoint_every=4, **overrides)
    model = ToyModel()
    return model, train(model, ToyTask(config.batch_size, crash_at_step), config, out_dir, kind="toy",
                        model_config={}, tokenizer_dir=tokenizer_dir, device="cpu", resume=resume, progress=False)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])

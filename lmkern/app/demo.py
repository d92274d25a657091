"""`lmkern demo`: the main job in one command — a byte-level BPE tokenizer trained on local
text, the text prepared into token files, a small GPT trained on lmkern's fused kernels
with its validation perplexity before, during and after training, and a sample from it.

Everything goes into --out: corpus/ (the default corpus), tokenizer/, data/ and run/ (the
training run: checkpoints, metrics.jsonl, and loss.png with the validation perplexity
over the steps).
"""

import os
import time

import torch

from lmkern.app.common import (add_device, add_kernels, add_overwrite, add_quiet, add_text_options, check_kernels,
                               output_folder, report_skipped, text_format)
from lmkern.app.generate import print_sample
from lmkern.app.run_config import RunConfig
from lmkern.app.train import build, checkpoint_writer, clear_run

# The demo's sizes: the tokenizer's vocabulary, the training run (options of `lmkern train`
# over the tiny preset), how many validation tokens the perplexities are over (None: all of
# them) and the sample's length.
DEMO_SIZES = {
    "quick": dict(vocab_size=512, eval_tokens=4096, sample_tokens=24,
                  run=dict(layers=2, heads=2, width=64, context_length=64, steps=40, batch_size=8, micro_batch_size=8,
                           learning_rate=3e-3, warmup_steps=5)),
    "cpu": dict(vocab_size=4096, eval_tokens=None, sample_tokens=100,
                run=dict(context_length=128, steps=800, batch_size=16, micro_batch_size=16, learning_rate=4e-3,
                         warmup_steps=50)),
    "cuda": dict(vocab_size=8192, eval_tokens=None, sample_tokens=200,
                 run=dict(layers=6, heads=6, width=384, context_length=256, steps=3000, batch_size=64,
                          micro_batch_size=64, learning_rate=1e-3, warmup_steps=200)),
}
EVALUATIONS = 8  # during training, besides the one before it


def demo(args):
    from lmkern.models.corpus import write_default_corpus
    from lmkern.models.data import documents, text_files
    from lmkern.models.data import prepare as prepare_data
    from lmkern.models.files import make_folder
    from lmkern.models.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    from lmkern.models.train import train as train_loop

    began = time.perf_counter()
    sizes = DEMO_SIZES["quick" if args.quick else "cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    check_kernels(args.kernels, args.device)
    text = text_format(args)
    files = text_files(args.data) if args.data else None
    inputs = [("--data", path) for path in args.data or ()]
    with output_folder(args.out, "lmkern demo", inputs=inputs, overwrite=args.overwrite):
        if files:
            source = f"{len(files)} files from --data"
        else:
            files = write_default_corpus(make_folder(os.path.join(args.out, "corpus"), "lmkern demo"))
            source = "the default corpus (pydoc topics and standard library docstrings)"
        megabytes = sum(os.path.getsize(path) for path in files) / 1e6
        print(f"lmkern demo: a small GPT trained on {source}, {megabytes:.1f} MB, with --kernels {args.kernels} "
              f"on {args.device}")

        tokenizer_dir = make_folder(os.path.join(args.out, "tokenizer"), "lmkern tokenizer train")
        data_dir = make_folder(os.path.join(args.out, "data"), "lmkern prepare")
        run_dir = make_folder(os.path.join(args.out, "run"), "lmkern train")
        skipped = []
        save_tokenizer(train_tokenizer(documents(files, text, skipped=skipped), "bpe", sizes["vocab_size"]),
                       tokenizer_dir)
        report_skipped("lmkern demo", skipped)
        meta = prepare_data(files, tokenizer_dir, data_dir, progress=False, text_format=text)
        print(f"tokenizer: byte-level BPE of {meta['vocab_size']} tokens; data: {meta['splits']['train']['tokens']:,} "
              f"training and {meta['splits']['val']['tokens']:,} validation tokens in {data_dir}")

        steps = sizes["run"]["steps"]
        config = RunConfig("gpt", data=data_dir, preset="tiny", kernels=args.kernels,
                           eval_tokens=sizes["eval_tokens"] or meta["splits"]["val"]["tokens"],
                           eval_every=steps // EVALUATIONS, log_every=steps // EVALUATIONS, checkpoint_every=steps,
                           keep_checkpoints=1, **sizes["run"])
        model, task = build(config, meta["vocab_size"])
        print(f"model: GPT of {model.config.n_layer} layers, {model.config.n_head} heads, width {model.config.n_embd}, "
              f"context {model.config.context_length}: {model.num_parameters() / 1e6:.2f}M parameters")
        print(f"training {steps} steps of {config.batch_size} x {model.config.context_length} tokens, evaluating "
              f"every {config.eval_every}")
        clear_run(run_dir)  # a previous demo's
        rows = train_loop(model, task, config.train_config(), run_dir, save=checkpoint_writer(config, run_dir, model),
                          device=args.device, progress=not args.quiet)
        perplexities = [(row["step"], row["val_perplexity"]) for row in rows if "val_perplexity" in row]
        before, after = perplexities[0][1], perplexities[-1][1]
        print(f"validation perplexity before training: {before:.1f}")
        print("validation perplexity during training: "
              + ", ".join(f"{value:.1f} (step {step})" for step, value in perplexities[1:-1]))
        print(f"validation perplexity after training: {after:.1f} (before: {before:.1f}); over the steps in "
              f"{os.path.join(run_dir, 'loss.png')}")
        max_tokens = f" --max-tokens {sizes['eval_tokens']}" if sizes["eval_tokens"] else ""
        print(f"(`lmkern eval --checkpoint {run_dir} --data {data_dir}{max_tokens}` computes the same)")
        print("sample:")
        print_sample(model, load_tokenizer(tokenizer_dir), args.prompt, sizes["sample_tokens"],
                     dict(do_sample=True, temperature=0.8, top_k=50, seed=0), stop_at_end_of_text=False)
    print(f"took {time.perf_counter() - began:.0f} s. The model is in {run_dir}: "
          f"lmkern generate --checkpoint {run_dir} --prompt \"{args.prompt}\"")


def add_parser(commands):
    demo_parser = commands.add_parser(
        "demo", help="train a tokenizer and a small GPT on local text and sample from it (minutes on CPU)",
        description="The main job in one command: trains a byte-level BPE tokenizer on the text (default: the "
        "pydoc topics and standard library docstrings of this Python), prepares the token files, trains a small "
        "GPT on lmkern's fused kernels (a few minutes on CPU; a larger one on GPU), prints the validation "
        "perplexity before, during and after training (and plots it over the steps), and streams a sample.",
    )
    demo_parser.add_argument("--data", nargs="+", metavar="PATH",
                             help="text files or folders (default: the default corpus)")
    demo_parser.add_argument("--out", default="lmkern-demo", metavar="DIR",
                             help="where everything goes (default %(default)s)")
    add_overwrite(demo_parser, "the demo")
    demo_parser.add_argument("--quick", action="store_true",
                             help="a smaller model and few steps: seconds (a smoke test)")
    demo_parser.add_argument("--prompt", default="The", help="the sample's prompt (default %(default)r)")
    add_device(demo_parser)
    add_quiet(demo_parser)
    add_kernels(demo_parser)
    add_text_options(demo_parser)
    demo_parser.set_defaults(run=demo, flags={"paths": "--data"})

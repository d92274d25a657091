"""`lmkern finetune gpt|llama`: continued pretraining (or fine-tuning on one's own text) of a
GPT or Llama from an lmkern checkpoint or a Hugging Face model directory (--init), on data
prepared with that model's tokenizer. It is `lmkern train` (lmkern/app/train.py) with the
model's weights and config taken from --init before step 0: the same options, run folder,
checkpoints and exact --resume (from the run's own checkpoints)."""

from lmkern.app.common import CommandError
from lmkern.app.models import CAUSAL
from lmkern.app.run_config import resumed_config
from lmkern.app.train import add_run_parser, train

MODELS = CAUSAL  # `finetune bert` (a classifier) is lmkern/app/finetune.py's
# --init gives these (nsp: BERT's); a Llama's rotary positions train at any --context-length.
FROM_INIT = {"gpt": ("preset", "layers", "heads", "width", "context_length", "nsp"),
             "llama": ("preset", "layers", "heads", "width", "nsp")}


def finetune(args):
    if getattr(args, "init", None) is None and (not args.resume or resumed_config(args).init is None):
        raise CommandError("--init is required: the checkpoint or Hugging Face directory to fine-tune (a resumed run "
                           "remembers it)")
    return train(args)


def add_parsers(models):
    """The `gpt` and `llama` parsers under `finetune`'s subcommands `models`
    (lmkern/app/finetune.py makes them, beside `bert`)."""
    for kind in MODELS:
        add_run_parser(
            models, kind, None, finetune, hidden=FROM_INIT[kind], command=f"finetune {kind}",
            help=f"continue training a {'GPT' if kind == 'gpt' else 'Llama'} from a checkpoint or a Hugging Face "
            "directory (--init) on your data",
            description=f"Continued pretraining of a {'GPT' if kind == 'gpt' else 'Llama'} on data from `lmkern "
            "prepare` made with the model's own tokenizer (checked): the weights and sizes come from --init (an "
            "lmkern checkpoint or run folder, or a Hugging Face directory with config.json, model.safetensors and "
            "tokenizer.json, read offline), the rest is `lmkern train`'s: the same options, run folder and exact "
            "--resume from the run's own checkpoints.",
        )

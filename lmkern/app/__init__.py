"""The commands of the lmkern command line, one module each — data (`tokenizer train`,
`prepare`), train, finetune (`finetune bert`, `predict`; `finetune gpt|llama` in
finetune_lm, `finetune t5` in finetune_t5), evaluate (`eval`), generate, embed, export,
demo, tools (`info`, `check`, `bench`) — over the library in lmkern.models. run_config
holds a training run's options (RunConfig), models the models a command loads, common
what the commands share: run_command runs one, saying the library's errors with the
command's flags in one line. lmkern/cli.py builds the parser from the modules'
add_parser functions and calls run_command."""

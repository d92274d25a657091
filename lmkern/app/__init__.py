"""The commands of the lmkern command line, one module each — data (`tokenizer train`,
`prepare`), train, evaluate (`eval`), generate, demo, tools (`info`, `bench`) — over the
library in lmkern.models; common holds what they share. lmkern/cli.py builds the parser
from their add_parser functions and turns errors into one-line messages."""

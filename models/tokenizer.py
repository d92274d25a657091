"""Tokenizers trained on local text with the `tokenizers` library, saved as DIR/tokenizer.json:
byte-level BPE for GPT (any text round-trips exactly), WordPiece for BERT (lower-cased,
with [PAD] [UNK] [CLS] [SEP] [MASK]) and, for T5, byte-level BPE with T5's <pad> (id 0) and
</s> (id 1, which encode() appends) and its span-corruption sentinels <extra_id_0> ..
<extra_id_{N-1}> as the highest ids, <extra_id_0> the highest of all, as in T5's vocabulary."""

import json
import os

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmkern.models.errors import ArgumentPathError, ArgumentValueError, check_at_least
from lmkern.models.files import atomic_file

KINDS = ("bpe", "wordpiece", "t5")
END_OF_TEXT = "<|endoftext|>"  # GPT's document separator
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
T5_SPECIALS = ("<pad>", "</s>")  # T5Config's pad_token_id 0 and eos_token_id 1
SENTINEL = "<extra_id_{}>"  # T5's span-corruption sentinels, numbered from 0
SENTINELS = 100  # as T5's vocabulary has
FILE_NAME = "tokenizer.json"
VOCAB_FILE, TOKENIZER_CONFIG = "vocab.txt", "tokenizer_config.json"  # of Hugging Face directories


def train_tokenizer(texts, kind, vocab_size, sentinels=SENTINELS):
    """A tokenizer of `kind` ("bpe", "wordpiece" or "t5") trained on an iterable of
    strings; a "t5" one has `sentinels` of them among its vocab_size tokens."""
    if kind not in KINDS:
        raise ArgumentValueError("{kind} must be one of {}, got {!r}", ", ".join(KINDS), kind)
    if kind == "t5":
        check_at_least("sentinels", sentinels, 1)
    # every byte and <|endoftext|>; specials + 1; every byte, T5's specials and the sentinels
    minimum = {"bpe": 256 + 1, "wordpiece": len(BERT_SPECIALS) + 1, "t5": 256 + len(T5_SPECIALS) + sentinels}[kind]
    if vocab_size < minimum:
        raise ArgumentValueError("{vocab_size} must be at least {} for {kind} {}, got {}", minimum, kind, vocab_size)
    if kind != "wordpiece":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - (sentinels if kind == "t5" else 0),
            special_tokens=list(T5_SPECIALS) if kind == "t5" else [END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so nothing is unknown
            show_progress=False,
        )
    else:
        tokenizer = bert_tokenizer(models.WordPiece(unk_token="[UNK]"), lowercase=True)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS), show_progress=False
        )
    tokenizer.train_from_iterator(texts, trainer)
    if kind == "wordpiece":
        add_bert_template(tokenizer)
    if kind == "t5":
        add_t5_specials(tokenizer, sentinels)
    return tokenizer


def add_t5_specials(tokenizer, sentinels):
    """Appends the sentinels to the vocabulary, the last one first so that <extra_id_0> gets
    the highest id (T5's order), and makes encode() end a text with </s> (as T5's tokenizer)."""
    tokenizer.add_special_tokens([SENTINEL.format(index) for index in reversed(range(sentinels))])
    eos = T5_SPECIALS[1]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )


def bert_tokenizer(wordpiece, lowercase):
    """A Tokenizer of a WordPiece model with BERT's normalisation (lower-cased and accents
    stripped if `lowercase`, as BERT's uncased models) and pre-tokenization."""
    tokenizer = Tokenizer(wordpiece)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def add_bert_template(tokenizer):
    """Makes encode() add BERT's [CLS] A [SEP] (B [SEP], segment 1) around the text."""
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )


def load_hf_tokenizer(directory):
    """The tokenizer of a Hugging Face model directory: its tokenizer.json, else (a BERT's)
    its vocab.txt as transformers' BertTokenizer builds it: WordPiece with BERT's
    normalisation (lower-cased unless tokenizer_config.json says do_lower_case false) and
    template."""
    if os.path.isfile(os.path.join(directory, FILE_NAME)):
        return load_tokenizer(directory)
    vocab = os.path.join(directory, VOCAB_FILE)
    if not os.path.isfile(vocab):
        raise ArgumentPathError("{directory} {}: neither {} nor {}", directory, FILE_NAME, VOCAB_FILE)
    settings_path = os.path.join(directory, TOKENIZER_CONFIG)
    settings = {}
    if os.path.isfile(settings_path):
        with open(settings_path, encoding="utf-8") as file:
            settings = json.load(file)
    unknown = settings.get("unk_token", "[UNK]")
    try:
        wordpiece = models.WordPiece.from_file(vocab, unk_token=unknown)
    except Exception as error:  # the tokenizers library raises a bare Exception
        raise ValueError(f"{vocab} is not a readable WordPiece vocabulary: {error}") from None
    tokenizer = bert_tokenizer(wordpiece, settings.get("do_lower_case", True))
    missing = [token for token in ("[CLS]", "[SEP]", unknown) if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(f"{vocab} lacks BERT's special tokens {', '.join(missing)}")
    add_bert_template(tokenizer)
    return tokenizer


def save_tokenizer(tokenizer, directory):
    """Writes directory/tokenizer.json (atomically: a crash leaves the old file or the new one)."""
    os.makedirs(directory, exist_ok=True)
    with atomic_file(os.path.join(directory, FILE_NAME), encoding="utf-8") as file:
        file.write(tokenizer.to_str(pretty=True))


def load_tokenizer(tokenizer_dir):
    """The tokenizer saved in tokenizer_dir (by save_tokenizer)."""
    path = os.path.join(tokenizer_dir, FILE_NAME)
    if not os.path.isfile(path):
        raise ArgumentPathError("no tokenizer in {tokenizer_dir} {}: expected {}", tokenizer_dir, path)
    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # the tokenizers library raises a bare Exception for a damaged file
        raise ValueError(f"{path} is not a readable tokenizer file: {error}") from None


def tokenizer_kind(tokenizer):
    """ "t5" (a tokenizer with T5's sentinels, whatever its model: Hugging Face's T5
    tokenizers are Unigram ones), else "bpe" or "wordpiece", from the tokenizer's model."""
    if tokenizer.token_to_id(SENTINEL.format(0)) is not None:
        return "t5"
    return "wordpiece" if isinstance(tokenizer.model, models.WordPiece) else "bpe"

"""BERT on lmkern's kernels: config, embeddings, encoder layer, encoder, pretraining (MLM +
NSP) and sequence-classification heads.

Post-LN encoder layers, as BERT:

    x = LayerNorm(x + attention(x))      lmkern.nn.AddLayerNorm: the add, dropout and LayerNorm in one pass
    x = LayerNorm(x + ffn(x))            lmkern.nn.FusedFFN (prenorm=False, exact GELU): one op

The MLM head runs only at the masked positions (no vocabulary-wide logits elsewhere) and
its loss goes through linear_cross_entropy. ALBERT's options: share_layers (one layer's
weights at every depth) and embedding_size (factorised embeddings projected to the
hidden size). `kernels` picks the backend of every op at once; "torch" runs the reference.

The models load and export Hugging Face's BertModel, BertForPreTraining and
BertForSequenceClassification weights (`from_hf`, `to_hf_state_dict`, `save_hf`); the
names and config: models/bert_hf.py.
"""

import dataclasses
import typing

import torch
import torch.nn.functional as F

import lmkern
from lmkern.models import bert_hf, hf
from lmkern.models.common import check_attention_mask, check_ids, init_weights, load_renamed


@dataclasses.dataclass
class BertConfig:
    vocab_size: int = 30522  # BERT's WordPiece vocabulary
    hidden_size: int = 768  # BERT-base's sizes, down to intermediate_size
    n_layer: int = 12
    n_head: int = 12  # 64-wide heads
    intermediate_size: int = 3072  # 4 x hidden_size
    max_position: int = 512  # learned positions: the longest sequence
    type_vocab_size: int = 2  # segments A and B
    dropout: float = 0.1  # on embeddings, attention probabilities and residual branches, as BERT
    layer_norm_eps: float = 1e-12  # BERT's
    share_layers: bool = False  # ALBERT: one layer's weights reused at every depth
    embedding_size: int = None  # ALBERT: factorised embeddings of this width (None: hidden_size)
    kernels: str = "auto"  # the lmkern backend of every op: auto, torch, triton or native

    def __post_init__(self):
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of n_head ({self.n_head})")
        if self.kernels not in lmkern.backend.CHOICES:
            raise ValueError(f"kernels must be one of {lmkern.backend.CHOICES}, got {self.kernels!r}")
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size


PRESETS = {
    "tiny": dict(hidden_size=128, n_layer=2, n_head=2, intermediate_size=512, max_position=128),
    "bert-base": dict(hidden_size=768, n_layer=12, n_head=12, intermediate_size=3072),  # 110M
    "bert-large": dict(hidden_size=1024, n_layer=24, n_head=16, intermediate_size=4096),  # 340M
}


def preset(name, **overrides):
    """A BertConfig from a preset name, with fields overridden (vocab_size from a tokenizer, say)."""
    if name not in PRESETS:
        raise ValueError(f"unknown BERT preset {name!r}: choose one of {', '.join(PRESETS)}")
    return BertConfig(**{**PRESETS[name], **overrides})


class PreTrainingOutput(typing.NamedTuple):
    loss: torch.Tensor  # MLM (with labels) + NSP (with next_sentence_label), scalar, or None without either
    mlm_logits: torch.Tensor  # (M, V) at the M positions where labels != -100 (all B L without labels), or None
    nsp_logits: torch.Tensor  # (B, 2)
    hidden_states: torch.Tensor  # (B, L, H), the encoder's output


class ClassificationOutput(typing.NamedTuple):
    loss: torch.Tensor  # scalar, or None without labels
    logits: torch.Tensor  # (B, num_labels)


class Embeddings(torch.nn.Module):
    """Word, position and token-type embeddings, summed and normalised (then projected to
    the hidden size, factorised)."""

    def __init__(self, config):
        super().__init__()
        self.dropout = config.dropout
        self.word = torch.nn.Embedding(config.vocab_size, config.embedding_size)
        self.position = torch.nn.Embedding(config.max_position, config.embedding_size)
        self.token_type = torch.nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.norm = lmkern.nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        factorised = config.embedding_size != config.hidden_size
        self.project = torch.nn.Linear(config.embedding_size, config.hidden_size) if factorised else None

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)  # (B, L, E)
        x = F.dropout(self.norm(x), self.dropout, self.training)
        return x if self.project is None else self.project(x)  # (B, L, H)


class Layer(torch.nn.Module):
    """A post-LN encoder layer: self-attention over the real tokens, then the feed-forward
    sub-block, each added to the stream and normalised after."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = torch.nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attn_out = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_norm = lmkern.nn.AddLayerNorm(config.hidden_size, eps=config.layer_norm_eps, dropout=config.dropout,
                                                prenorm=False)
        self.ffn = lmkern.nn.FusedFFN(config.hidden_size, config.intermediate_size, eps=config.layer_norm_eps,
                                      approximate="none", dropout=config.dropout, prenorm=False, residual=True)
        # Checkpoints saved before the FFN was one module name these fc1, fc2, ffn_norm.
        load_renamed(self, {"fc1.": "ffn.fc1.", "fc2.": "ffn.fc2.", "ffn_norm.": "ffn.norm."})

    def attention(self, x, key_padding):
        """x: (B, L, H) -> (B, L, H), attending to the keys where key_padding, (B, 1, 1, L)
        bool, is True (the real tokens)."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)  # (B, L, H) each
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=key_padding, dropout_p=dropout_p)  # (B, nh, L, hs)
        return self.attn_out(y.transpose(1, 2).reshape(batch, length, width))  # (B, L, H)

    def forward(self, x, key_padding):
        """x: the stream (B, L, H) -> (B, L, H)."""
        x = self.attn_norm(self.attention(x, key_padding), x)  # LayerNorm(x + attention(x))
        x = self.ffn(x)  # LayerNorm(x + ffn(x))
        return x


class HFInterop:
    """Hugging Face interop of the three models below: the same weights under Hugging
    Face's names (models/bert_hf.py), for the transformers class of the same name."""

    HF_PREFIX = "bert."  # of the encoder's names in Hugging Face's models with heads
    HF_TIED = {}  # Hugging Face's name of a tied copy -> the name of the tensor it copies, ours

    @classmethod
    def from_hf(cls, source, config=None, **overrides):
        """A model with the weights of a Hugging Face checkpoint of the same class: a state
        dict, or a local directory with config.json and model.safetensors (or
        pytorch_model.bin). Without `config`, the directory's config.json gives it, or a
        state dict's shapes (with BERT's 64-wide heads); `overrides` set fields of either
        (kernels, dropout, n_head). A BertModel also loads the encoder of a checkpoint with
        heads, leaving the heads out."""
        checkpoint, config = hf.checkpoint_and_config(source, config, overrides, BertConfig, bert_hf.config_from_hf,
                                                      bert_hf.config_from_state, "BERT")
        model = cls._for_checkpoint(config, checkpoint)
        model.load_hf_state_dict(checkpoint)
        return model

    @classmethod
    def _for_checkpoint(cls, config, checkpoint):
        return cls(config)

    def load_hf_state_dict(self, checkpoint):
        """Loads a Hugging Face state dict of this class (name -> tensor). Raises ValueError
        naming the missing, unexpected and misshapen keys, and an untied decoder."""
        what = f"the Hugging Face {type(self).__name__} checkpoint"
        self.load_state_dict(bert_hf.from_hf_state_dict(checkpoint, self.config, self.state_dict(), self.HF_PREFIX,
                                                        self.HF_TIED, what))

    def to_hf_state_dict(self):
        """This model's weights under the names and shapes of the Hugging Face class of the
        same name (the query, key and value are views of our qkv)."""
        return bert_hf.to_hf_state_dict(self.config, self.state_dict(), self.HF_TIED)

    def save_hf(self, directory, **config):
        """Writes a directory that transformers' from_pretrained reads (config.json and
        model.safetensors, tied copies left out as save_pretrained does); config: the
        arguments of hf_config (a classifier's label_names)."""
        hf.write_directory(directory, self.to_hf_state_dict(), self.hf_config(**config), self.HF_TIED)

    def hf_config(self):
        """This model's config as the dict of Hugging Face's config.json."""
        return bert_hf.config_to_hf(self.config, type(self).__name__)


class BertModel(HFInterop, torch.nn.Module):
    """Embeddings, the encoder and the pooler (dense + tanh on [CLS])."""

    HF_PREFIX = ""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = torch.nn.ModuleList(Layer(config) for _ in range(1 if config.share_layers else config.n_layer))
        self.pooler = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(init_weights)

    def forward(self, input_ids, *, attention_mask=None, token_type_ids=None):
        """input_ids: (B, L) int64 in [0, vocab_size), L <= max_position; token_type_ids:
        (B, L) int64 segments in [0, type_vocab_size) (all 0 if None); attention_mask:
        (B, L), True or 1 on real tokens, False or 0 on padding (all real if None).
        Returns (hidden states (B, L, H), pooled [CLS] (B, H))."""
        token_type_ids, attention_mask = self.check_inputs(input_ids, token_type_ids, attention_mask)
        with lmkern.use_backend(self.config.kernels):
            x = self.embeddings(input_ids, token_type_ids)  # (B, L, H)
            key_padding = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): the kernels' fast path
            for depth in range(self.config.n_layer):
                x = self.layers[depth % len(self.layers)](x, key_padding)
        return x, torch.tanh(self.pooler(x[:, 0]))

    def check_inputs(self, input_ids, token_type_ids, attention_mask):
        """The inputs checked, with the defaults of token_type_ids and attention_mask filled in."""
        config = self.config
        check_ids("input_ids", input_ids, config.vocab_size)
        if input_ids.shape[1] > config.max_position:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens per sequence: more than max_position "
                             f"{config.max_position}")
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        check_ids("token_type_ids", token_type_ids, config.type_vocab_size, input_ids.shape)
        return token_type_ids, check_attention_mask(attention_mask, input_ids)


class BertForPreTraining(HFInterop, torch.nn.Module):
    """BertModel with the MLM head (dense + GELU + LayerNorm, decoder tied to the word
    embeddings, plus a bias) at the masked positions only, and the NSP head on [CLS]."""

    HF_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word.weight",
               "cls.predictions.decoder.bias": "mlm_bias"}

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.mlm_dense = torch.nn.Linear(config.hidden_size, config.embedding_size)
        self.mlm_norm = lmkern.nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.mlm_bias = torch.nn.Parameter(torch.zeros(config.vocab_size))
        self.nsp = torch.nn.Linear(config.hidden_size, 2)
        for head in (self.mlm_dense, self.nsp):
            init_weights(head)

    def forward(self, input_ids, *, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None,
                return_logits=None):
        """input_ids, token_type_ids, attention_mask: as BertModel's. labels: (B, L) int64
        MLM targets, -100 where not masked; next_sentence_label: (B,) int64, 0 if B follows
        A, 1 if random (-100 to skip). The loss is the mean MLM loss over the masked tokens
        plus the mean NSP loss, each when its labels are given (as Hugging Face's, a mean
        over no labelled token is NaN). The MLM head runs where labels != -100 (at every
        position without labels). return_logits: also return the MLM logits there, rows in
        (B, L) order (default: when there are no labels)."""
        hidden, pooled = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if labels is not None:
            check_ids("labels", labels, self.config.vocab_size, input_ids.shape, ignore_index=-100)
        if next_sentence_label is not None:
            check_ids("next_sentence_label", next_sentence_label, 2, input_ids.shape[:1], ignore_index=-100)
        with lmkern.use_backend(self.config.kernels):
            masked = labels != -100 if labels is not None else torch.ones_like(input_ids, dtype=torch.bool)
            h = hidden[masked]  # (M, H): gathered first, so no logits for the other tokens
            h = self.mlm_norm(lmkern.linear_gelu(h, self.mlm_dense.weight, self.mlm_dense.bias))  # (M, E)
            decoder = self.bert.embeddings.word.weight  # (V, E)
            nsp_logits = self.nsp(pooled)  # (B, 2)
            losses = []
            if labels is not None:
                losses.append(lmkern.linear_cross_entropy(h, decoder, labels[masked], self.mlm_bias))
            if next_sentence_label is not None:
                losses.append(lmkern.cross_entropy(nsp_logits, next_sentence_label))
        want_logits = labels is None if return_logits is None else return_logits
        mlm_logits = F.linear(h, decoder, self.mlm_bias) if want_logits else None  # (M, V)
        return PreTrainingOutput(sum(losses) if losses else None, mlm_logits, nsp_logits, hidden)


class BertForSequenceClassification(HFInterop, torch.nn.Module):
    """BertModel with dropout and a linear classifier on the pooled [CLS]: cross-entropy for
    num_labels > 1, mean squared error for one (regression), as Hugging Face's."""

    def __init__(self, config, num_labels=2):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.classifier = torch.nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier)

    def forward(self, input_ids, *, attention_mask=None, token_type_ids=None, labels=None):
        """input_ids, token_type_ids, attention_mask: as BertModel's. labels: (B,) int64
        classes in [0, num_labels) (-100 to skip), or (B,) floats for num_labels = 1."""
        _, pooled = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        logits = self.classifier(F.dropout(pooled, self.config.dropout, self.training))  # (B, num_labels)
        if labels is None:
            return ClassificationOutput(None, logits)
        if self.num_labels == 1:
            if labels.shape != logits.shape[:1]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:1])}, got {tuple(labels.shape)}")
            return ClassificationOutput(F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype)), logits)
        check_ids("labels", labels, self.num_labels, logits.shape[:1], ignore_index=-100)
        return ClassificationOutput(lmkern.cross_entropy(logits, labels, backend=self.config.kernels), logits)

    @classmethod
    def _for_checkpoint(cls, config, checkpoint):
        classifier = checkpoint.get("classifier.weight")
        return cls(config, num_labels=2 if classifier is None else classifier.shape[0])

    def hf_config(self, label_names=None):
        """config.json's dict, with id2label and label2id of label_names (a list, one per
        class; default LABEL_0, LABEL_1, ... as transformers names them) and, for one
        output, problem_type "regression"."""
        names = label_names or [f"LABEL_{i}" for i in range(self.num_labels)]
        if len(names) != self.num_labels:
            raise ValueError(f"label_names must name the {self.num_labels} classes, got {len(names)}")
        labels = dict(enumerate(names))
        regression = {"problem_type": "regression"} if self.num_labels == 1 else {}
        return {**super().hf_config(), "id2label": labels, "label2id": {name: i for i, name in labels.items()},
                **regression}


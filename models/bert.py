"""BERT on lmkern's kernels: config, encoder layer, encoder, pretraining (MLM + NSP) and
sequence-classification heads, and Hugging Face interop.

Post-LN encoder layers, as BERT:

    x = LayerNorm(x + dropout(attention(x, key padding)))     add_layer_norm (prenorm=False)
    x = LayerNorm(x + dropout(fc2(gelu(fc1(x)))))             ffn (prenorm=False)

The MLM head runs only at the masked positions (no vocabulary-wide logits elsewhere) and
its loss goes through linear_cross_entropy. ALBERT's options: share_layers (one layer's
weights at every depth) and embedding_size (factorised embeddings projected to the
hidden size). `kernels` picks the backend of every op at once; "torch" runs the reference.
"""

import dataclasses
import json
import os
import typing

import torch
import torch.nn.functional as F

import lmkern


@dataclasses.dataclass
class BertConfig:
    vocab_size: int = 30522  # BERT's WordPiece vocabulary
    hidden_size: int = 768
    n_layer: int = 12
    n_head: int = 12
    intermediate_size: int = 3072
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
    "bert-base": dict(hidden_size=768, n_layer=12, n_head=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, n_layer=24, n_head=16, intermediate_size=4096),
}


def preset(name, **overrides):
    """A BertConfig from a preset name, with fields overridden (vocab_size from a tokenizer, say)."""
    if name not in PRESETS:
        raise ValueError(f"unknown BERT preset {name!r}: choose one of {', '.join(PRESETS)}")
    return BertConfig(**{**PRESETS[name], **overrides})


class PreTrainingOutput(typing.NamedTuple):
    loss: torch.Tensor  # MLM + NSP, scalar, or None without labels
    mlm_logits: torch.Tensor  # (M, V) at the M masked positions (labels != -100), or None
    nsp_logits: torch.Tensor  # (B, 2)
    hidden_states: torch.Tensor  # (B, L, H), the encoder's output


class ClassificationOutput(typing.NamedTuple):
    loss: torch.Tensor  # scalar, or None without labels
    logits: torch.Tensor  # (B, num_labels)


class Embeddings(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word = torch.nn.Embedding(config.vocab_size, config.embedding_size)
        self.position = torch.nn.Embedding(config.max_position, config.embedding_size)
        self.token_type = torch.nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.norm = torch.nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        factorised = config.embedding_size != config.hidden_size
        self.project = torch.nn.Linear(config.embedding_size, config.hidden_size) if factorised else None

    def forward(self, input_ids, token_type_ids, dropout_p):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        summed = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        x = F.dropout(lmkern.layer_norm(summed, summed.shape[-1:], self.norm.weight, self.norm.bias, self.norm.eps),
                      dropout_p)
        return x if self.project is None else self.project(x)


class Layer(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = torch.nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attn_out = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_norm = torch.nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = torch.nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = torch.nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = torch.nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, key_padding, dropout_p):
        """x: (B, L, H); key_padding: (B, 1, 1, L) bool, True on real tokens."""
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        y = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=key_padding, dropout_p=dropout_p)  # (B, nh, L, hs)
        y = self.attn_out(y.transpose(1, 2).reshape(batch, length, width))
        x = lmkern.add_layer_norm(y, x, self.attn_norm.weight, self.attn_norm.bias, self.attn_norm.eps,
                                  dropout_p=dropout_p, prenorm=False)
        return lmkern.ffn(x, self.ffn_norm.weight, self.ffn_norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                          self.fc2.bias, eps=self.ffn_norm.eps, dropout_p=dropout_p, prenorm=False)


class BertModel(torch.nn.Module):
    """Embeddings, the encoder and the pooler (dense + tanh on [CLS])."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = torch.nn.ModuleList(Layer(config) for _ in range(1 if config.share_layers else config.n_layer))
        self.pooler = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(init_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        """input_ids: (B, L) int64; token_type_ids: (B, L) int64 segments (0 if None);
        attention_mask: (B, L), 1 or True on real tokens (all real if None).
        Returns (hidden states (B, L, H), pooled [CLS] (B, H))."""
        token_type_ids, attention_mask = self.check_inputs(input_ids, token_type_ids, attention_mask)
        dropout_p = self.config.dropout if self.training else 0.0
        with lmkern.use_backend(self.config.kernels):
            x = self.embeddings(input_ids, token_type_ids, dropout_p)
            key_padding = attention_mask.bool()[:, None, None, :]
            for depth in range(self.config.n_layer):
                x = self.layers[0 if self.config.share_layers else depth](x, key_padding, dropout_p)
        return x, torch.tanh(self.pooler(x[:, 0]))

    def check_inputs(self, input_ids, token_type_ids, attention_mask):
        config = self.config
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be (B, L) int64, got {tuple(input_ids.shape)} {input_ids.dtype}")
        if input_ids.shape[1] > config.max_position:
            raise ValueError(f"sequences of {input_ids.shape[1]} tokens: more than max_position {config.max_position}")
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for name, tensor, limit in (("input_ids", input_ids, config.vocab_size),
                                    ("token_type_ids", token_type_ids, config.type_vocab_size)):
            if tensor.shape != input_ids.shape:
                raise ValueError(f"{name} must have shape {tuple(input_ids.shape)}, got {tuple(tensor.shape)}")
            if tensor.numel() and (tensor.min() < 0 or tensor.max() >= limit):
                raise ValueError(f"{name} holds values outside [0, {limit})")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        return token_type_ids, attention_mask


def init_weights(module):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


class BertForPreTraining(torch.nn.Module):
    """BertModel with the MLM head (dense + GELU + LayerNorm, decoder tied to the word
    embeddings, plus a bias) at the masked positions only, and the NSP head on [CLS]."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.mlm_dense = torch.nn.Linear(config.hidden_size, config.embedding_size)
        self.mlm_norm = torch.nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.mlm_bias = torch.nn.Parameter(torch.zeros(config.vocab_size))
        self.nsp = torch.nn.Linear(config.hidden_size, 2)
        self.apply(init_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None, next_sentence_label=None,
                *, return_logits=None):
        """labels: (B, L) int64 MLM targets, -100 where not masked; next_sentence_label: (B,)
        int64, 0 if B follows A, 1 if random (-100 to skip). The MLM head runs where
        labels != -100 (every position without labels). return_logits: also return the MLM
        logits at those positions (default: when there are no labels)."""
        hidden, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        with lmkern.use_backend(self.config.kernels):
            positions = labels != -100 if labels is not None else torch.ones_like(input_ids, dtype=torch.bool)
            masked = hidden[positions]  # (M, H): gathered first, so no logits for the other tokens
            h = lmkern.linear_gelu(masked, self.mlm_dense.weight, self.mlm_dense.bias)
            h = lmkern.layer_norm(h, h.shape[-1:], self.mlm_norm.weight, self.mlm_norm.bias, self.mlm_norm.eps)
            decoder = self.bert.embeddings.word.weight
            nsp_logits = self.nsp(pooled)
            loss = None
            if labels is not None:
                loss = lmkern.linear_cross_entropy(h, decoder, labels[positions], self.mlm_bias)
                if next_sentence_label is not None:
                    loss = loss + lmkern.cross_entropy(nsp_logits, next_sentence_label)
        want_logits = labels is None if return_logits is None else return_logits
        mlm_logits = F.linear(h, decoder, self.mlm_bias) if want_logits else None
        return PreTrainingOutput(loss, mlm_logits, nsp_logits, hidden)


class BertForSequenceClassification(torch.nn.Module):
    """BertModel with dropout and a linear classifier on the pooled [CLS]: cross-entropy for
    num_labels > 1, mean squared error for one (regression), as Hugging Face's."""

    def __init__(self, config, num_labels=2):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.classifier = torch.nn.Linear(config.hidden_size, num_labels)
        self.apply(init_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(F.dropout(pooled, self.config.dropout if self.training else 0.0))
        loss = None
        if labels is not None and self.num_labels == 1:
            loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        elif labels is not None:
            loss = lmkern.cross_entropy(logits, labels, backend=self.config.kernels)
        return ClassificationOutput(loss, logits)

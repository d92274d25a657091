"""BERT on lmkern's kernels: config, embeddings, encoder layer, encoder, pretraining (MLM +
NSP) and sequence-classification heads, and Hugging Face interop.

Post-LN encoder layers, as BERT:

    x = LayerNorm(x + dropout(attention(x, key padding)))     add_layer_norm (prenorm=False)
    x = LayerNorm(x + dropout(fc2(gelu(fc1(x)))))             ffn (prenorm=False, exact GELU)

The MLM head runs only at the masked positions (no vocabulary-wide logits elsewhere) and
its loss goes through linear_cross_entropy. ALBERT's options: share_layers (one layer's
weights at every depth) and embedding_size (factorised embeddings projected to the
hidden size). `kernels` picks the backend of every op at once; "torch" runs the reference.

The models load and export Hugging Face's BertModel, BertForPreTraining and
BertForSequenceClassification weights (`from_hf`, `to_hf_state_dict`, `save_hf`); ours
keep the attention's query, key and value as one (3H, H) matrix, Hugging Face's as three.
"""

import dataclasses
import typing

import torch
import torch.nn.functional as F

import lmkern
from lmkern.models import hf


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
        summed = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)  # (B, L, E)
        x = lmkern.layer_norm(summed, summed.shape[-1:], self.norm.weight, self.norm.bias, self.norm.eps)
        x = F.dropout(x, dropout_p)
        return x if self.project is None else self.project(x)  # (B, L, H)


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


def init_weights(module):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases (LayerNorms start as torch's: ones, zeros)."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


def check_ids(name, ids, shape, limit, ignore_index=None):
    """ids must be an int64 tensor of `shape` with values in [0, limit) (or ignore_index)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int64 tensor, got {got}")
    if ids.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ids.shape)}")
    bad = (ids < 0) | (ids >= limit)
    if ignore_index is not None:
        bad &= ids != ignore_index
    if bad.any():
        allowed = f"[0, {limit})" + ("" if ignore_index is None else f" or {ignore_index}")
        raise ValueError(f"{name} must hold values in {allowed}, got {int(ids[bad][0])}")


class HFInterop:
    """Hugging Face interop of the three models below: the same weights under Hugging
    Face's names, for the transformers class of the same name."""

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
        checkpoint, config = hf.checkpoint_and_config(source, config, overrides, config_from_hf, config_from_state,
                                                      "BERT")
        model = cls._for_checkpoint(config, checkpoint)
        model.load_hf_state_dict(checkpoint)
        return model

    @classmethod
    def _for_checkpoint(cls, config, checkpoint):
        return cls(config)

    def load_hf_state_dict(self, checkpoint):
        """Loads a Hugging Face state dict of this class (name -> tensor). Raises ValueError
        naming the missing, unexpected and misshapen keys, and an untied decoder."""
        checkpoint = {current_hf_name(name): tensor for name, tensor in checkpoint.items()}
        if not self.HF_PREFIX and any(name.startswith("bert.") for name in checkpoint):
            # A BertModel from a model with heads: its encoder.
            checkpoint = {name.removeprefix("bert."): t for name, t in checkpoint.items() if name.startswith("bert.")}
        buffers = (f"{self.HF_PREFIX}embeddings.position_ids", f"{self.HF_PREFIX}embeddings.token_type_ids")
        tensors = hf.take_tensors(checkpoint, self.to_hf_state_dict(), optional=self.HF_TIED, ignored=buffers,
                                  what=f"the Hugging Face {type(self).__name__} checkpoint")
        for copy, name in self.HF_TIED.items():
            if copy in tensors and not torch.equal(tensors[copy], tensors[hf_names(name)[0]]):
                raise ValueError(f"the checkpoint's {copy} differs from its {hf_names(name)[0]}: this model ties them")
        self.load_state_dict({name: torch.cat([tensors[hf_name] for hf_name in hf_names(name)])
                              for name in self.state_dict()})

    def to_hf_state_dict(self):
        """This model's weights under the names and shapes of the Hugging Face class of the
        same name (the query, key and value are views of our qkv)."""
        check_hf_architecture(self.config)
        state = {}
        for name, tensor in self.state_dict().items():
            names = hf_names(name)
            state.update(zip(names, tensor.chunk(len(names))))
        state.update({copy: state[hf_names(name)[0]] for copy, name in self.HF_TIED.items()})
        return state

    def save_hf(self, directory):
        """Writes a directory that transformers' from_pretrained reads (config.json and
        model.safetensors, tied copies left out as save_pretrained does)."""
        state = {name: tensor for name, tensor in self.to_hf_state_dict().items() if name not in self.HF_TIED}
        hf.write_directory(directory, state, self.hf_config())

    def hf_config(self):
        """This model's config as the dict of Hugging Face's config.json."""
        return config_to_hf(self.config, type(self).__name__)


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
        dropout_p = self.config.dropout if self.training else 0.0
        with lmkern.use_backend(self.config.kernels):
            x = self.embeddings(input_ids, token_type_ids, dropout_p)  # (B, L, H)
            key_padding = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): the kernels' fast path
            for depth in range(self.config.n_layer):
                x = self.layers[depth % len(self.layers)](x, key_padding, dropout_p)
        return x, torch.tanh(self.pooler(x[:, 0]))

    def check_inputs(self, input_ids, token_type_ids, attention_mask):
        """The inputs checked, with the defaults of token_type_ids and attention_mask filled in."""
        config = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be (B, L), got {got}")
        if input_ids.shape[1] > config.max_position:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens per sequence: more than max_position "
                             f"{config.max_position}")
        check_ids("input_ids", input_ids, input_ids.shape, config.vocab_size)
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        check_ids("token_type_ids", token_type_ids, input_ids.shape, config.type_vocab_size)
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        return token_type_ids, attention_mask


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
        self.mlm_norm = torch.nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
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
            check_ids("labels", labels, input_ids.shape, self.config.vocab_size, ignore_index=-100)
        if next_sentence_label is not None:
            check_ids("next_sentence_label", next_sentence_label, input_ids.shape[:1], 2, ignore_index=-100)
        with lmkern.use_backend(self.config.kernels):
            masked = labels != -100 if labels is not None else torch.ones_like(input_ids, dtype=torch.bool)
            h = hidden[masked]  # (M, H): gathered first, so no logits for the other tokens
            h = lmkern.linear_gelu(h, self.mlm_dense.weight, self.mlm_dense.bias)  # (M, E)
            h = lmkern.layer_norm(h, h.shape[-1:], self.mlm_norm.weight, self.mlm_norm.bias, self.mlm_norm.eps)
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
        logits = self.classifier(F.dropout(pooled, self.config.dropout if self.training else 0.0))  # (B, num_labels)
        if labels is None:
            return ClassificationOutput(None, logits)
        if self.num_labels == 1:
            if labels.shape != logits.shape[:1]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:1])}, got {tuple(labels.shape)}")
            return ClassificationOutput(F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype)), logits)
        check_ids("labels", labels, logits.shape[:1], self.num_labels, ignore_index=-100)
        return ClassificationOutput(lmkern.cross_entropy(logits, labels, backend=self.config.kernels), logits)

    @classmethod
    def _for_checkpoint(cls, config, checkpoint):
        classifier = checkpoint.get("classifier.weight")
        return cls(config, num_labels=2 if classifier is None else classifier.shape[0])

    def hf_config(self):
        labels = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        return {**super().hf_config(), "id2label": labels, "label2id": {name: i for i, name in labels.items()}}


# -- Hugging Face names and configs ----------------------------------------------------------

HF_NAMES = {  # our module -> Hugging Face's, outside the encoder layers
    "embeddings.word": "embeddings.word_embeddings",
    "embeddings.position": "embeddings.position_embeddings",
    "embeddings.token_type": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
    "pooler": "pooler.dense",
    "mlm_dense": "cls.predictions.transform.dense",
    "mlm_norm": "cls.predictions.transform.LayerNorm",
    "nsp": "cls.seq_relationship",
    "classifier": "classifier",
}
HF_LAYER_NAMES = {  # per encoder layer: ours -> Hugging Face's, stacked on dim 0 in this order
    "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn_out": ("attention.output.dense",),
    "attn_norm": ("attention.output.LayerNorm",),
    "fc1": ("intermediate.dense",),
    "fc2": ("output.dense",),
    "ffn_norm": ("output.LayerNorm",),
}


def hf_names(name):
    """Our state-dict name -> Hugging Face's names of the parts of that tensor, which are
    stacked on dim 0: bert.layers.3.qkv.bias -> [bert.encoder.layer.3.attention.self.query.bias,
    ... .key.bias, ... .value.bias]; mlm_dense.weight -> [cls.predictions.transform.dense.weight]."""
    prefix = "bert." if name.startswith("bert.") else ""
    name = name.removeprefix(prefix)
    if name == "mlm_bias":
        return ["cls.predictions.bias"]
    module, parameter = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, layer_module = module.split(".", 2)
        return [f"{prefix}encoder.layer.{index}.{part}.{parameter}" for part in HF_LAYER_NAMES[layer_module]]
    return [f"{prefix}{HF_NAMES[module]}.{parameter}"]


def current_hf_name(name):
    """Original BERT checkpoints call the LayerNorm parameters gamma and beta."""
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if "LayerNorm" in name and name.endswith(old):
            return name.removesuffix(old) + new
    return name


def check_hf_architecture(config):
    if config.share_layers or config.embedding_size != config.hidden_size:
        raise ValueError("Hugging Face's BERT has neither shared layers nor factorised embeddings: a model with "
                         f"share_layers={config.share_layers}, embedding_size={config.embedding_size} "
                         f"(hidden_size {config.hidden_size}) has no Hugging Face BERT form")


def config_from_hf(hf_config, **overrides):
    """A BertConfig from a Hugging Face BERT config.json (a dict), with fields overridden.
    Hugging Face's hidden_dropout_prob gives our one dropout."""
    if hf_config.get("model_type", "bert") != "bert":
        raise ValueError(f"config.json describes a {hf_config['model_type']!r} model, not 'bert'")
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json has hidden_act {hf_config['hidden_act']!r}: this BERT has exact GELU ('gelu')")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"config.json has position_embedding_type {hf_config['position_embedding_type']!r}: this "
                         "BERT has absolute (learned) positions")
    fields = dict(
        vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
        n_layer=hf_config["num_hidden_layers"], n_head=hf_config["num_attention_heads"],
        intermediate_size=hf_config["intermediate_size"], max_position=hf_config["max_position_embeddings"],
        type_vocab_size=hf_config.get("type_vocab_size", 2), dropout=hf_config.get("hidden_dropout_prob", 0.1),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
    )
    return BertConfig(**{**fields, **overrides})


def config_from_state(checkpoint, **overrides):
    """A BertConfig from the shapes of a Hugging Face BERT state dict, with 64-wide heads
    (BERT's) unless n_head is overridden."""
    state = {current_hf_name(name).removeprefix("bert."): tensor for name, tensor in checkpoint.items()}
    word = "embeddings.word_embeddings.weight"
    if word not in state or "encoder.layer.0.intermediate.dense.weight" not in state:
        raise ValueError(f"not a Hugging Face BERT state dict: it has no {word} or encoder.layer.0")
    vocab, width = state[word].shape
    fields = dict(
        vocab_size=vocab, hidden_size=width, n_head=max(1, width // 64),
        n_layer=1 + max(int(name.split(".")[2]) for name in state if name.startswith("encoder.layer.")),
        intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
    )
    return BertConfig(**{**fields, **overrides})


def config_to_hf(config, architecture):
    """The Hugging Face config.json (a dict) of a model of `architecture` with this config."""
    check_hf_architecture(config)
    return {
        "architectures": [architecture], "model_type": "bert", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu", "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.max_position, "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps, "initializer_range": 0.02, "pad_token_id": 0,
        "tie_word_embeddings": True,
    }

"""The models: policy, frozen initial policy (pi_init), critic with a value head, and the tiny default's pieces.

Pretrained weights load through transformers' `from_pretrained` with ``use_safetensors=True``: no pickle is
ever unpickled from a model path.
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from torch import nn

from .config import TrainConfig

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic; under a second on the bundled data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


def load_tokenizer(cfg: TrainConfig, prompts: list[str]):
    """The tokenizer named by the config (or the policy's), else one trained on ``prompts``; padded on the left."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.policy
    tokenizer = AutoTokenizer.from_pretrained(name) if name else train_tokenizer(prompts, cfg.tiny_vocab)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _attention_kwargs(cfg: TrainConfig) -> dict:
    use_flash = cfg.flash_attn and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    return {"attn_implementation": "flash_attention_2"} if use_flash else {}


def tiny_policy(cfg: TrainConfig, tokenizer) -> nn.Module:
    """A random-init GPT-J sized by the ``tiny_*`` fields, seeded by ``cfg.seed`` (rebuilt identically on resume)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(
        vocab_size=len(tokenizer), n_positions=cfg.max_prompt_tokens + cfg.max_new_tokens,
        n_embd=cfg.tiny_width, n_layer=cfg.tiny_layers, n_head=cfg.tiny_heads,
        rotary_dim=cfg.tiny_width // cfg.tiny_heads,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return GPTJForCausalLM(config)


def load_policy(cfg: TrainConfig, tokenizer, dtype: torch.dtype) -> nn.Module:
    """The policy LM: pretrained from ``cfg.policy``, or the tiny random-init GPT-J when it is None."""
    from transformers import AutoModelForCausalLM

    if cfg.policy is None:
        return tiny_policy(cfg, tokenizer).to(dtype)
    return AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=dtype, use_safetensors=True,
                                                **_attention_kwargs(cfg))


def disable_dropout(model: nn.Module) -> None:
    """RL fine-tuning runs without dropout: the learner must score tokens exactly as the sampler did."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def freeze_bottom_layers(model: nn.Module, num_unfrozen: int) -> None:
    """Freeze the input embeddings and all but the top ``num_unfrozen`` blocks; -1 leaves everything trainable.

    The blocks are the model's longest `nn.ModuleList` (``transformer.h`` of GPT-J, ``model.layers`` of Llama).
    """
    if num_unfrozen < 0:
        return
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    model.get_input_embeddings().requires_grad_(False)
    for block in blocks[: max(len(blocks) - num_unfrozen, 0)]:
        block.requires_grad_(False)


class ActorCritic(nn.Module):
    """Everything the optimizer trains: the policy LM, the critic's trunk and its value head.

    The value head is the 2-layer MLP of the APA authors' critic. With ``critic_trunk=None`` it reads the
    policy's own last hidden states (one forward for both); otherwise a separate trunk, usually a copy of the
    policy's initial trunk. ``critic=False`` builds neither (the group advantage estimator): only the policy.
    """

    def __init__(self, policy: nn.Module, critic_trunk: nn.Module | None, critic: bool = True):
        super().__init__()
        width = policy.config.hidden_size
        self.policy, self.critic_trunk, self.value_head = policy, critic_trunk if critic else None, None
        if critic:
            self.value_head = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 1))
            self.value_head.to(next(policy.parameters()).dtype)

    @property
    def lm_head(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def forward(self, input_ids, attention_mask, position_ids):
        """``(hidden, values)``: the policy's last hidden states ``(B, L, H)`` and float32 values ``(B, L)``
        (None without a critic).

        The logits are left to the caller, who needs them at the response positions only.
        """
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = self.policy.base_model(**inputs).last_hidden_state
        if self.value_head is None:
            return hidden, None
        critic_hidden = hidden if self.critic_trunk is None else self.critic_trunk(**inputs).last_hidden_state
        return hidden, self.value_head(critic_hidden).squeeze(-1).float()


def build_models(cfg: TrainConfig, tokenizer, device: torch.device, dtype: torch.dtype):
    """``(actor_critic, pi_init)``: the trainable modules and a frozen copy of the initial policy, on ``device``."""
    from transformers import AutoModel

    policy = load_policy(cfg, tokenizer, dtype)
    pi_init = copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.critic_shares_trunk or not cfg.has_critic:
        critic_trunk = None
    elif cfg.critic is None:
        critic_trunk = copy.deepcopy(policy.base_model)
    else:
        critic_trunk = AutoModel.from_pretrained(cfg.critic, dtype=dtype, use_safetensors=True,
                                                 **_attention_kwargs(cfg))
    model = ActorCritic(policy, critic_trunk, critic=cfg.has_critic)
    disable_dropout(model)
    disable_dropout(pi_init)
    freeze_bottom_layers(policy, cfg.num_layers_unfrozen)
    if critic_trunk is not None:
        freeze_bottom_layers(critic_trunk, cfg.num_layers_unfrozen)
    return model.to(device), pi_init.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` positions counting real tokens only, so that left padding does not shift a sequence."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

"""
Tiny random models and an independent reference for PAS steering.

The reference never uses pas_peft: a hand-written forward hook adds `strength * vector` at the absolute
positions a mode is documented to steer, and a plain greedy loop recomputes the whole sequence at every
step without a KV cache.
"""

from __future__ import annotations

import contextlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import pas_peft  # noqa: E402, F401  (registers the PAS type with peft)

VOCAB_SIZE = 96
HIDDEN_SIZE = 64
NUM_LAYERS = 3
STEERED_LAYER = 1
PAD_TOKEN_ID = 0

COMMON = dict(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID)
DECODER = dict(
    COMMON,
    hidden_size=HIDDEN_SIZE,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# name: (config class, model class, config arguments, dotted path of the decoder layers)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER, "model.layers"),
    # A sliding window shorter than the test sequences exercises the sliding-window cache.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(DECODER, sliding_window=4), "model.layers"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER, "model.layers"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, head_dim=16), "model.layers"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(DECODER, head_dim=16, sliding_window=4), "model.layers"),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(DECODER, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2),
        "model.layers",
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", DECODER, "model.layers"),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(COMMON, n_embd=HIDDEN_SIZE, n_layer=NUM_LAYERS, n_head=4, n_positions=128),
        "transformer.h",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(COMMON, hidden_size=HIDDEN_SIZE, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
             num_attention_heads=4, max_position_embeddings=128),
        "gpt_neox.layers",
    ),
}
ARCHITECTURE_NAMES = list(ARCHITECTURES)


def make_model(name: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Build the tiny random model `name` in eval mode; the same `seed` gives the same weights."""
    config_name, model_name, arguments, _ = ARCHITECTURES[name]
    arguments = dict(arguments, **overrides)
    if name == "gemma3":
        arguments["layer_types"] = arguments["layer_types"][: arguments["num_hidden_layers"]]
    config = getattr(transformers, config_name)(**arguments)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    # Greedy runs must not stop early at a random end-of-sequence token.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def decoder_layers(model, name: str = "llama"):
    return model.get_submodule(ARCHITECTURES[name][3])


def make_vector(seed: int = 1, hidden_size: int = HIDDEN_SIZE, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(hidden_size, generator=generator)


def position_mask(mode: str, length: int, prompt_length: int) -> torch.Tensor:
    """Absolute positions 0..length-1 that `mode` steers when the prompt has `prompt_length` tokens."""
    positions = torch.arange(length)
    if mode == "all":
        return torch.ones(length, dtype=torch.bool)
    if mode == "last_prompt":
        return positions == prompt_length - 1
    if mode == "generated":
        return positions >= prompt_length - 1
    raise ValueError(mode)


def mode_mask(mode: str, prompt_length: int):
    """A `mask_for` function for `reference_steering` that steers the positions `mode` names."""
    return lambda hidden: position_mask(mode, hidden.shape[1], prompt_length)


def _add_at(hidden: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dim() == 1:
        mask = mask.expand(hidden.shape[0], -1)
    return hidden + mask[..., None].to(hidden.dtype) * delta.to(hidden.dtype)


@contextlib.contextmanager
def reference_steering(module, delta: torch.Tensor, mask_for=None, side: str = "output"):
    """
    Add `delta` to the output (or first input) of `module` where `mask_for(hidden)` is true.

    `mask_for` maps the hidden states (batch, tokens, hidden) to a boolean mask over the tokens; None
    steers every token. The hook covers a whole sequence only when no KV cache is used.
    """

    def mask_of(hidden):
        if mask_for is None:
            return torch.ones(hidden.shape[1], dtype=torch.bool)
        return mask_for(hidden)

    def output_hook(_module, _args, output):
        if isinstance(output, tuple):
            return (_add_at(output[0], delta, mask_of(output[0])),) + output[1:]
        return _add_at(output, delta, mask_of(output))

    def input_hook(_module, args, kwargs):
        if args:
            return (_add_at(args[0], delta, mask_of(args[0])),) + args[1:], kwargs
        name = next(key for key in ("hidden_states", "x", "input") if key in kwargs)
        return args, {**kwargs, name: _add_at(kwargs[name], delta, mask_of(kwargs[name]))}

    if side == "output":
        handle = module.register_forward_hook(output_hook)
    else:
        handle = module.register_forward_pre_hook(input_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate builds them from a left-padded attention mask."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def reference_greedy(
    model, input_ids, steps, module=None, delta=None, mode="all", attention_mask=None, side="output", steerings=()
):
    """
    Greedy decoding without a KV cache, steering `module` by hand at the positions `mode` names.

    `steerings` adds more `(module, delta, mode)` triples, each steering a module's output. Returns the new
    tokens (batch, steps) and the logits of each step (batch, steps, vocab).
    """
    prompt_length = input_ids.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hooks = [(module, delta, mode, side)] if module is not None else []
    hooks += [(extra_module, extra_delta, extra_mode, "output") for extra_module, extra_delta, extra_mode in steerings]
    ids, mask = input_ids, attention_mask
    step_logits = []
    for _ in range(steps):
        with contextlib.ExitStack() as stack:
            for hooked_module, hooked_delta, hooked_mode, hooked_side in hooks:
                mask_for = mode_mask(hooked_mode, prompt_length)
                stack.enter_context(reference_steering(hooked_module, hooked_delta, mask_for, side=hooked_side))
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=generation_position_ids(mask), use_cache=False
            ).logits[:, -1]
        step_logits.append(logits)
        next_tokens = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_tokens], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
    return ids[:, prompt_length:], torch.stack(step_logits, dim=1)


def greedy_generate(model, input_ids, steps, attention_mask=None, **kwargs):
    """Greedy `generate`; returns the new tokens and the logits of each step."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    tokens = output.sequences[:, input_ids.shape[1]:]
    return tokens, torch.stack(output.logits, dim=1)


def prompt_ids(length: int = 7, seed: int = 2, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=generator)


@pytest.fixture(params=ARCHITECTURE_NAMES)
def architecture(request) -> str:
    return request.param


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_session():
    """Run the tiny models on one thread, restoring the thread count afterwards."""
    # Note: on 2 CPU cores shared with other processes, this cut the core suite from about 3.5 min to 35 s.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def scaled_vector(model, seed: int = 1, factor: float = 1.5) -> torch.Tensor:
    """A random vector about `factor` times as large as the hidden states at the steered layer."""
    with torch.no_grad():
        hidden = model(prompt_ids(), output_hidden_states=True).hidden_states[STEERED_LAYER + 1]
    return make_vector(seed, scale=factor * hidden.float().std().item())


def steered_model(base, vector=None, strength: float = 1.5, layer: int = STEERED_LAYER, **config):
    """Wrap `base` in a PAS PeftModel (task type CAUSAL_LM) steering `layer` with `vector`."""
    from peft import get_peft_model

    config.setdefault("task_type", "CAUSAL_LM")
    model = get_peft_model(base, pas_peft.PASConfig(layers=[layer], strength=strength, **config))
    if vector is not None:
        model.set_steering_vectors({layer: vector})
    return model


class TinyBlock(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states):
        return hidden_states + torch.tanh(self.linear(hidden_states))


class TinyCustomModel(nn.Module):
    """A model outside transformers whose layer list has an unusual name."""

    def __init__(self, hidden_size: int = 16, num_layers: int = 3, vocab_size: int = 32) -> None:
        super().__init__()
        self.config = transformers.PretrainedConfig(hidden_size=hidden_size, num_hidden_layers=num_layers)
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.blocks = nn.ModuleList(TinyBlock(hidden_size) for _ in range(num_layers))
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, input_ids):
        hidden_states = self.embed(input_ids)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.head(hidden_states)

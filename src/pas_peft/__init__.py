"""
pas_peft: Painless Activation Steering (PAS) as a PEFT adapter type.

`import pas_peft` registers the "PAS" type with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModelForCausalLM` and transformers' `load_adapter` accept PAS adapters. A process that loads a
saved PAS adapter must import pas_peft first; without it peft fails with `KeyError: 'PAS'`.
"""

__version__ = "0.1.0"

from .config import PASConfig  # noqa: E402
from .layer import PASLayer  # noqa: E402
from .model import PASModel  # noqa: E402
from .registration import register_pas  # noqa: E402

register_pas(PASConfig, PASModel)

from .api import set_active_adapters, set_strength, steering_strength  # noqa: E402
from .extraction import FitResult, fit_pas  # noqa: E402
from .loading import AutoPASModelForCausalLM, from_pretrained, load_adapter, load_base_model  # noqa: E402
from .export import export_control_vector  # noqa: E402
from .hub import push_to_hub, write_model_card  # noqa: E402
from .stacking import PASStack, attach_pas, merge_lora_and_attach_pas  # noqa: E402
from .vectors import SteeringVectors  # noqa: E402

__all__ = [
    "AutoPASModelForCausalLM",
    "FitResult",
    "PASConfig",
    "PASLayer",
    "PASModel",
    "PASStack",
    "SteeringVectors",
    "__version__",
    "attach_pas",
    "export_control_vector",
    "fit_pas",
    "from_pretrained",
    "load_adapter",
    "load_base_model",
    "merge_lora_and_attach_pas",
    "push_to_hub",
    "set_active_adapters",
    "set_strength",
    "steering_strength",
    "write_model_card",
]

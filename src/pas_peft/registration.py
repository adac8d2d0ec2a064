"""Registration of the PAS tuner type with PEFT from outside the peft package."""

from __future__ import annotations

import os
import warnings

import peft
from packaging.version import Version
from peft.utils import PeftType

# peft versions whose internals (PeftType, the four mapping dicts, BaseTuner hooks) were checked by the test suite.
TESTED_PEFT_MIN = Version("0.21.2")
TESTED_PEFT_BELOW = Version("0.22")
ALLOW_UNTESTED_PEFT_ENV = "PAS_PEFT_ALLOW_UNTESTED_PEFT"
PEFT_TYPE_NAME = "PAS"
_OWNER_MARK = "_pas_peft_member"


def check_peft_version(version: str = peft.__version__) -> None:
    """Raise an ImportError on a peft version outside the tested range, unless the override is set."""
    parsed = Version(version)
    if TESTED_PEFT_MIN <= parsed < TESTED_PEFT_BELOW:
        return
    message = (
        f"pas_peft was tested with peft >={TESTED_PEFT_MIN},<{TESTED_PEFT_BELOW}, but peft {version} is installed. "
        f"Install a tested version (pip install 'peft>={TESTED_PEFT_MIN},<{TESTED_PEFT_BELOW}'), or set "
        f"{ALLOW_UNTESTED_PEFT_ENV}=1 to try this one at your own risk."
    )
    if os.environ.get(ALLOW_UNTESTED_PEFT_ENV) == "1":
        warnings.warn(message, stacklevel=3)
        return
    raise ImportError(message)


def add_peft_type_member() -> PeftType:
    """
    Add `PeftType.PAS` to peft's enum in place and return it; return the existing member on later calls.

    `register_peft_method` only accepts names that are `PeftType` members, and code in peft and
    transformers calls `.value` on the type, so a real member is needed rather than a plain string.
    """
    existing = PeftType.__members__.get(PEFT_TYPE_NAME)
    if existing is not None:
        if not getattr(existing, _OWNER_MARK, False):
            raise ImportError(
                f"peft {peft.__version__} ships its own {PEFT_TYPE_NAME!r} method, which clashes with pas_peft. "
                f"Use peft <{TESTED_PEFT_BELOW} with this version of pas_peft."
            )
        return existing

    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    setattr(member, _OWNER_MARK, True)

    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    return member


def register_pas(config_cls: type, model_cls: type) -> None:
    """Make "PAS" known to get_peft_model, PeftConfig/PeftModel.from_pretrained and the state-dict helpers."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    check_peft_version()
    peft_type = add_peft_type_member()

    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix="pas_")
        return
    if not registered.__module__.startswith("pas_peft."):
        raise ImportError(
            f"The PEFT type {PEFT_TYPE_NAME!r} is already registered by {registered.__module__}.{registered.__name__}; "
            "pas_peft cannot register its own."
        )
    # A re-import (for example importlib.reload) replaces our own earlier registration.
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = "pas_"

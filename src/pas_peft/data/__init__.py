"""
Dataset loading for PAS: labeled multiple-choice data in many layouts, normalised to `MultipleChoiceItem`.

- `load_items` reads files, Hugging Face datasets, DataFrames and row lists, detecting the schema.
- `split_items` and `splits_from_mapping` give train / validation / test splits.
- `format_letter_prompt`, `format_answered_prompt` and `format_likelihood_prompt` build the prompts, and
  `resolve_letter_token_ids` finds the answer letters' token ids.
- `list_bundled_datasets` names the small datasets shipped with the package.
"""

from .bundled import BUNDLED_DATASETS, BundledDataset, bundled_dataset, bundled_dataset_path, list_bundled_datasets
from .items import LETTERS, MAX_CHOICES, MIN_CHOICES, MultipleChoiceItem
from .loading import LoadedItems, load_items
from .prompts import (
    LetterPrompt,
    LikelihoodPrompt,
    format_answered_prompt,
    format_letter_prompt,
    format_letter_prompts,
    format_likelihood_prompt,
    item_shuffle_seed,
    resolve_letter_token_ids,
    split_continuation_tokens,
)
from .schemas import SCHEMAS, TARGET_BEHAVIORS, ColumnMapping, detect_schema
from .splits import DatasetSplits, split_items, splits_from_mapping

__all__ = [
    "BUNDLED_DATASETS",
    "LETTERS",
    "MAX_CHOICES",
    "MIN_CHOICES",
    "SCHEMAS",
    "TARGET_BEHAVIORS",
    "BundledDataset",
    "ColumnMapping",
    "DatasetSplits",
    "LetterPrompt",
    "LikelihoodPrompt",
    "LoadedItems",
    "MultipleChoiceItem",
    "bundled_dataset",
    "bundled_dataset_path",
    "detect_schema",
    "format_answered_prompt",
    "format_letter_prompt",
    "format_letter_prompts",
    "format_likelihood_prompt",
    "item_shuffle_seed",
    "list_bundled_datasets",
    "load_items",
    "resolve_letter_token_ids",
    "split_continuation_tokens",
    "split_items",
    "splits_from_mapping",
]

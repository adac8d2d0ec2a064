"""Registry of the small datasets shipped inside the package, under ``pas_peft/datasets/``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"
"""Folder of the bundled data files; each dataset has its own subfolder with a LICENSE and a README.md."""


@dataclass(frozen=True)
class BundledDataset:
    """
    One bundled dataset.

    Args:
        name (`str`): Name to pass to `load_items` or the command line (``--data NAME``).
        relative_path (`str`): Data file, relative to `DATASETS_DIR`.
        schema (`str`): Schema of its rows (a key of `pas_peft.data.schemas.SCHEMAS`).
        license (`str`): SPDX identifier(s) of the data license; the subfolder contains the license text.
        description (`str`): What the set measures and how the slice was taken.
        target_behavior (`str`, *optional*): The A/B target this set documents, for the ``anthropic_ab`` schema.
    """

    name: str
    relative_path: str
    schema: str
    license: str
    description: str
    target_behavior: Optional[str] = None

    @property
    def path(self) -> Path:
        """Absolute path of the data file."""
        return DATASETS_DIR / self.relative_path


BUNDLED_DATASETS: dict[str, BundledDataset] = {
    dataset.name: dataset
    for dataset in (
        BundledDataset(
            name="bbq_age",
            relative_path="bbq_age/Age_slice.jsonl",
            schema="bbq",
            license="CC-BY-4.0",
            description=(
                "BBQ (Bias Benchmark for QA), Age category: 616 of 3680 rows, every 6th block of 4 consecutive "
                "rows, so ambiguous and disambiguated contexts stay paired"
            ),
        ),
        BundledDataset(
            name="sycophancy_caa",
            relative_path="sycophancy_caa/sycophancy_slice.json",
            schema="anthropic_ab",
            license="MIT AND CC-BY-4.0",
            description=(
                "Sycophancy A/B questions from the CAA repository: 300 of its 400 generation items "
                "(those whose index is not 3 mod 4); the target is the non-sycophantic answer"
            ),
            target_behavior="not_matching",
        ),
    )
}
"""Bundled datasets by name."""


def list_bundled_datasets() -> list[BundledDataset]:
    """Return the bundled datasets, sorted by name."""
    return [BUNDLED_DATASETS[name] for name in sorted(BUNDLED_DATASETS)]


def bundled_dataset(name: str) -> BundledDataset:
    """
    Look up a bundled dataset by name.

    Raises:
        KeyError: if no bundled dataset has that name; the message lists the names.
    """
    if name not in BUNDLED_DATASETS:
        raise KeyError(f"no bundled dataset named {name!r}; the bundled datasets are {sorted(BUNDLED_DATASETS)}")
    return BUNDLED_DATASETS[name]


def bundled_dataset_path(name: str) -> Path:
    """Return the path of a bundled dataset's data file (see `bundled_dataset` for errors)."""
    return bundled_dataset(name).path
